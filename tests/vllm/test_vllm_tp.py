"""Tensor parallel on CPU with the flag: TP=2 gives the tokens and resident positions of TP=1, on every rank.

Each rank keeps its own dynts state and compacts its own shard of the KV heads, so every rank must choose the same
keep-set: if one rank chose differently, its heads would attend to other tokens than the other rank's. The
importance predictor scores what every rank sees alike (the hidden states after the all-reduce); H2O's attention
sums cover only the rank's own heads, so the ranks gather them before choosing. Tiny Llama (4 query heads, 2 KV
heads: one KV head per rank), float32, a protected prompt that overflows the keep quota and one longer than the
budget, chunked prefill.

TP=2 on CPU needs ``VLLM_CPU_OMP_THREADS_BIND`` with one core list per rank (``cpu_threads_bind``). For each scorer
both engines are started once, one after the other (about 70 s in all on 2 cores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vllm_support import (
    build_engine, cpu_threads_bind, greedy, positions_of, random_prompts, rank_finished_positions, rank_stats,
    require_vllm, save_random_predictor, save_tiny_model, shutdown,
)

require_vllm()

BUDGET, WINDOW, KEEP_RATIO = 64, 16, 0.5
PROMPT_LENGTHS = [8, 23, 30, 100]  # 30 > the keep quota 0.5 * (64 - 16) = 24; 100 > the budget
NEW_TOKENS = 160
TENSOR_PARALLEL = 2


def run(model_dir: Path, settings: dict[str, Any], tensor_parallel_size: int) -> dict[str, Any]:
    """Greedy tokens, each rank's recorded positions (in prompt order) and each rank's stats, of one engine."""
    with pytest.MonkeyPatch.context() as environment:
        if tensor_parallel_size > 1:
            environment.setenv("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind(tensor_parallel_size))
        llm = build_engine(model_dir, settings, tensor_parallel_size=tensor_parallel_size)
    try:
        outputs = greedy(llm, random_prompts(PROMPT_LENGTHS, seed=11), NEW_TOKENS, logprobs=0)
        return {
            "tokens": [list(output.outputs[0].token_ids) for output in outputs],
            "positions": [positions_of(outputs, recorded) for recorded in rank_finished_positions(llm)],
            "stats": rank_stats(llm),
        }
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module", params=["predictor", "h2o"])
def runs(request: pytest.FixtureRequest, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    settings = {"budget": BUDGET, "window": WINDOW, "keep_ratio": KEEP_RATIO, "scorer": request.param,
                "record_positions": True}
    if request.param == "predictor":
        settings["predictor"] = str(save_random_predictor(model_dir, tmp_path_factory.mktemp("predictor")))
    return {size: run(model_dir, settings, size) for size in (1, TENSOR_PARALLEL)}


def test_every_rank_compacted(runs: dict[int, dict[str, Any]]) -> None:
    stats = runs[TENSOR_PARALLEL]["stats"]
    assert len(stats) == TENSOR_PARALLEL
    # Ranks compact in lockstep (the scheduler sends the same commands to all) and as often as TP=1.
    assert [rank["compactions"] for rank in stats] == [runs[1]["stats"][0]["compactions"]] * TENSOR_PARALLEL
    assert stats[0]["compactions"] > 0


def test_tensor_parallel_gives_the_tokens_of_one_rank(runs: dict[int, dict[str, Any]]) -> None:
    assert runs[TENSOR_PARALLEL]["tokens"] == runs[1]["tokens"]


def test_every_rank_holds_the_positions_of_one_rank(runs: dict[int, dict[str, Any]]) -> None:
    (single,) = runs[1]["positions"]
    logical_len = min(PROMPT_LENGTHS) + NEW_TOKENS - 1
    assert all(len(positions) < logical_len for positions in single), "nothing was evicted: the check would be vacuous"
    for rank, positions in enumerate(runs[TENSOR_PARALLEL]["positions"]):
        assert positions == single, f"rank {rank} holds other positions than the TP=1 run"

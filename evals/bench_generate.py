"""``dynts bench``: full cache vs dynts speed and memory, in one process, on a tiny model built from a config.

    dynts bench --layers 4 --batch-size 4 --new-tokens 512 --budget 256 --window 64

Random weights (speed does not depend on their values), generation forced to a fixed length (EOS ignored).
After a warm-up, the two are timed in turn (full, dynts, full, dynts, ...) ``--repeats`` times, so that a
load change on the machine hits both alike; the table gives the median and the min-max of ms per step and
tokens/s, the dynts / full ratio of each pair (median and min-max), and the KV bytes each held.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from ..cli import UsageError, default_device, device_name, make_settings, non_negative_int, positive_int
from ..config import CompressionConfig
from ..scorers import SCORERS

# Scorers that need something from outside (a scoring function, a trained head, a tokenizer's separators) are
# left out: the model here is random and has no tokenizer.
SCORER_CHOICES = sorted(set(SCORERS) - {"external", "predictor", "sepllm"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (a random Llama)")
    model.add_argument("--layers", type=positive_int, default=4, help="decoder layers")
    model.add_argument("--hidden-size", type=positive_int, default=256, help="hidden size (a multiple of --heads)")
    model.add_argument("--heads", type=positive_int, default=8, help="attention heads (a multiple of --kv-heads)")
    model.add_argument("--kv-heads", type=positive_int, default=2, help="key/value heads")
    model.add_argument("--vocab-size", type=positive_int, default=1024, help="vocabulary size")
    model.add_argument("--device", type=device_name, default=None, help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights' dtype")
    work = parser.add_argument_group("workload")
    work.add_argument("--batch-size", type=positive_int, default=4, help="rows decoded together")
    work.add_argument("--prompt-len", type=positive_int, default=32, help="random prompt tokens per row")
    work.add_argument("--new-tokens", type=positive_int, default=512, help="decoding steps (forced: EOS is ignored)")
    work.add_argument("--repeats", type=positive_int, default=5, help="timed runs of each cache, interleaved")
    work.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    cache = parser.add_argument_group("dynts cache (checked by CompressionConfig)")
    cache.add_argument("--budget", type=int, default=256, help="compact a row when it holds this many tokens; > --window")
    cache.add_argument("--window", type=non_negative_int, default=64, help="most recent tokens always kept")
    cache.add_argument("--keep-ratio", type=float, default=0.3, help="share of the older tokens kept, in (0, 1]")
    cache.add_argument("--scorer", default="window", choices=SCORER_CHOICES, help="token-importance scorer")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def build_model(args: argparse.Namespace, device: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt_len + args.new_tokens + 8, attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, args.dtype)).eval()


def _timed_generate(model: Any, prompt: Any, new_tokens: int, cache: Any = None) -> float:
    import torch

    if prompt.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   past_key_values=cache, pad_token_id=0, eos_token_id=None)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(args: argparse.Namespace) -> int:
    from ..scorers import get_scorer

    config = make_settings(CompressionConfig, budget=args.budget, window=args.window, keep_ratio=args.keep_ratio)
    if args.hidden_size % args.heads:
        raise UsageError(f"--hidden-size {args.hidden_size} must be a multiple of --heads {args.heads}")
    if args.heads % args.kv_heads:
        raise UsageError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    try:
        get_scorer(args.scorer).validate(config)
    except ValueError as error:
        raise UsageError(f"--scorer {args.scorer}: {error}") from error

    import torch
    from transformers import DynamicCache

    from ..integrations.hf import DynTSCache

    device = args.device or default_device()
    model = build_model(args, device)
    prompt = torch.randint(3, args.vocab_size, (args.batch_size, args.prompt_len), device=device,
                           generator=torch.Generator(device=device).manual_seed(args.seed))

    def dynts_cache() -> Any:
        return DynTSCache(model, config, scorer=get_scorer(args.scorer), eos_token_id=[])

    # Warm-up of both paths (allocator, kernels, first-call overheads).
    _timed_generate(model, prompt, 8)
    _timed_generate(model, prompt, 8, dynts_cache())
    full_seconds, dynts_seconds = [], []
    for _ in range(args.repeats):
        full_cache = DynamicCache(config=model.config)
        full_seconds.append(_timed_generate(model, prompt, args.new_tokens, full_cache))
        cache = dynts_cache()
        dynts_seconds.append(_timed_generate(model, prompt, args.new_tokens, cache))
    full_kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full_cache.layers)
    stats = cache.stats
    tokens = args.batch_size * args.new_tokens
    result = {
        "device": device, "dtype": args.dtype, "layers": args.layers, "hidden_size": args.hidden_size,
        "batch_size": args.batch_size, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "budget": args.budget, "window": args.window, "keep_ratio": args.keep_ratio, "scorer": args.scorer,
        "repeats": args.repeats, "full_seconds": full_seconds, "dynts_seconds": dynts_seconds,
        "full_ms_per_step": _spread([1000 * s / args.new_tokens for s in full_seconds]),
        "dynts_ms_per_step": _spread([1000 * s / args.new_tokens for s in dynts_seconds]),
        "full_tokens_per_s": _spread([tokens / s for s in full_seconds]),
        "dynts_tokens_per_s": _spread([tokens / s for s in dynts_seconds]),
        # Per interleaved pair: the two runs of a pair saw the same machine load.
        "throughput_ratio": _spread([full / dynts for full, dynts in zip(full_seconds, dynts_seconds)]),
        "step_time_ratio": _spread([dynts / full for full, dynts in zip(full_seconds, dynts_seconds)]),
        "full_kv_bytes": full_kv_bytes, "dynts_peak_resident_kv_bytes": stats.peak_resident_kv_bytes,
        "dynts_allocated_kv_bytes": stats.allocated_kv_bytes, "compactions": stats.compactions,
        "scoring_s": stats.scoring_seconds, "eviction_s": stats.eviction_seconds,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"random Llama: {args.layers} layers, hidden {args.hidden_size}, {args.heads} / {args.kv_heads} heads; "
          f"{device} {args.dtype}; batch {args.batch_size}, {args.prompt_len}-token prompt, {args.new_tokens} forced steps")
    print(f"dynts: budget {args.budget}, window {args.window}, keep ratio {args.keep_ratio}, scorer {args.scorer}; "
          f"{args.repeats} timed runs each, interleaved (full, dynts, full, dynts, ...)\n")
    print(format_bench_table(result))
    print(f"\nlast dynts run: {stats.compactions} compactions, scoring {stats.scoring_seconds:.3f} s, "
          f"eviction {stats.eviction_seconds:.3f} s")
    return 0


def format_bench_table(result: dict[str, Any]) -> str:
    """The table of ``run``'s result: median and min-max per cache, and the dynts / full ratio."""
    def cells(spread: dict[str, float], digits: int) -> tuple[str, str]:
        return f"{spread['median']:.{digits}f}", f"{spread['min']:.{digits}f} - {spread['max']:.{digits}f}"

    full_ms, dynts_ms = cells(result["full_ms_per_step"], 2), cells(result["dynts_ms_per_step"], 2)
    full_tps, dynts_tps = cells(result["full_tokens_per_s"], 1), cells(result["dynts_tokens_per_s"], 1)
    throughput_ratio, step_ratio = cells(result["throughput_ratio"], 2), cells(result["step_time_ratio"], 2)
    full_kv = result["full_kv_bytes"]
    rows = [
        ("", "", "full cache", "dynts", "dynts / full"),
        ("ms per step", "median", full_ms[0], dynts_ms[0], step_ratio[0]),
        ("", "min - max", full_ms[1], dynts_ms[1], step_ratio[1]),
        ("tokens / s", "median", full_tps[0], dynts_tps[0], throughput_ratio[0]),
        ("", "min - max", full_tps[1], dynts_tps[1], throughput_ratio[1]),
        ("KV MB", "held (peak)", f"{full_kv / 1e6:.2f}", f"{result['dynts_peak_resident_kv_bytes'] / 1e6:.2f}",
         f"{result['dynts_peak_resident_kv_bytes'] / full_kv:.2f}"),
        ("", "allocated", f"{full_kv / 1e6:.2f}", f"{result['dynts_allocated_kv_bytes'] / 1e6:.2f}",
         f"{result['dynts_allocated_kv_bytes'] / full_kv:.2f}"),
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(width) if column < 2 else cell.rjust(width) for column, (cell, width) in enumerate(zip(row, widths)))
        for row in rows
    )

"""``dynts bench``: full cache vs dynts, side by side in one process, on a tiny model built from a config.

Random weights (speed does not depend on their values), generation forced to a fixed length (EOS ignored).
Prints ms per step, tokens/s and KV bytes for both, and the dynts / full-cache ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..config import CompressionConfig
from ..scorers import SCORERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--scorer", default="window", choices=sorted(SCORERS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt_len + args.new_tokens + 8, attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def _timed_generate(model, prompt: torch.Tensor, new_tokens: int, cache=None) -> float:
    if prompt.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   past_key_values=cache, pad_token_id=0, eos_token_id=None)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    from transformers import DynamicCache

    from ..integrations.hf import DynTSCache

    model = build_model(args)
    prompt = torch.randint(3, args.vocab_size, (args.batch_size, args.prompt_len), device=args.device,
                           generator=torch.Generator(device=args.device).manual_seed(args.seed))
    config = CompressionConfig(budget=args.budget, window=args.window, keep_ratio=args.keep_ratio)
    _timed_generate(model, prompt, 8)  # warm-up (allocator, kernels)

    full_cache = DynamicCache(config=model.config)
    full_seconds = _timed_generate(model, prompt, args.new_tokens, full_cache)
    full_kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full_cache.layers)

    cache = DynTSCache(model, config, scorer=args.scorer, eos_token_id=[])
    dynts_seconds = _timed_generate(model, prompt, args.new_tokens, cache)
    stats = cache.stats
    tokens = args.batch_size * args.new_tokens
    result = {
        "device": args.device, "batch_size": args.batch_size, "new_tokens": args.new_tokens,
        "full_ms_per_step": 1000 * full_seconds / args.new_tokens,
        "dynts_ms_per_step": 1000 * dynts_seconds / args.new_tokens,
        "full_tokens_per_s": tokens / full_seconds, "dynts_tokens_per_s": tokens / dynts_seconds,
        "full_kv_bytes": full_kv_bytes, "dynts_peak_resident_kv_bytes": stats.peak_resident_kv_bytes,
        "dynts_allocated_bytes": stats.allocated_kv_bytes, "evictions": stats.evictions,
        "scoring_s": stats.scoring_seconds, "eviction_s": stats.eviction_seconds,
    }
    result["throughput_ratio"] = result["dynts_tokens_per_s"] / result["full_tokens_per_s"]
    result["kv_ratio"] = stats.allocated_kv_bytes / full_kv_bytes
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'':22s}{'full cache':>14s}{'dynts':>14s}{'ratio':>10s}")
    print(f"{'ms / step':22s}{result['full_ms_per_step']:14.2f}{result['dynts_ms_per_step']:14.2f}"
          f"{result['dynts_ms_per_step'] / result['full_ms_per_step']:10.2f}")
    print(f"{'tokens / s':22s}{result['full_tokens_per_s']:14.1f}{result['dynts_tokens_per_s']:14.1f}{result['throughput_ratio']:10.2f}")
    print(f"{'KV bytes (held/alloc)':22s}{full_kv_bytes:14d}{stats.allocated_kv_bytes:14d}{result['kv_ratio']:10.2f}")
    print(f"evictions {stats.evictions}, scoring {stats.scoring_seconds:.3f} s, eviction {stats.eviction_seconds:.3f} s")
    return 0

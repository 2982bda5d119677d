"""GPU decode benchmark: plain HF (sdpa + DynamicCache) vs dynts (predictor scorer, StaticDecoder) at real shapes.

    python -m dynts.evals.bench_decode --models llama-8b qwen-7b --out results/

Random bf16 weights of the real architectures (speed does not depend on weight values), batch 20. dynts decodes
for real through all eviction cycles (budget 5000, window 2000, keep ratio 0.3 by default) with generation forced
to a fixed length; its per-step wall time, resident KV and allocator figures are recorded. Plain HF is measured at
each point on a DynamicCache filled to that many tokens (decoding it for 16k steps would take ~25 minutes; its
step time depends only on the cache length). Per point it prints ms/step, tokens/s, KV bytes, GFLOPs per step,
the bandwidth roofline of that step, and the dynts / plain ratios; JSON and a plot go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import CompressionConfig

POINTS = (2000, 5000, 7000, 10000, 12000, 15000)


@dataclass(frozen=True)
class Shape:
    architecture: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int


SHAPES = {
    "llama-8b": Shape("llama", 4096, 32, 32, 8, 14336, 128256),  # R1-Distill-Llama-8B
    "qwen-7b": Shape("qwen2", 3584, 28, 28, 4, 18944, 152064),  # R1-Distill-Qwen-7B
    "tiny": Shape("llama", 128, 2, 4, 2, 256, 512),  # a smoke test of the script itself (runs on CPU)
}


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build_model(shape: Shape, device: str = "cuda") -> torch.nn.Module:
    """Random bf16 weights, allocated directly on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, intermediate_size=shape.ffn, vocab_size=shape.vocab,
                  max_position_embeddings=32768, tie_word_embeddings=False)
    if shape.architecture == "llama":
        config, cls = LlamaConfig(**common, rope_theta=500000.0), LlamaForCausalLM
    else:
        config, cls = Qwen2Config(**common, rope_theta=10000.0, use_sliding_window=False), Qwen2ForCausalLM
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = cls(config).to(torch.bfloat16)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.normal_(0.0, 0.02)
    # Buffers computed at construction (RoPE frequencies) were not materialised from meta: rebuild them.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config).to(device)
    return model.eval()


def copy_bandwidth(device: str, mib: int = 2048) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write (the roofline's unit)."""
    source = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    _sync(device)
    return 2 * source.numel() * 10 / (time.perf_counter() - start)


def step_costs(shape: Shape, batch: int, kv_tokens: float, weight_bytes: int, bandwidth: float) -> dict[str, float]:
    """FLOPs and bandwidth roofline of one decode step at ``kv_tokens`` held tokens per row."""
    head_dim = shape.hidden // shape.heads
    linear_params = shape.layers * (shape.hidden * head_dim * (shape.heads * 2 + shape.kv_heads * 2) + 3 * shape.hidden * shape.ffn) + shape.hidden * shape.vocab
    attention_flops = 4 * shape.layers * shape.heads * head_dim * kv_tokens
    kv_bytes = batch * kv_tokens * shape.layers * 2 * shape.kv_heads * head_dim * 2
    return {
        "gflops": batch * (2 * linear_params + attention_flops) / 1e9,
        "kv_bytes_read": kv_bytes,
        "roofline_ms": 1000 * (weight_bytes + kv_bytes) / bandwidth,
    }


@torch.no_grad()
def plain_step_ms(model: torch.nn.Module, shape: Shape, batch: int, kv_tokens: int, steps: int = 10) -> tuple[float, int]:
    """HF decode (sdpa + DynamicCache) at ``kv_tokens`` cached tokens: ms per step and the cache's bytes."""
    from transformers import DynamicCache

    device = model.device
    head_dim = shape.hidden // shape.heads
    cache = DynamicCache(config=model.config)
    for layer in range(shape.layers):
        keys = torch.randn(batch, shape.kv_heads, kv_tokens, head_dim, dtype=model.dtype, device=device)
        cache.update(keys, keys.clone(), layer)
    ids = torch.randint(0, shape.vocab, (batch, 1), device=device)
    mask = torch.ones(batch, kv_tokens + 1, dtype=torch.long, device=device)
    times = []
    for step in range(steps + 3):
        position = torch.full((batch, 1), kv_tokens + step, device=device)
        _sync(device)
        start = time.perf_counter()
        logits = model(ids, attention_mask=mask, position_ids=position, past_key_values=cache, logits_to_keep=1).logits
        ids = logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        mask = torch.cat([mask, mask[:, :1]], dim=1)
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 1000 * sum(times[3:]) / steps, kv_bytes


def predictor_scorer(model: torch.nn.Module):
    """The learned Importance Predictor's scorer with a randomly initialised head (speed only)."""
    from ..predictor import ImportancePredictor, PredictorScorer

    return PredictorScorer(ImportancePredictor.for_model(model))


@torch.no_grad()
def predictor_ms(model: torch.nn.Module, batch: int, repeats: int = 200) -> float:
    """Time of the predictor head on one step's hidden states (it runs inside the captured decode step, where the
    cache's stopwatch cannot see it)."""
    scorer = predictor_scorer(model)
    head = scorer.head.to(model.device)
    head.hidden_layers.to(model.dtype)
    hidden = torch.randn(batch, 1, model.config.hidden_size, device=model.device, dtype=model.dtype)
    for _ in range(10):
        head(hidden)
    _sync(model.device)
    start = time.perf_counter()
    for _ in range(repeats):
        head(hidden)
    _sync(model.device)
    return 1000 * (time.perf_counter() - start) / repeats


@torch.no_grad()
def dynts_run(model, shape: Shape, batch: int, steps: int, prompt_len: int, config: CompressionConfig) -> dict:
    from ..integrations.hf import DynTSCache
    from ..integrations.hf_static import StaticDecoder

    cache = DynTSCache(model, config, scorer=predictor_scorer(model), eos_token_id=[])
    decoder = StaticDecoder(model, cache)
    prompt = torch.randint(0, shape.vocab, (batch, prompt_len), device=model.device)
    on_gpu = model.device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if on_gpu else 0
    decoder.generate(prompt, max_new_tokens=steps + 1)
    stats = cache.stats
    return {
        "step_seconds": decoder.step_seconds,
        "physical_len": [row[0] for row in stats.physical_len_history[1:]],
        "allocated_kv_bytes": stats.allocated_kv_bytes,
        "bytes_per_token": cache.compressor.storage.bytes_per_token,
        "peak_allocated_delta": (torch.cuda.max_memory_allocated() - base) if on_gpu else None,
        "scoring_seconds": stats.scoring_seconds,
        "eviction_seconds": stats.eviction_seconds,
        "evictions": stats.evictions,
    }


def report(name: str, shape: Shape, batch: int, prompt_len: int, plain: dict, dynts: dict, bandwidth: float,
           weight_bytes: int, points: tuple[int, ...]) -> list[dict]:
    rows = []
    step_seconds, physical = dynts["step_seconds"], dynts["physical_len"]
    for point in points:
        # Step index where the logical length is `point`; average dynts over +-100 steps around it.
        index = point - prompt_len
        window = slice(max(0, index - 100), min(len(step_seconds), index + 100))
        dynts_ms = 1000 * sum(step_seconds[window]) / max(1, len(step_seconds[window]))
        held = sum(physical[window]) / max(1, len(physical[window]))
        plain_ms, plain_bytes = plain[point]
        plain_cost = step_costs(shape, batch, point, weight_bytes, bandwidth)
        dynts_cost = step_costs(shape, batch, held, weight_bytes, bandwidth)
        resident = physical[min(index, len(physical) - 1)] * batch * dynts["bytes_per_token"]
        rows.append({
            "model": name, "point": point,
            "plain_ms": plain_ms, "dynts_ms": dynts_ms,
            "plain_tokens_per_s": 1000 * batch / plain_ms, "dynts_tokens_per_s": 1000 * batch / dynts_ms,
            "throughput_ratio": plain_ms / dynts_ms,
            "plain_kv_bytes": plain_bytes, "dynts_resident_kv_bytes": resident,
            "dynts_allocated_kv_bytes": dynts["allocated_kv_bytes"],
            "resident_kv_ratio": resident / plain_bytes, "allocated_kv_ratio": dynts["allocated_kv_bytes"] / plain_bytes,
            "plain_gflops": plain_cost["gflops"], "dynts_gflops": dynts_cost["gflops"],
            "gflops_ratio": dynts_cost["gflops"] / plain_cost["gflops"],
            "plain_roofline_ms": plain_cost["roofline_ms"], "dynts_roofline_ms": dynts_cost["roofline_ms"],
            "dynts_over_roofline": dynts_ms / dynts_cost["roofline_ms"],
        })
    return rows


def eviction_points(run: dict, prompt_len: int) -> list[dict]:
    """At each step where the rows were compacted: the KV held right after it vs a full cache at that length."""
    physical = run["physical_len"]
    points = []
    for step in range(1, len(physical)):
        if physical[step] < physical[step - 1]:
            logical = prompt_len + step + 1
            points.append({"logical": logical, "held": physical[step], "kv_ratio": physical[step] / logical})
    return points


def print_table(rows: list[dict]) -> None:
    header = ("model", "point", "plain ms", "dynts ms", "x tput", "plain tok/s", "dynts tok/s", "KV res x",
              "KV alloc x", "GFLOPs x", "dynts/roof")
    print(" ".join(f"{h:>11s}" for h in header))
    for r in rows:
        print(" ".join(f"{v:>11}" for v in (
            r["model"], r["point"], f"{r['plain_ms']:.1f}", f"{r['dynts_ms']:.1f}", f"{r['throughput_ratio']:.2f}",
            f"{r['plain_tokens_per_s']:.0f}", f"{r['dynts_tokens_per_s']:.0f}", f"{r['resident_kv_ratio']:.3f}",
            f"{r['allocated_kv_ratio']:.3f}", f"{r['gflops_ratio']:.2f}", f"{r['dynts_over_roofline']:.2f}")))


def plot(rows: list[dict], runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    figure, axes = plt.subplots(len(models), 3, figsize=(15, 4 * len(models)), squeeze=False)
    for row_axes, name in zip(axes, models):
        mine = [r for r in rows if r["model"] == name]
        points = [r["point"] for r in mine]
        for axis, (key_plain, key_dynts, label) in zip(row_axes, (
            ("plain_tokens_per_s", "dynts_tokens_per_s", "tokens / s"),
            ("plain_kv_bytes", "dynts_resident_kv_bytes", "KV bytes held"),
            ("plain_gflops", "dynts_gflops", "GFLOPs / step"),
        )):
            axis.plot(points, [r[key_plain] for r in mine], "o-", label="HF full cache")
            axis.plot(points, [r[key_dynts] for r in mine], "s-", label="dynts")
            for x, r in zip(points, mine):
                axis.annotate(f"{r[key_dynts] / r[key_plain]:.2f}x", (x, r[key_dynts]), textcoords="offset points", xytext=(0, 6), fontsize=8)
            axis.set_xlabel("decoding step")
            axis.set_title(f"{name}: {label}")
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16000,
                        help="forced dynts decode steps (16k, as in the DynTS paper: the last eviction cycle ends past 15k)")
    parser.add_argument("--points", type=int, nargs="+", default=list(POINTS))
    parser.add_argument("--budget", type=int, default=5000)
    parser.add_argument("--window", type=int, default=2000)
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench_decode_out"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = CompressionConfig(budget=args.budget, window=args.window, keep_ratio=args.keep_ratio)
    bandwidth = copy_bandwidth(args.device)
    print(f"device copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s", flush=True)
    all_rows, runs = [], {}
    for name in args.models:
        shape = SHAPES[name]
        model = build_model(shape, args.device)
        weight_bytes = sum(p.nbytes for n, p in model.named_parameters() if "embed_tokens" not in n)
        plain = {}
        for point in args.points:
            plain[point] = plain_step_ms(model, shape, args.batch_size, point)
            print(f"{name} plain HF at {point}: {plain[point][0]:.1f} ms/step", flush=True)
        run = dynts_run(model, shape, args.batch_size, args.steps, args.prompt_len, config)
        run["predictor_ms_per_step"] = predictor_ms(model, args.batch_size)
        runs[name] = {k: v for k, v in run.items() if k not in ("step_seconds", "physical_len")}
        total = sum(run["step_seconds"])
        predictor_seconds = run["predictor_ms_per_step"] * len(run["step_seconds"]) / 1000
        overhead = run["scoring_seconds"] + run["eviction_seconds"] + predictor_seconds
        runs[name]["scoring_and_eviction_share"] = overhead / total
        print(f"{name} dynts: {len(run['step_seconds'])} steps in {total:.1f} s, {run['evictions']} row compactions; "
              f"compaction-time scoring {run['scoring_seconds']:.2f} s + eviction {run['eviction_seconds']:.2f} s + "
              f"predictor {run['predictor_ms_per_step']:.3f} ms/step ({predictor_seconds:.2f} s) "
              f"= {100 * overhead / total:.2f}% of decode time", flush=True)
        runs[name]["eviction_points"] = eviction_points(run, args.prompt_len)
        for point in runs[name]["eviction_points"]:
            print(f"{name} eviction at logical {point['logical']}: holds {point['held']} tokens per row "
                  f"= {point['kv_ratio']:.3f}x of a full cache", flush=True)
        rows = report(name, shape, args.batch_size, args.prompt_len, plain, run, bandwidth, weight_bytes, tuple(args.points))
        all_rows.extend(rows)
        (args.out / "bench_decode.json").write_text(json.dumps({"rows": all_rows, "runs": runs}, indent=1))
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print_table(all_rows)
    plot(all_rows, runs, args.out / "bench_decode.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

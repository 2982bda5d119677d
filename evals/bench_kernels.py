"""Microbenchmarks of the dynts kernels on one CUDA GPU, each against a baseline measured in the same process.

    python -m dynts.evals.bench_kernels [--json results.json]

1. Compaction of a Llama-8B-shaped dense cache (32 layers, batch 20, 8 KV heads, 5,000 slots, dim 128, bf16,
   keep 30%): achieved bandwidth (bytes read + written by the kernel) / device-to-device copy bandwidth
   (target >= 0.70). Also the paged layout, per-KV-head keep lists, and the torch reference.
2. Attention scores (window 32, 16k keys, batch 20, 32 query / 8 KV heads, dim 128, bf16): Triton vs the torch
   eager reference (target >= 3x faster), plus windows 1 and 64 and the other reductions.
3. The importance-predictor MLP (4096 -> 8192 -> 2048 -> 1, batch 20, one token a step) in torch eager and as a
   CUDA graph, against its weight-read floor: whether a fused kernel could help.

Times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import json
import math
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from dynts.kernels import compact_
from dynts.kernels.attention_score_kernel import attention_scores_triton
from dynts.kernels.compaction import compact_dense_
from dynts.kernels.paged import compact_paged_
from dynts.kernels.reference import attention_scores_reference, compact_reference_
from dynts.kernels.validation import check_paged_compaction_args

LAYERS, BATCH, KV_HEADS, SLOTS, HEAD_DIM, KEEP_RATIO = 32, 20, 8, 5000, 128, 0.3
Q_HEADS, SCORE_KEYS, SCORE_WINDOW = 32, 16384, 32
HIDDEN = 4096


def median_ms(fn, rep_ms: int = 200) -> float:
    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def copy_bandwidth(gigabytes: float = 2.0) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    source = torch.randn(int(gigabytes * 2**30) // 2, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source))
    moved = 2 * source.numel() * source.element_size()
    del source, target
    return moved / (ms * 1e-3)


def random_keep_lists(lists: int, rows: int, slots: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """[lists, rows, keep] sorted random slot choices (the worst case: no unchanged prefix)."""
    scores = torch.rand(lists * rows, slots, generator=generator, device="cuda")
    return scores.topk(keep, dim=1).indices.sort(dim=1).values.view(lists, rows, keep)


def bench_compaction(copy_bw: float, results: dict) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    keep = int(KEEP_RATIO * SLOTS)
    cache = torch.randn(LAYERS, BATCH, KV_HEADS, SLOTS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    rows = torch.arange(BATCH, device="cuda")
    keep_count = torch.full((BATCH,), keep, device="cuda")
    print(f"\n== compaction: cache {tuple(cache.shape)} bf16 ({cache.numel() * 2 / 1e9:.2f} GB), keep {keep}/{SLOTS}")
    for label, heads_g in (("shared keep list", 1), ("per-KV-head keep lists", KV_HEADS)):
        keep_index = random_keep_lists(heads_g, BATCH, SLOTS, keep, generator).transpose(0, 1).unsqueeze(0)
        keep_index = keep_index.contiguous()  # [1, rows, heads_g, keep]
        moved_lanes = (keep_index != torch.arange(keep, device="cuda")).sum().item()
        moved_bytes = 2 * moved_lanes * (KV_HEADS // heads_g) * LAYERS * HEAD_DIM * cache.element_size()

        # correctness on a slice first (two layers, three rows), against the reference on a copy of that slice
        expected = cache[:2, :3].clone()
        compact_reference_(expected, torch.arange(3, device="cuda"), keep_index[:, :3], keep_count[:3])
        compact_dense_(cache, rows, keep_index, keep_count)
        torch.cuda.synchronize()
        assert torch.equal(cache[:2, :3, :, :keep], expected[:, :, :, :keep]), "compaction kernel differs from reference"

        print(f"-- {label}: {moved_bytes / 1e9:.2f} GB read + written per call")
        print(f"{'block_tokens':>12} {'warps':>5} {'ms':>8} {'GB/s':>8} {'/copy':>6}")
        best = None
        for block_tokens in (16, 32, 64, 128):
            for num_warps in (4, 8):
                ms = median_ms(lambda: compact_dense_(cache, rows, keep_index, keep_count, block_tokens=block_tokens,
                                                      num_warps=num_warps))
                bandwidth = moved_bytes / (ms * 1e-3)
                print(f"{block_tokens:>12} {num_warps:>5} {ms:>8.3f} {bandwidth / 1e9:>8.0f} {bandwidth / copy_bw:>6.2f}")
                if best is None or ms < best[0]:
                    best = (ms, block_tokens, num_warps)
        default_ms = median_ms(lambda: compact_dense_(cache, rows, keep_index, keep_count))
        public_ms = median_ms(lambda: compact_(cache, rows, keep_index, keep_count))
        ratio = moved_bytes / (default_ms * 1e-3) / copy_bw
        print(f"default config: {default_ms:.3f} ms, bandwidth ratio {ratio:.2f} (target >= 0.70); best "
              f"{best[0]:.3f} ms at block_tokens={best[1]}, warps={best[2]}; public compact_ with argument checks "
              f"{public_ms:.3f} ms")
        key = "compaction_shared" if heads_g == 1 else "compaction_per_head"
        results[key] = dict(default_ms=default_ms, bandwidth_ratio=ratio, public_ms=public_ms, moved_gb=moved_bytes / 1e9,
                            best=dict(ms=best[0], block_tokens=best[1], num_warps=best[2]))
        if heads_g == 1:
            reference_ms = median_ms(lambda: compact_reference_(cache, rows, keep_index, keep_count), rep_ms=500)
            print(f"torch reference: {reference_ms:.3f} ms ({reference_ms / default_ms:.1f}x the kernel's time)")
            results[key]["reference_ms"] = reference_ms
    del cache

    # Paged (vLLM layout): same token count, 16-token blocks, one tensor per layer, K and V planes.
    block_size = 16
    blocks_per_request = triton.cdiv(SLOTS, block_size)
    num_blocks = blocks_per_request * BATCH
    caches = [torch.randn(2, num_blocks, block_size, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
              for _ in range(LAYERS)]
    table = torch.randperm(num_blocks, device="cuda").view(BATCH, blocks_per_request).to(torch.int32)
    keep_index = random_keep_lists(1, BATCH, SLOTS, keep, generator).unsqueeze(2)
    table64, keep_index, keep_count = check_paged_compaction_args(caches, table, keep_index, keep_count)
    moved_lanes = (keep_index != torch.arange(keep, device="cuda")).sum().item()
    moved_bytes = 2 * 2 * moved_lanes * KV_HEADS * LAYERS * HEAD_DIM * 2
    ms = median_ms(lambda: compact_paged_(caches, table64, keep_index, keep_count))
    ratio = moved_bytes / (ms * 1e-3) / copy_bw
    print(f"-- paged, K and V of {LAYERS} layers in one launch ({moved_bytes / 1e9:.2f} GB): {ms:.3f} ms, "
          f"bandwidth ratio {ratio:.2f}")
    results["compaction_paged"] = dict(ms=ms, bandwidth_ratio=ratio, moved_gb=moved_bytes / 1e9)
    del caches


def bench_scores(results: dict) -> None:
    print(f"\n== attention scores: batch {BATCH}, {Q_HEADS} q / {KV_HEADS} kv heads, {SCORE_KEYS} keys, dim {HEAD_DIM}")
    generator = torch.Generator(device="cuda").manual_seed(1)
    keys = torch.randn(BATCH, KV_HEADS, SCORE_KEYS, HEAD_DIM, generator=generator, device="cuda").to(torch.bfloat16)
    key_len = torch.full((BATCH,), SCORE_KEYS, device="cuda")
    scale = 1 / math.sqrt(HEAD_DIM)
    key_bytes = keys.numel() * keys.element_size()
    # Floor: two passes each read every key once, with reads streaming at the copy's bytes/s (read-only traffic
    # reaches about that rate: the window-1 case runs near it).
    floor_ms = 2 * key_bytes / results["copy_bandwidth"] * 1e3
    cases = [(SCORE_WINDOW, "sum", "sum"), (SCORE_WINDOW, "max", "sum"), (SCORE_WINDOW, "mean", "max"),
             (1, "sum", "sum"), (64, "mean", "mean")]
    print(f"{'window':>6} {'reduce q/group':>15} {'triton ms':>10} {'torch ms':>9} {'speedup':>8} {'max rel err':>11}")
    for window, reduce_queries, reduce_group in cases:
        queries = torch.randn(BATCH, Q_HEADS, window, HEAD_DIM, generator=generator, device="cuda").to(torch.bfloat16)
        options = dict(scale=scale, reduce_queries=reduce_queries, reduce_group=reduce_group)
        got = attention_scores_triton(queries, keys, key_len, **options)
        want = attention_scores_reference(queries, keys, key_len, **options)
        error = ((got - want).abs().max() / want.abs().max()).item()
        assert error < 1e-3, f"score kernel differs from the reference (max relative error {error:.2e})"
        del want
        triton_ms = median_ms(lambda: attention_scores_triton(queries, keys, key_len, **options))
        torch_ms = median_ms(lambda: attention_scores_reference(queries, keys, key_len, **options), rep_ms=500)
        print(f"{window:>6} {reduce_queries + '/' + reduce_group:>15} {triton_ms:>10.3f} {torch_ms:>9.2f} "
              f"{torch_ms / triton_ms:>7.1f}x {error:>11.1e}")
        results[f"scores_w{window}_{reduce_queries}_{reduce_group}"] = dict(
            triton_ms=triton_ms, torch_ms=torch_ms, speedup=torch_ms / triton_ms, max_rel_err=error,
            key_read_floor_ms=floor_ms,
        )
        if (window, reduce_queries, reduce_group) == (SCORE_WINDOW, "sum", "sum"):
            tuning = {}
            for knobs in (dict(key_chunk=1024), dict(key_chunk=2048), dict(key_chunk=4096), dict(key_chunk=8192),
                          dict(block_keys=32), dict(block_keys=128), dict(block_keys=32, num_warps=4),
                          dict(block_keys=128, num_warps=4), dict(num_warps=4)):
                label = ",".join(f"{name}={value}" for name, value in knobs.items())
                try:
                    tuning[label] = median_ms(lambda: attention_scores_triton(queries, keys, key_len, **knobs, **options))
                except Exception as error:  # a knob set that does not compile must not end the run
                    print(f"   {label}: failed: {error!r:.200}")
            print("   tuning (ms): " + ", ".join(f"{label} {ms:.3f}" for label, ms in tuning.items()))
            results["scores_tuning_ms"] = tuning
    print(f"floor (keys read twice at the copy's bytes/s): {floor_ms:.3f} ms")


def bench_predictor(copy_bw: float, results: dict) -> None:
    """d -> 2d -> d/2 -> 1 MLP with Softplus, no bias, bf16, batch 20: torch eager and CUDA graph vs weight reads."""
    torch.manual_seed(2)
    weights = [torch.randn(out, inp, device="cuda", dtype=torch.bfloat16) / math.sqrt(inp)
               for inp, out in ((HIDDEN, 2 * HIDDEN), (2 * HIDDEN, HIDDEN // 2), (HIDDEN // 2, 1))]
    hidden = torch.randn(BATCH, HIDDEN, device="cuda", dtype=torch.bfloat16)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        for weight in weights:
            x = F.softplus(x @ weight.T)
        return x

    eager_ms = median_ms(lambda: predictor(hidden))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        predictor(hidden)  # warm cuBLAS handles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        predictor(hidden)
    graph_ms = median_ms(graph.replay)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    floor_ms = weight_bytes / copy_bw * 1e3  # weights read once, streaming at the copy's bytes/s
    flops = 2 * BATCH * sum(w.numel() for w in weights)
    print(f"\n== predictor MLP {HIDDEN}->{2 * HIDDEN}->{HIDDEN // 2}->1, batch {BATCH}: {weight_bytes / 1e6:.0f} MB of "
          f"weights, {flops / 1e9:.1f} GFLOP")
    print(f"eager {eager_ms * 1e3:.1f} us, CUDA graph {graph_ms * 1e3:.1f} us, weight-read floor {floor_ms * 1e3:.1f} us "
          f"(eager at {floor_ms / eager_ms:.0%} of the floor's speed)")
    results["predictor"] = dict(eager_us=eager_ms * 1e3, graph_us=graph_ms * 1e3, floor_us=floor_ms * 1e3,
                                weight_mb=weight_bytes / 1e6, gflop=flops / 1e9)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="also write the figures to this file")


def run(args: argparse.Namespace) -> int:
    from dynts.cli import UsageError

    if not torch.cuda.is_available():
        raise UsageError("bench_kernels needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    results: dict = {"device": torch.cuda.get_device_name()}
    copy_bw = copy_bandwidth()
    results["copy_bandwidth"] = copy_bw
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)")
    failed = []
    for section in (lambda: bench_compaction(copy_bw, results), lambda: bench_scores(results),
                    lambda: bench_predictor(copy_bw, results)):
        try:
            section()
        except Exception:  # report and go on: one broken section must not hide the others' figures
            traceback.print_exc()
            failed.append(section)
        torch.cuda.empty_cache()
    print("\n== summary")
    if "compaction_per_head" in results and "compaction_paged" in results:
        shared = results["compaction_shared"]
        print(f"compaction bandwidth / copy bandwidth: {shared['bandwidth_ratio']:.2f} (target >= 0.70); per-head "
              f"lists {results['compaction_per_head']['bandwidth_ratio']:.2f}; paged "
              f"{results['compaction_paged']['bandwidth_ratio']:.2f}")
    scores = results.get(f"scores_w{SCORE_WINDOW}_sum_sum")
    if scores:
        print(f"score kernel vs torch eager (window {SCORE_WINDOW}, {SCORE_KEYS} keys, batch {BATCH}): "
              f"{scores['speedup']:.1f}x faster (target >= 3x), {scores['triton_ms']:.3f} vs {scores['torch_ms']:.2f} ms")
    predictor = results.get("predictor")
    if predictor:
        print(f"predictor MLP: eager {predictor['eager_us']:.0f} us, graph {predictor['graph_us']:.0f} us, floor "
              f"{predictor['floor_us']:.0f} us per decode step")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    if failed:
        print(f"{len(failed)} benchmark section(s) failed (tracebacks above)")
        return 1
    return 0


if __name__ == "__main__":
    from dynts.cli import run_module

    raise SystemExit(run_module(__spec__.name))

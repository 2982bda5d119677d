"""Overhead of the Importance Predictor while decoding: predictor time vs decode time, side by side in one process.

    python -m dynts.evals.bench_predictor --model cpu-medium --device cpu    # CPU figures
    python -m dynts.evals.bench_predictor --model llama-8b --batch-size 20   # on a GPU

Random weights of a real architecture (``bench_decode.SHAPES``, plus ``cpu-medium``; speed does not depend on weight values) and a
randomly initialised head. Three measurements, repeated and interleaved (the median is reported):

* decode with ``DynTSCache`` and a free scorer (``ExternalScorer`` returning zeros): the same cache, the same
  eviction schedule, no predictor: the baseline step time;
* decode with ``DynTSCache`` and ``PredictorScorer``: the step time with the head in the loop (and the cache's
  own scoring timer);
* the head alone on one step's hidden states [batch, 1, d].

Printed: ms per step of both decodes, their ratio, the head's ms per step and its share of a step, and the
FLOPs ratio (head 6 d^2 vs the model's ~2 x parameters per token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ..cli import default_device, device_name, make_settings, positive_int
from ..config import CompressionConfig
from .bench_decode import SHAPES, Shape, build_model

# A shape where matmuls, not per-op overhead, dominate a CPU decode step (~0.2B parameters).
BENCH_SHAPES = SHAPES | {"cpu-medium": Shape("llama", 1024, 8, 16, 4, 4096, 32000)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_ms_per_step(model, prompt: torch.Tensor, new_tokens: int, config: CompressionConfig, scorer) -> tuple[float, float]:
    """(wall ms per decode step, the cache's scoring ms per step) of one forced-length generate."""
    from ..integrations.hf import DynTSCache

    cache = DynTSCache(model, config, scorer=scorer, eos_token_id=[])
    _sync(prompt.device)
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   past_key_values=cache, pad_token_id=0, eos_token_id=None)
    _sync(prompt.device)
    seconds = time.perf_counter() - start
    scoring = cache.stats.scoring_seconds
    cache.detach()
    return 1000 * seconds / new_tokens, 1000 * scoring / new_tokens


@torch.no_grad()
def head_ms(head, batch: int, hidden_size: int, dtype: torch.dtype, device: torch.device, repeats: int = 200) -> float:
    hidden = torch.randn(batch, 1, hidden_size, device=device, dtype=dtype)
    for _ in range(10):
        head(hidden)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        head(hidden)
    _sync(device)
    return 1000 * (time.perf_counter() - start) / repeats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", choices=list(BENCH_SHAPES),
                        help="architecture shape with random weights (bench_decode's shapes, plus cpu-medium)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="rows decoded together")
    parser.add_argument("--prompt-len", type=positive_int, default=16, help="random prompt tokens per row")
    parser.add_argument("--new-tokens", type=positive_int, default=256, help="decoding steps (forced: EOS is ignored)")
    parser.add_argument("--budget", type=int, default=192, help="compact a row when it holds this many tokens; > --window")
    parser.add_argument("--window", type=int, default=64, help="most recent tokens always kept; >= 0")
    parser.add_argument("--keep-ratio", type=float, default=0.3, help="share of the older tokens kept, in (0, 1]")
    parser.add_argument("--repeats", type=positive_int, default=3, help="interleaved repetitions of each decode")
    parser.add_argument("--device", type=device_name, default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    from ..predictor import ImportancePredictor, PredictorScorer
    from ..scorers import ExternalScorer

    config = make_settings(CompressionConfig, budget=args.budget, window=args.window, keep_ratio=args.keep_ratio)
    shape = BENCH_SHAPES[args.model]
    device = torch.device(args.device or default_device())
    model = build_model(shape, str(device))
    if device.type == "cpu":
        model = model.float()  # bf16 matmuls are slow on CPU; the ratio is what matters
    dtype = next(model.parameters()).dtype
    prompt = torch.randint(3, shape.vocab, (args.batch_size, args.prompt_len), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    head = ImportancePredictor.for_model(model)

    def free_scorer():
        return ExternalScorer(lambda hidden, ids: torch.zeros(hidden.shape[:2], device=hidden.device))

    decode_ms_per_step(model, prompt, 8, config, free_scorer())  # warm-up
    baseline, predicted, scoring = [], [], []
    for _ in range(args.repeats):
        baseline.append(decode_ms_per_step(model, prompt, args.new_tokens, config, free_scorer())[0])
        step, score = decode_ms_per_step(model, prompt, args.new_tokens, config, PredictorScorer(head))
        predicted.append(step)
        scoring.append(score)
    head_alone = head_ms(head, args.batch_size, shape.hidden, dtype, device)
    parameters = sum(p.numel() for p in model.parameters())
    base_ms, with_ms = statistics.median(baseline), statistics.median(predicted)
    result = {
        "model": args.model, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "batch_size": args.batch_size, "new_tokens": args.new_tokens, "budget": args.budget, "window": args.window,
        "decode_ms_per_step_free_scorer": round(base_ms, 4),
        "decode_ms_per_step_predictor": round(with_ms, 4),
        "decode_ratio_predictor_vs_free": round(with_ms / base_ms, 4),
        "cache_scoring_ms_per_step_predictor": round(statistics.median(scoring), 4),
        "head_alone_ms_per_step": round(head_alone, 4),
        "head_share_of_step": round(head_alone / base_ms, 5),
        "head_flops_per_token": head.flops_per_token(),
        "model_flops_per_token": 2 * parameters,
        "flops_ratio": round(head.flops_per_token() / (2 * parameters), 5),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from dynts.cli import run_module

    raise SystemExit(run_module(__spec__.name))

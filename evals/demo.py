"""``dynts demo``: the bundled tiny reasoner at a small KV budget, full cache vs dynts vs the attention baselines.

Runs a few held-out synthetic problems (a register machine traced in ~1,000 thinking tokens, whose answer needs
values written hundreds of tokens earlier) with every method at one budget, prints the table and writes the
plots (accuracy per method, throughput and KV memory per decoding step). A few minutes on 2 CPU cores.

    dynts demo
    dynts demo --problems 4 --methods window,dynts      # quicker: fewer problems and methods
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ..cli import (
    UsageError, check_predictor_fits, device_name, load_model, load_tokenizer, make_settings, non_negative_int,
    positive_int, read_predictor, unit_fraction,
)
from .harness import (
    FULL, Sampling, Setting, all_methods, check_scorers, compressed_settings, evaluate, format_table, resolve_methods,
    run_record,
)

# Demo defaults: the task's default config, 25% of its mean thinking length as the budget.
DEMO_PROBLEMS = 16
DEMO_BUDGET_FRACTION = 0.25
DEMO_WINDOW = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problems", type=positive_int, default=DEMO_PROBLEMS, help="held-out synthetic problems")
    parser.add_argument("--budget-fraction", type=unit_fraction, default=DEMO_BUDGET_FRACTION,
                        help="KV budget as a fraction of the mean thinking length of the problems' reference traces")
    parser.add_argument("--window", type=non_negative_int, default=DEMO_WINDOW, help="recent tokens always kept")
    parser.add_argument("--keep-ratio", type=float, default=0.3, help="share of the older tokens a compaction keeps, in (0, 1]")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated, from {', '.join(m for m in all_methods() if m != FULL)}; the full cache "
                             "always runs (default: all of them)")
    parser.add_argument("--predictor", type=Path, default=None,
                        help="importance predictor for method dynts (default: the head shipped with the reasoner)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="rows per generate call")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="generated tokens per answer at most (default: the longest reference solution + 64; "
                             "a lower cap cuts the traces short, so answers are wrong: for quick checks only)")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for results.jsonl and the plots")
    parser.add_argument("--device", type=device_name, default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")


def run(args: argparse.Namespace) -> int:
    from .datasets import load_samples
    from .plots import plot_accuracy_by_method, plot_step_profile, read_results
    from .synthetic_task import bundled_reasoner_path

    # Everything is checked before the model loads.
    model_dir = bundled_reasoner_path()
    methods, predictor_path = resolve_methods(args.methods, args.predictor, model_dir, "synthetic")
    methods = [FULL] + [method for method in methods if method != FULL]
    samples = load_samples("synthetic", limit=args.problems)
    mean_trace = statistics.mean(sample.meta["trace_length"] for sample in samples)
    budget = round(args.budget_fraction * mean_trace)
    origin = f"--budget-fraction {args.budget_fraction:g} gives budget {budget} ({args.budget_fraction:g} x {mean_trace:.0f} thinking tokens)"
    settings = [Setting(FULL)] + compressed_settings(args, methods, {budget: origin})
    max_new_tokens = args.max_new_tokens or max(sample.meta["completion_tokens"] for sample in samples) + 64
    sampling = make_settings(Sampling, max_new_tokens=max_new_tokens, batch_size=args.batch_size)
    head = identity = None
    if predictor_path is not None:
        head, identity = read_predictor(predictor_path, model_dir)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {args.out}: {error}") from error
    tokenizer = load_tokenizer(model_dir)
    check_scorers(settings, tokenizer, synthetic=True)

    model, tokenizer = load_model(model_dir, args.device, tokenizer=tokenizer)
    predictor = None
    if head is not None:
        from dynts.predictor import PredictorScorer

        check_predictor_fits(identity, model, predictor_path)

        def predictor() -> PredictorScorer:  # a cache binds its scorer: one fresh scorer per cache
            return PredictorScorer(head, model=model)

    print(f"bundled reasoner, {len(samples)} synthetic problems, mean thinking length {mean_trace:.0f} tokens; "
          f"budget {budget} ({args.budget_fraction:.0%}), window {args.window}, keep ratio {args.keep_ratio}")
    if predictor is None:
        print("no importance predictor: 'dynts' (the learned predictor) is left out; 'oracle' shows the ceiling")
    results_path = args.out / "results.jsonl"
    run_info = run_record(model_dir, "synthetic", samples, methods, args.window, args.keep_ratio, mean_trace)
    with open(results_path, "w") as out_file:
        out_file.write(json.dumps(run_info) + "\n")
        summaries = evaluate(model, tokenizer, samples, settings, sampling, dataset="synthetic", out_file=out_file,
                             predictor=predictor, progress=args.progress)
    print(format_table(summaries))
    batches = [r for r in read_results(results_path) if r.get("type") == "batch"]
    plot_accuracy_by_method(summaries, args.out / "accuracy_by_method.png", run_info)
    plot_step_profile(batches, args.out / "step_profile.png", run=run_info)
    print(f"results: {results_path}\nplots: {args.out / 'accuracy_by_method.png'}, {args.out / 'step_profile.png'}")
    return 0

"""``dynts demo``: the bundled tiny reasoner at a small KV budget, full cache vs dynts vs the attention baselines.

Runs a few held-out synthetic problems (a register machine traced in ~1,000 thinking tokens, whose answer needs
values written hundreds of tokens earlier) with every method at one budget, prints the table and writes the
plots (accuracy per method, throughput and KV memory per decoding step). A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .harness import DYNTS, FULL, ORACLE, Sampling, Setting, attention_methods, evaluate, format_table, load_model

# Demo defaults: the task's default config, 25% of its mean thinking length as the budget.
DEMO_PROBLEMS = 16
DEMO_BUDGET_FRACTION = 0.25
DEMO_WINDOW = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problems", type=int, default=DEMO_PROBLEMS, help="held-out synthetic problems")
    parser.add_argument("--budget-fraction", type=float, default=DEMO_BUDGET_FRACTION,
                        help="KV budget as a fraction of the mean thinking length")
    parser.add_argument("--window", type=int, default=DEMO_WINDOW)
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--predictor", type=Path, default=None,
                        help="importance predictor for 'dynts' (default: the one shipped with the reasoner, if any)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def run(args: argparse.Namespace) -> int:
    from .datasets import load_samples
    from .harness import load_predictor
    from .plots import plot_accuracy_by_method, plot_step_profile, read_results
    from .synthetic_task import bundled_reasoner_path

    if args.problems < 1:
        raise SystemExit(f"--problems must be >= 1, got {args.problems}")
    if not 0 < args.budget_fraction <= 1:
        raise SystemExit(f"--budget-fraction must be in (0, 1], got {args.budget_fraction}")
    model, tokenizer = load_model("bundled", args.device, None)
    predictor_path = args.predictor or _shipped_predictor(bundled_reasoner_path())
    predictor = load_predictor(predictor_path, model)
    samples = load_samples("synthetic", limit=args.problems)
    mean_trace = sum(sample.meta["trace_length"] for sample in samples) / len(samples)
    budget = round(args.budget_fraction * mean_trace)
    if budget <= args.window:
        raise SystemExit(f"budget {budget} (= {args.budget_fraction} x {mean_trace:.0f}) must exceed --window {args.window}")
    methods = [*attention_methods(), ORACLE] + ([DYNTS] if predictor is not None else [])
    settings = [Setting(FULL)] + [Setting(method, budget, args.window, args.keep_ratio) for method in methods]
    sampling = Sampling(
        max_new_tokens=max(sample.meta["completion_tokens"] for sample in samples) + 64, batch_size=args.batch_size
    )
    print(f"bundled reasoner, {len(samples)} synthetic problems, mean thinking length {mean_trace:.0f} tokens; "
          f"budget {budget} ({args.budget_fraction:.0%}), window {args.window}, keep ratio {args.keep_ratio}")
    if predictor is None:
        print("no importance predictor found: 'dynts' (the learned predictor) is left out; 'oracle' shows the ceiling")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    with open(results_path, "w") as out_file:
        summaries = evaluate(model, tokenizer, samples, settings, sampling, dataset="synthetic", out_file=out_file,
                             predictor=predictor, progress=args.progress)
    print(format_table(summaries))
    records = read_results(results_path)
    plot_accuracy_by_method(summaries, args.out / "accuracy_by_method.png")
    plot_step_profile([r for r in records if r.get("type") == "batch"], args.out / "step_profile.png")
    print(f"results: {results_path}\nplots: {args.out / 'accuracy_by_method.png'}, {args.out / 'step_profile.png'}")
    return 0


def _shipped_predictor(reasoner: Path) -> Path | None:
    path = reasoner / "predictor"
    return path if path.exists() else None

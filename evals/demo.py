"""``dynts demo``: the bundled tiny reasoner at a small KV budget on two task families side by side, full cache vs
the learned predictor (DynTS) vs every baseline vs the oracle.

Held-out synthetic problems (a register machine traced in ~1,000 thinking tokens, whose answer needs values
written hundreds of tokens earlier) in two families: **frequent reuse** (the trace re-reads a saved value every
2 steps, as real traces re-read intermediate results: attention-based scorers can see that it matters) and
**dormant** (a saved value is read again only by a later save and the answer: attention cannot see it). Every
method runs at one budget (budget mode dynts, so every method follows the same eviction schedule: equal mean KV);
the table gives exact match, per-save accuracy, the recall of the saved values at each compaction and the mean KV
measured. Plots: per-save accuracy per method and family, throughput and KV memory per decoding step. A few
minutes on 2 CPU cores.

    dynts demo
    dynts demo --problems 4 --methods window,predictor      # quicker: fewer problems and methods
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..cli import (
    UsageError, check_predictor_fits, device_name, load_model, load_tokenizer, make_settings, non_negative_int,
    positive_int, read_predictor, unit_fraction,
)
from .datasets import Sample
from .harness import (
    FULL, Sampling, Setting, all_methods, check_scorers, evaluate, method_label, resolve_methods, row_scores,
    run_record,
)
from .plots import ordered_methods, read_results
from .synthetic_task import bundled_reasoner_path

DEMO_PROBLEMS = 8
DEMO_BUDGET_FRACTION = 0.25
DEMO_WINDOW = 64
# family name in the tables -> its task settings
DEMO_FAMILIES: dict[str, dict[str, Any]] = {
    "frequent reuse (every 2 steps)": {"family": "reuse", "reuse_every": 2},
    "dormant (read at the end)": {"family": "dormant"},
}


def family_samples(problems: int, families: dict[str, dict[str, Any]]) -> list[Sample]:
    """``problems`` held-out problems of each family, in one list; a sample's id is ``<family>/<index>``. The families
    run as one batch (one ``generate`` per method: the demo's time is one family's), at one budget."""
    from .datasets import load_samples
    from .synthetic_task import TaskConfig

    return [dataclasses.replace(sample, id=f"{name}/{index}")
            for name, fields in families.items()
            for index, sample in enumerate(load_samples("synthetic", limit=problems, synthetic=TaskConfig(**fields)))]


def family_scores(results_path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{family: {method: scores}} from the sample records of a run over ``family_samples``: exact match, the
    harness's ``row_scores`` (per-save accuracy, resident KV per row, critical recall pooled over compactions), and
    the run's compactions."""
    samples: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    compactions = {}
    for record in read_results(results_path):
        if record.get("type") == "sample":
            samples[record["id"].rsplit("/", 1)[0]][record["method"]].append(record)
        elif record.get("type") == "summary":
            compactions[record["method"]] = record.get("compactions")
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for family, by_method in samples.items():
        scores[family] = {}
        for method, rows in by_method.items():
            scores[family][method] = {"method": method, "pass@1": statistics.mean(row["correct"] for row in rows),
                                      **row_scores(rows), "compactions": compactions.get(method)}
    return scores


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problems", type=positive_int, default=DEMO_PROBLEMS, help="held-out synthetic problems per family")
    parser.add_argument("--budget-fraction", type=unit_fraction, default=DEMO_BUDGET_FRACTION,
                        help="KV budget as a fraction of the mean thinking length of the problems' reference traces (both families)")
    parser.add_argument("--window", type=non_negative_int, default=DEMO_WINDOW, help="recent tokens always kept")
    parser.add_argument("--keep-ratio", type=float, default=0.3, help="share of the older tokens a compaction keeps, in (0, 1]")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated, from {', '.join(m for m in all_methods() if m != FULL)}; the full cache "
                             "always runs (default: all of them)")
    parser.add_argument("--predictor", type=Path, default=None,
                        help="importance predictor head for method predictor (default: the head shipped with the reasoner)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="rows per generate call (default: every problem of both families in one batch)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="generated tokens per answer at most (default: the longest reference solution + 64; "
                             "a lower cap cuts the traces short, so answers are wrong: for quick checks only)")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for results.jsonl and the plots")
    parser.add_argument("--device", type=device_name, default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")


def side_by_side(scores: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One row per method; per family: exact match, per-save accuracy, saved-value recall, mean KV (tokens)."""
    names = list(scores)
    methods = [FULL] + ordered_methods(set(scores[names[0]]) - {FULL})
    columns = ("exact", "per-save", "recall", "mean KV")
    rows = []
    for method in methods:
        cells = []
        for name in names:
            s = scores[name][method]
            recall = s["critical_value_recall"]
            cells.append([f"{s['pass@1']:.2f}", f"{s['partial_credit']:.2f}", "-" if recall is None else f"{recall:.2f}",
                          f"{s['mean_resident_tokens']:.0f}"])
        rows.append((method_label(method), cells))
    method_width = max(len("method"), *(len(label) for label, _ in rows))
    widths = [len(column) for column in columns]
    group = "  ".join(column.rjust(width) for column, width in zip(columns, widths))
    group_width = max(len(group), *(len(name) for name in names))
    lines = [" " * method_width + " | " + " | ".join(name.ljust(group_width) for name in names),
             "method".ljust(method_width) + " | " + " | ".join(group.ljust(group_width) for _ in names)]
    lines.append("-" * len(lines[1]))
    for label, cells in rows:
        parts = ["  ".join(cell.rjust(width) for cell, width in zip(family, widths)).ljust(group_width) for family in cells]
        lines.append(label.ljust(method_width) + " | " + " | ".join(parts))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dynts import CompressionConfig

    from .plots import plot_accuracy_by_method, plot_step_profile

    # Everything is checked before the model loads.
    model_dir = bundled_reasoner_path()
    methods, predictor_path = resolve_methods(args.methods, args.predictor, model_dir, "synthetic")
    methods = [FULL] + [method for method in methods if method != FULL]
    samples = family_samples(args.problems, DEMO_FAMILIES)
    mean_trace = statistics.mean(sample.meta["trace_length"] for sample in samples)
    budget = round(args.budget_fraction * mean_trace)
    try:
        make_settings(CompressionConfig, names={"budget": "the budget"}, budget=budget, window=args.window,
                      keep_ratio=args.keep_ratio)
    except UsageError as error:
        raise UsageError(f"--budget-fraction {args.budget_fraction:g} gives budget {budget} ({args.budget_fraction:g} x "
                         f"{mean_trace:.0f} thinking tokens): {error}") from error
    settings = [Setting(FULL)] + [Setting(method, budget, args.window, args.keep_ratio, "dynts") for method in methods[1:]]
    max_new_tokens = args.max_new_tokens or max(sample.meta["completion_tokens"] for sample in samples) + 64
    sampling = make_settings(Sampling, max_new_tokens=max_new_tokens, batch_size=args.batch_size or len(samples))
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

    print(f"bundled reasoner, {args.problems} held-out synthetic problems per family, mean thinking length "
          f"{mean_trace:.0f} tokens; budget {budget} ({args.budget_fraction:.0%}), window {args.window}, keep ratio "
          f"{args.keep_ratio}: every method follows the same eviction schedule")
    if predictor is None:
        print("no importance predictor: 'predictor' (DynTS) is left out; 'oracle' shows the ceiling")
    results_path = args.out / "results.jsonl"
    run_info = run_record(model_dir, "synthetic", samples, methods, mean_trace, window=args.window,
                          keep_ratio=args.keep_ratio, budget_modes=["dynts"], buffer=None)
    run_info["task"] = None  # two families: the tables and plots name them
    with open(results_path, "w") as out_file:
        out_file.write(json.dumps(run_info) + "\n")
        evaluate(model, tokenizer, samples, settings, sampling, dataset="synthetic", out_file=out_file,
                 predictor=predictor, progress=args.progress)
    scores = family_scores(results_path)
    print(side_by_side(scores))
    print("per-save: share of saved values answered right; recall: saved values (any copy) kept at each compaction, "
          "among the older tokens the scorer chose from; mean KV: resident tokens per row")
    title = (f"Per-save accuracy at a budget of {budget} tokens, {args.budget_fraction:.0%} of the mean thinking "
             f"length\n(window {args.window}, keep ratio {args.keep_ratio}; {args.problems} problems per family, "
             "bundled reasoner)")
    bars = plot_accuracy_by_method({name: list(by_method.values()) for name, by_method in scores.items()},
                                   args.out / "accuracy_by_method.png", title)
    batches = [r for r in read_results(results_path) if r.get("type") == "batch"]
    profile = plot_step_profile(batches, args.out / "step_profile.png", run=run_info)
    print(f"results: {results_path}")
    print(f"plots: {bars}" + (f", {profile}" if profile else ""))
    return 0

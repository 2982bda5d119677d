"""Plots and tables of ``dynts eval`` / ``dynts demo`` results (read back from results.jsonl), readable without the
terminal.

- ``accuracy_vs_resident_kv.png``: accuracy per method against the mean resident KV it measured (tokens per row,
  as a share of the mean thinking length when known), one column per budget mode; on the synthetic task per-save
  accuracy and exact match, elsewhere pass@1. The full cache is a star (and a dashed line), the learned predictor
  the thick red line, the oracle a grey dashed one.
- ``accuracy_by_method.png`` (the demo): per-save accuracy per method as labelled bars, one bar per task family.
- ``step_profile.png``: decoding throughput and KV memory against the decoding step, full cache vs the learned
  predictor (without it, the first compressed method of the run), from each one's first batch.
- ``tables.md``: per budget mode and budget, every method's accuracy and critical-token recall, with the mean
  resident KV measured, as Markdown tables.

Titles say the dataset (and synthetic family), the model, the number of problems, the window, keep ratio and buffer,
and the reference length of the shares (from the run's ``{"type": "run"}`` record).

``python -m dynts.evals.plots RESULTS.jsonl [...] --out DIR`` writes them again from one or more results files: a
sweep split over several ``dynts eval`` processes (by ``--methods``, ``--budget-mode`` or ``--resident-fraction``) is
merged into ``DIR/results.jsonl`` first (the same task and problems, each (method, mode, budget) once). Each setting
runs on its own (its budget and its generation seed do not depend on the others), so a split sweep gives the same
results as one ``dynts eval`` with every option.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .harness import FULL, ORACLE, PREDICTOR
from .harness import method_label as label

# Column order of tables and legends: the learned predictor, its ceiling, then the baselines (others after them).
METHOD_ORDER = (PREDICTOR, ORACLE, "h2o", "snapkv", "rkv", "tova", "streamingllm", "sepllm", "window", "random")
MARKERS = "os^vDP*X<>ph"
# Red belongs to the predictor alone, grey to the oracle; the baselines take the rest of matplotlib's colours.
OTHER_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
MOVING_AVERAGE_STEPS = 16
KV_SOURCES = {
    "cache_accounting": "the caches' own accounting of held K/V",
    "allocator": "the CUDA allocator, above its level before generate (activations included)",
}


def read_results(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def ordered_methods(methods: set[str]) -> list[str]:
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= width:
            total -= values[index - width]
        out.append(total / min(index + 1, width))
    return out


def _style(method: str, index: int) -> dict[str, Any]:
    if method == PREDICTOR:
        return dict(color="tab:red", linewidth=2.6, markersize=7, marker="o", zorder=4)
    if method == ORACLE:
        return dict(color="tab:gray", linewidth=1.4, linestyle="--", markersize=5, marker="s", zorder=3)
    return dict(color=OTHER_COLORS[index % len(OTHER_COLORS)], linewidth=1.0, markersize=5,
                marker=MARKERS[index % len(MARKERS)], zorder=2)


def trace_reference(summaries: list[dict[str, Any]], run: dict[str, Any] | None) -> tuple[float | None, str]:
    """The length shares refer to, and what it is: the run's mean thinking length (reference traces on synthetic,
    full-cache outputs elsewhere), else the full cache's mean output length, else unknown (None)."""
    if run and run.get("trace_tokens"):
        return float(run["trace_tokens"]), f"mean thinking length, {run.get('trace_tokens_source', 'measured')}"
    full = next((s for s in summaries if s["method"] == FULL), None)
    if full is not None and full.get("mean_new_tokens"):
        return float(full["mean_new_tokens"]), "mean full-cache output length"
    return None, ""


def task_name(run: dict[str, Any] | None, summaries: list[dict[str, Any]]) -> str:
    """'synthetic, family reuse (re-read every 2 steps)' or the dataset's name."""
    run = run or {}
    dataset = run.get("dataset") or summaries[0].get("dataset", "?")
    task = run.get("task")
    if not task:
        return dataset
    family = task["family"] + (f" (re-read every {task['reuse_every']} steps)" if task.get("reuse_every") else "")
    return f"{dataset}, family {family}"


def run_subtitle(summaries: list[dict[str, Any]], run: dict[str, Any] | None) -> str:
    """Two lines: what ran ('synthetic, family dormant, 24 problems, model bundled') and how ('window 64; dynts
    mode: keep ratio 0.3; fixed mode: buffer 32; % = share of the mean thinking length, reference traces (1030
    tokens)')."""
    first = summaries[0]
    what = f"{task_name(run, summaries)}, {first['problems']} problems"
    what += f" x {first['samples']} samples" if first.get("samples", 1) > 1 else ""
    what += f", model {run['model']}" if run and run.get("model") else ""
    how = []
    compressed = [s for s in summaries if s["method"] != FULL]
    if compressed:
        how.append(f"window {', '.join(map(str, sorted({s['window'] for s in compressed})))}")
        ratios = sorted({s["keep_ratio"] for s in compressed if s.get("budget_mode") == "dynts"})
        buffers = sorted({s["buffer"] for s in compressed if s.get("budget_mode") == "fixed"})
        how += [f"dynts mode: keep ratio {', '.join(map(str, ratios))}"] if ratios else []
        how += [f"fixed mode: buffer {', '.join(map(str, buffers))}"] if buffers else []
    reference, source = trace_reference(summaries, run)
    if reference is not None:
        how.append(f"% = share of the {source} ({reference:.0f} tokens)")
    return "\n".join([what, "; ".join(how)] if how else [what])


def _share(tokens: float, reference: float | None) -> float:
    return tokens if reference is None else 100 * tokens / reference


def plot_accuracy_vs_resident_kv(summaries: list[dict[str, Any]], path: Path, run: dict[str, Any] | None = None) -> Path:
    """Accuracy of every method against its measured mean resident KV, one column per budget mode."""
    plt = _pyplot()
    compressed = [s for s in summaries if s["method"] != FULL]
    modes = sorted({s["budget_mode"] for s in compressed})
    methods = ordered_methods({s["method"] for s in compressed})
    synthetic = (run or {}).get("dataset", summaries[0].get("dataset")) == "synthetic"
    metrics = [("partial_credit", "per-save accuracy"), ("pass@1", "exact match (pass@1)")] if synthetic else [("pass@1", "pass@1")]
    reference, _ = trace_reference(summaries, run)
    full = next((s for s in summaries if s["method"] == FULL), None)
    figure, axes = plt.subplots(len(metrics), len(modes), figsize=(5.0 * len(modes) + 1.8, 3.4 * len(metrics) + 0.8),
                                squeeze=False, sharex=True, sharey=True, layout="constrained")
    for column, mode in enumerate(modes):
        for row, (key, name) in enumerate(metrics):
            axis = axes[row][column]
            if full is not None:
                axis.axhline(full[key], color="black", linestyle="--", linewidth=1.0)
                axis.plot([_share(full["mean_resident_tokens"], reference)], [full[key]], marker="*", markersize=12,
                          color="black", linestyle="none", label=f"{label(FULL)} ({full[key]:.2f})", zorder=5)
            for index, method in enumerate(methods):
                points = sorted((_share(s["mean_resident_tokens"], reference), s[key])
                                for s in compressed if s["method"] == method and s["budget_mode"] == mode)
                axis.plot([x for x, _ in points], [y for _, y in points], label=label(method), clip_on=False,
                          **_style(method, index))
            axis.set_ylim(-0.04, 1.04)
            axis.grid(alpha=0.3)
            if row == 0:
                axis.set_title(f"budget mode {mode}", fontsize=9)
            if column == 0:
                axis.set_ylabel(name)
            if row == len(metrics) - 1:
                axis.set_xlabel("mean resident KV per row, " + ("% of thinking length" if reference is not None else "tokens"))
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="outside right center", title="method", title_fontsize=8)
    figure.suptitle(f"Accuracy vs mean resident KV (measured)\n{run_subtitle(summaries, run)}", fontsize=9)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_accuracy_by_method(families: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Per-save accuracy per method as labelled bars, one bar per family (``{family name: its summaries}``, each at
    one budget), the full cache first."""
    plt = _pyplot()
    names = list(families)
    methods = [FULL] + ordered_methods({s["method"] for group in families.values() for s in group} - {FULL})
    width = 0.8 / len(names)
    figure, axis = plt.subplots(figsize=(1.0 + 0.75 * len(methods) * max(1, len(names) / 2), 4.6))
    hatches = ("", "//", "..", "xx")
    for offset, name in enumerate(names):
        values = {s["method"]: s["partial_credit"] for s in families[name]}
        xs = [index + (offset - (len(names) - 1) / 2) * width for index in range(len(methods))]
        ys = [values.get(method, 0.0) for method in methods]
        colors = ["black" if m == FULL else "tab:red" if m == PREDICTOR else "tab:gray" if m == ORACLE else "tab:blue"
                  for m in methods]
        axis.bar(xs, ys, width=width * 0.92, color=colors, hatch=hatches[offset % len(hatches)], edgecolor="white")
        # A bar of height 0 is invisible: write every value above its bar.
        for x, y in zip(xs, ys):
            axis.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=6.5,
                          rotation=90 if len(names) > 1 else 0)
    axis.set_xticks(range(len(methods)), [label(m) for m in methods], rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("per-save accuracy (share of saved values right)")
    axis.set_ylim(0, 1.18)
    axis.grid(axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    # Families differ by hatching only (colours tell the methods apart): neutral swatches.
    swatches = [Patch(facecolor="white", edgecolor="black", hatch=hatches[offset % len(hatches)]) for offset in range(len(names))]
    axis.legend(swatches, names, fontsize=8, loc="upper right", title="family", title_fontsize=8)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_step_profile(batches: list[dict[str, Any]], path: Path, compressed_method: str | None = None,
                      run: dict[str, Any] | None = None) -> Path | None:
    """Throughput and KV bytes per decoding step of the full cache and one compressed method (first batches)."""
    first: dict[tuple[str, Any, Any], dict[str, Any]] = {}
    for batch in batches:
        first.setdefault((batch["method"], batch.get("budget_mode"), batch["budget"]), batch)
    full = next((b for (method, _, _), b in first.items() if method == FULL), None)
    compressed = [b for (method, _, _), b in first.items() if method != FULL]
    if compressed_method is not None:
        compressed = [b for b in compressed if b["method"] == compressed_method]
    elif any(b["method"] == PREDICTOR for b in compressed):
        compressed = [b for b in compressed if b["method"] == PREDICTOR]
    if full is None or not compressed:
        return None
    plt = _pyplot()
    chosen = min(compressed, key=lambda b: b["budget"])
    reference = (run or {}).get("trace_tokens")
    share = f", {chosen['budget'] / reference:.0%} of the mean thinking length" if reference else ""
    styles = (
        (full, label(FULL), dict(color="black", linestyle="-", marker="o")),
        (chosen, f"{label(chosen['method'])} (budget {chosen['budget']} tokens{share}, mode {chosen.get('budget_mode')})",
         dict(color="tab:red", linestyle="--", marker="s")),
    )
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for batch, text, style in styles:
        steps = batch["step_seconds"]
        every = max(1, len(steps) // 12)
        throughput = [batch["rows"] / max(seconds, 1e-9) for seconds in steps]
        speed.plot(range(1, len(steps) + 1), _moving_average(throughput, MOVING_AVERAGE_STEPS), label=text,
                   markevery=every, markersize=4, linewidth=1.3, **style)
        if batch.get("step_kv_bytes"):
            kv = batch["step_kv_bytes"]
            memory.plot(range(1, len(kv) + 1), [value / 1e6 for value in kv], label=text,
                        markevery=max(1, len(kv) // 12), markersize=4, linewidth=1.3, **style)
    speed.set_xlabel("decoding step")
    speed.set_ylabel(f"throughput (tokens/s over the batch, {MOVING_AVERAGE_STEPS}-step moving average)", fontsize=8)
    speed.set_ylim(bottom=0)
    memory.set_xlabel("decoding step")
    memory.set_ylabel("KV cache memory (MB)")
    memory.set_ylim(bottom=0)
    for axis in (speed, memory):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    source = KV_SOURCES.get(full.get("kv_bytes_source"), str(full.get("kv_bytes_source")))
    model = f", model {run['model']}" if run and run.get("model") else ""
    figure.suptitle(f"Throughput and KV memory per decoding step: first batch ({full['rows']} rows) of "
                    f"{task_name(run, [full])}{model}\nKV memory from {source}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------- tables


def _kv_text(tokens: float, reference: float | None) -> str:
    return f"{tokens:.0f} tokens" + ("" if reference is None else f" ({tokens / reference:.0%})")


def markdown_tables(summaries: list[dict[str, Any]], run: dict[str, Any] | None = None) -> str:
    """Markdown: the run's description and the full cache's line, then two tables with one row per budget mode and
    budget: accuracy (per-save on synthetic, else pass@1) / critical-value recall, and exact match / critical-token
    recall. The measured mean resident KV per row is given as the range over the row's methods; the best accuracy
    of a row (oracle aside) is in bold."""
    reference, _ = trace_reference(summaries, run)
    compressed = [s for s in summaries if s["method"] != FULL]
    methods = ordered_methods({s["method"] for s in compressed})
    lines = [f"**{task_name(run, summaries)}**, {summaries[0]['problems']} problems"
             + (f", model {run['model']}" if run and run.get("model") else "") + "; "
             + run_subtitle(summaries, run).splitlines()[-1] + "."]
    full = next((s for s in summaries if s["method"] == FULL), None)
    if full is not None:
        lines.append(f"Full cache: exact match {full['pass@1']:.2f}, per-item credit {full['partial_credit']:.2f}, "
                     f"mean resident KV {_kv_text(full['mean_resident_tokens'], reference)}, peak "
                     f"{full['peak_resident_tokens']}.")
    cells = {(s["budget_mode"], s["budget"], s["method"]): s for s in compressed}
    keys = sorted({(s["budget_mode"], s["budget"]) for s in compressed}, key=lambda key: (key[0] != "dynts", key))
    tables = (("partial_credit", "critical_value_recall", "per-save accuracy / critical-value recall"),
              ("pass@1", "critical_token_recall", "exact match / critical-token recall"))
    for accuracy_key, recall_key, caption in tables:
        lines += ["", f"{caption} (recall: per compaction, among the older tokens the scorer chose from; - : none "
                      "measured)", ""]
        header = ["target mean KV", "mode, budget", "measured mean KV"] + [label(m) for m in methods]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for mode, budget in keys:
            row = [cells[(mode, budget, m)] for m in methods if (mode, budget, m) in cells]
            target = row[0].get("resident_fraction")
            means = [s["mean_resident_tokens"] for s in row]
            measured = f"{min(means):.0f}-{max(means):.0f}" if round(min(means)) != round(max(means)) else f"{means[0]:.0f}"
            if reference is not None:
                low, high = f"{min(means) / reference:.0%}", f"{max(means) / reference:.0%}"
                measured += f" ({low})" if low == high else f" ({low}-{high})"
            values = [s[accuracy_key] for s in row if s["method"] != ORACLE]
            # Bold the best (oracle aside), unless every method ties.
            best = max(values) if values and min(values) < max(values) else None
            texts = []
            for method in methods:
                s = cells.get((mode, budget, method))
                if s is None:
                    texts.append("")
                    continue
                value = f"{s[accuracy_key]:.2f}"
                value = f"**{value}**" if method != ORACLE and s[accuracy_key] == best else value
                recall = "-" if s.get(recall_key) is None else f"{s[recall_key]:.2f}"
                texts.append(f"{value} / {recall}")
            lines.append("| " + " | ".join([f"{target:.0%}" if target is not None else "-", f"{mode}, {budget}",
                                            measured] + texts) + " |")
    return "\n".join(lines) + "\n"


def write_tables(results_path: str | Path, path: str | Path) -> Path:
    """``markdown_tables`` of one results.jsonl, written to ``path``."""
    records = read_results(results_path)
    run = next((r for r in reversed(records) if r.get("type") == "run"), None)
    summaries = [r for r in records if r.get("type") == "summary"]
    Path(path).write_text(markdown_tables(summaries, run) if summaries else "no results\n")
    return Path(path)


def plot_results(results_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the plots of one results.jsonl into ``out_dir``; returns the files written."""
    records = read_results(results_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = next((r for r in reversed(records) if r.get("type") == "run"), None)
    written = []
    summaries = [r for r in records if r.get("type") == "summary"]
    if any(s["method"] != FULL for s in summaries):
        written.append(plot_accuracy_vs_resident_kv(summaries, out / "accuracy_vs_resident_kv.png", run))
    profile = plot_step_profile([r for r in records if r.get("type") == "batch"], out / "step_profile.png", run=run)
    if profile is not None:
        written.append(profile)
    return written


# Run-record fields that list what ran (merged as a union); every other field must agree between merged files.
_LISTED_RUN_FIELDS = ("methods", "budget_modes")


def results_file(path: Path) -> Path:
    """A results.jsonl given as itself or as the --out folder holding it."""
    return path / "results.jsonl" if path.is_dir() else path


def merge_results(paths: list[Path]) -> list[dict[str, Any]]:
    """The records of several results files of one sweep: one merged run record, then every other record. A
    UsageError (naming the files) when their runs differ or a (method, budget mode, budget) appears twice."""
    from ..cli import UsageError

    runs, others, seen = [], [], {}
    for path in map(results_file, paths):
        try:
            records = read_results(path)
        except (OSError, json.JSONDecodeError) as error:
            raise UsageError(f"{path}: {error}") from error
        runs += [(path, r) for r in records if r.get("type") == "run"]
        for record in records:
            if record.get("type") == "summary":
                key = (record["method"], record.get("budget_mode"), record.get("budget"))
                if key in seen:
                    raise UsageError(f"method {key[0]}, budget mode {key[1]}, budget {key[2]} is in both {seen[key]} "
                                     f"and {path}")
                seen[key] = path
        others += [r for r in records if r.get("type") != "run"]
    if not runs:
        raise UsageError(f"no run record in {', '.join(map(str, paths))}: not dynts eval results")
    merged = dict(runs[0][1])
    for path, run in runs[1:]:
        for field in dict.fromkeys([*merged, *run]):  # in record order: the first difference is named
            if field in _LISTED_RUN_FIELDS:
                merged[field] = list(dict.fromkeys((merged.get(field) or []) + (run.get(field) or [])))
            elif merged.get(field) is None:
                merged[field] = run.get(field)
            elif run.get(field) is not None and run[field] != merged[field]:
                raise UsageError(f"{runs[0][0]} and {path} are different runs: {field} {merged[field]!r} vs {run[field]!r}")
    return [merged] + others


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path, nargs="+",
                        help="results.jsonl files of dynts eval, or the --out folders holding them (one run, or the "
                             "parts of a sweep)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the merged results.jsonl (with several files), tables.md and the plots")


def run(args: argparse.Namespace) -> int:
    from ..cli import UsageError

    records = merge_results(args.results)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {args.out}: {error}") from error
    results_path = args.out / "results.jsonl"
    sources = [results_file(path) for path in args.results]
    if len(sources) > 1 or sources[0].resolve() != results_path.resolve():
        results_path.write_text("".join(json.dumps(record) + "\n" for record in records))
    print(f"results: {results_path}\ntables: {write_tables(results_path, args.out / 'tables.md')}")
    for path in plot_results(results_path, args.out):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    from dynts.cli import run_module

    raise SystemExit(run_module(__spec__.name))

"""Plots of ``dynts eval`` / ``dynts demo`` results (read back from results.jsonl), readable without the terminal.

- ``accuracy_vs_budget.png``: pass@1 per method at each KV budget (tokens, and share of the mean thinking length);
  the full cache as a dashed line. Methods are told apart by marker and a small sideways offset, so equal values
  (often 0) stay visible.
- ``accuracy_by_method.png``: pass@1 per method at one budget, every bar labelled with its value (a 0 shows as a
  marker and "0.00").
- ``step_profile.png``: decoding throughput and KV memory against the decoding step, full cache vs dynts (the
  learned predictor; without it, the first compressed method of the run), from each one's first batch.

Titles say the dataset, the model, the number of problems, the budget in tokens and as a share of the mean
thinking length, the window and the keep ratio (from the run's ``{"type": "run"}`` record).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FULL = "full"
DYNTS = "dynts"
MARKERS = "os^vDP*X<>ph"
# Red belongs to dynts alone; the other methods take the rest of matplotlib's default colours.
OTHER_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
ORACLE = "oracle"
BAR_COLORS = {FULL: ("black", "full cache"), DYNTS: ("tab:red", "dynts (learned predictor)"),
              ORACLE: ("tab:gray", "oracle (keeps the needed tokens: the ceiling)")}
BASELINE = ("tab:blue", "attention / positional baselines")
MOVING_AVERAGE_STEPS = 16
KV_SOURCES = {
    "cache_accounting": "the caches' own accounting of held K/V",
    "allocator": "the CUDA allocator, above its level before generate (activations included)",
}


def read_results(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


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


def trace_reference(summaries: list[dict[str, Any]], run: dict[str, Any] | None) -> tuple[float | None, str]:
    """The length budgets are a share of, and what it is: the run's mean thinking length (reference traces on
    synthetic, full-cache outputs elsewhere), else the full cache's mean output length, else unknown (None)."""
    if run and run.get("trace_tokens"):
        return float(run["trace_tokens"]), f"mean thinking length, {run.get('trace_tokens_source', 'measured')}"
    full = next((s for s in summaries if s["method"] == FULL), None)
    if full is not None and full.get("mean_new_tokens"):
        return float(full["mean_new_tokens"]), "mean full-cache output length"
    return None, ""


def budget_label(budget: int, reference: float | None) -> str:
    return f"{budget} tokens" if reference is None else f"{budget} tokens\n{budget / reference:.0%}"


def run_subtitle(summaries: list[dict[str, Any]], run: dict[str, Any] | None) -> str:
    """Two lines: 'synthetic, 24 problems, model bundled' and 'window 64, keep ratio 0.3; % = share of the mean
    thinking length, reference traces (1011 tokens)'."""
    first = summaries[0]
    run = run or {}
    what = f"{run.get('dataset') or first.get('dataset', '?')}, {first['problems']} problems"
    what += f" x {first['samples']} samples" if first.get("samples", 1) > 1 else ""
    what += f", model {run['model']}" if run.get("model") else ""
    how = []
    compressed = [s for s in summaries if s["method"] != FULL]
    if compressed:
        windows = sorted({s["window"] for s in compressed})
        ratios = sorted({s["keep_ratio"] for s in compressed})
        how.append(f"window {', '.join(map(str, windows))} tokens, keep ratio {', '.join(map(str, ratios))}")
    reference, source = trace_reference(summaries, run)
    if reference is not None:
        how.append(f"% = share of the {source} ({reference:.0f} tokens)")
    return "\n".join([what, "; ".join(how)] if how else [what])


def plot_accuracy_vs_budget(summaries: list[dict[str, Any]], path: Path, run: dict[str, Any] | None = None) -> Path:
    """pass@1 of every compressed method at each budget (budgets evenly spaced, labelled in tokens and %)."""
    plt = _pyplot()
    budgets = sorted({s["budget"] for s in summaries if s["method"] != FULL})
    methods = sorted({s["method"] for s in summaries if s["method"] != FULL}, key=lambda m: (m != DYNTS, m))
    reference, _ = trace_reference(summaries, run)
    figure, axis = plt.subplots(figsize=(8.6, 4.8))
    full = next((s for s in summaries if s["method"] == FULL), None)
    if full is not None:
        axis.axhline(full["pass@1"], color="black", linestyle="--", linewidth=1.2, label=f"full cache ({full['pass@1']:.2f})")
    # Each method sits at its own small offset around the budget's position, so equal values do not hide each other.
    spread = 0.6
    for index, method in enumerate(methods):
        offset = (index - (len(methods) - 1) / 2) * spread / max(1, len(methods) - 1) if len(methods) > 1 else 0.0
        points = sorted((budgets.index(s["budget"]), s["pass@1"]) for s in summaries if s["method"] == method)
        axis.plot([x + offset for x, _ in points], [y for _, y in points], marker=MARKERS[index % len(MARKERS)],
                  markersize=7 if method == DYNTS else 5.5, linewidth=2.4 if method == DYNTS else 1.0,
                  color="tab:red" if method == DYNTS else OTHER_COLORS[index % len(OTHER_COLORS)], label=method, clip_on=False, zorder=3 if method == DYNTS else 2)
    axis.set_xticks(range(len(budgets)), [budget_label(budget, reference) for budget in budgets])
    axis.set_xlim(-0.6, len(budgets) - 0.4)
    axis.set_xlabel("KV budget per sequence: tokens, and % of the reference length named in the title")
    axis.set_ylabel("pass@1 (share of problems solved)")
    axis.set_ylim(-0.04, 1.04)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="method", title_fontsize=8)
    axis.set_title(f"Accuracy vs KV budget\n{run_subtitle(summaries, run)}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_accuracy_by_method(summaries: list[dict[str, Any]], path: Path, run: dict[str, Any] | None = None) -> Path:
    """pass@1 per method as labelled bars (one budget), the full cache first, then best to worst."""
    plt = _pyplot()
    ordered = sorted(summaries, key=lambda s: (s["method"] != FULL, -s["pass@1"], s["method"]))
    labels = [s["method"] if s["budget"] is None or len({x["budget"] for x in ordered if x["budget"]}) == 1
              else f"{s['method']}@{s['budget']}" for s in ordered]
    values = [s["pass@1"] for s in ordered]
    colors = [BAR_COLORS.get(s["method"], BASELINE)[0] for s in ordered]
    figure, axis = plt.subplots(figsize=(8, 4.4))
    positions = range(len(ordered))
    axis.bar(positions, values, color=colors, width=0.7)
    # A bar of height 0 is invisible: mark every value on the axis too, and write it above the bar.
    axis.scatter(positions, values, marker="_", s=250, color=colors, linewidths=2.5, zorder=3, clip_on=False)
    for position, value in zip(positions, values):
        axis.annotate(f"{value:.2f}", (position, value), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    axis.set_xticks(list(positions), labels, rotation=30, ha="right")
    from matplotlib.patches import Patch

    shown = [BAR_COLORS[m] for m in BAR_COLORS if any(s["method"] == m for s in ordered)]
    shown += [BASELINE] if any(s["method"] not in BAR_COLORS for s in ordered) else []
    axis.legend([Patch(color=color) for color, _ in shown], [text for _, text in shown], fontsize=7, loc="upper right")
    axis.set_ylabel("pass@1 (share of problems solved)")
    axis.set_ylim(0, 1.12)
    axis.grid(axis="y", alpha=0.3)
    budgets = sorted({s["budget"] for s in ordered if s["budget"] is not None})
    reference, _ = trace_reference(summaries, run)
    budget_text = ", ".join(f"{b} tokens" + ("" if reference is None else f" ({b / reference:.0%})") for b in budgets)
    axis.set_title(f"Accuracy per method at KV budget {budget_text or '-'}\n{run_subtitle(summaries, run)}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_step_profile(batches: list[dict[str, Any]], path: Path, compressed_method: str | None = None,
                      run: dict[str, Any] | None = None) -> Path | None:
    """Throughput and KV bytes per decoding step of the full cache and one compressed method (first batches)."""
    first: dict[tuple[str, Any], dict[str, Any]] = {}
    for batch in batches:
        first.setdefault((batch["method"], batch["budget"]), batch)
    full = next((b for (method, _), b in first.items() if method == FULL), None)
    compressed = [b for (method, _), b in first.items() if method != FULL]
    if compressed_method is not None:
        compressed = [b for b in compressed if b["method"] == compressed_method]
    elif any(b["method"] == DYNTS for b in compressed):
        compressed = [b for b in compressed if b["method"] == DYNTS]
    if full is None or not compressed:
        return None
    plt = _pyplot()
    chosen = min(compressed, key=lambda b: b["budget"])
    reference = (run or {}).get("trace_tokens")
    share = f", {chosen['budget'] / reference:.0%} of the mean thinking length" if reference else ""
    styles = (
        (full, "full cache", dict(color="black", linestyle="-", marker="o")),
        (chosen, f"{chosen['method']} (budget {chosen['budget']} tokens{share})", dict(color="tab:red", linestyle="--", marker="s")),
    )
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for batch, label, style in styles:
        steps = batch["step_seconds"]
        every = max(1, len(steps) // 12)
        throughput = [batch["rows"] / max(seconds, 1e-9) for seconds in steps]
        speed.plot(range(1, len(steps) + 1), _moving_average(throughput, MOVING_AVERAGE_STEPS), label=label,
                   markevery=every, markersize=4, linewidth=1.3, **style)
        if batch.get("step_kv_bytes"):
            kv = batch["step_kv_bytes"]
            memory.plot(range(1, len(kv) + 1), [value / 1e6 for value in kv], label=label,
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
                    f"{(run or {}).get('dataset', full.get('dataset', '?'))}{model}\nKV memory from {source}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_results(results_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the plots of one results.jsonl into ``out_dir``; returns the files written."""
    records = read_results(results_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = next((r for r in reversed(records) if r.get("type") == "run"), None)
    written = []
    summaries = [r for r in records if r.get("type") == "summary"]
    if any(s["method"] != FULL for s in summaries):
        written.append(plot_accuracy_vs_budget(summaries, out / "accuracy_vs_budget.png", run))
    profile = plot_step_profile([r for r in records if r.get("type") == "batch"], out / "step_profile.png", run=run)
    if profile is not None:
        written.append(profile)
    return written

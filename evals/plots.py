"""Plots of ``dynts eval`` results (read back from its results.jsonl).

- ``accuracy_vs_budget.png``: pass@1 per method against the KV budget; the full cache as a dashed line.
- ``step_profile.png``: decoding throughput and KV memory against the decoding step, full cache vs dynts (the
  learned predictor; without it, the first compressed method of the run), from each one's first batch.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

FULL = "full"


def read_results(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= width:
            total -= values[index - width]
        out.append(total / min(index + 1, width))
    return out


def plot_accuracy_vs_budget(summaries: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for summary in summaries:
        if summary["method"] == FULL:
            axis.axhline(summary["pass@1"], color="black", linestyle="--", label="full cache")
        else:
            curves[summary["method"]].append((summary["budget"], summary["pass@1"]))
    for method, points in sorted(curves.items()):
        points.sort()
        axis.plot([b for b, _ in points], [a for _, a in points], marker="o", label=method,
                  linewidth=2.5 if method == "dynts" else 1.2)
    axis.set_xlabel("KV budget (tokens)")
    axis.set_ylabel("pass@1")
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    axis.set_title("accuracy vs KV budget")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_accuracy_by_method(summaries: list[dict[str, Any]], path: Path) -> Path:
    """pass@1 per method as bars (one budget), the full cache first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(summaries, key=lambda s: (s["method"] != FULL, -s["pass@1"], s["method"]))
    figure, axis = plt.subplots(figsize=(7, 3.8))
    colors = ["black" if s["method"] == FULL else "tab:red" if s["method"] == "dynts" else "tab:blue" for s in ordered]
    axis.bar(range(len(ordered)), [s["pass@1"] for s in ordered], color=colors)
    axis.set_xticks(range(len(ordered)), [s["method"] for s in ordered], rotation=30, ha="right")
    axis.set_ylabel("pass@1")
    axis.set_ylim(0, 1.05)
    budgets = sorted({s["budget"] for s in ordered if s["budget"] is not None})
    axis.set_title(f"accuracy per method at KV budget {', '.join(map(str, budgets))}")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_step_profile(batches: list[dict[str, Any]], path: Path, compressed_method: str | None = None) -> Path | None:
    """Throughput and KV bytes per decoding step of the full cache and one compressed method (first batches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first: dict[tuple[str, Any], dict[str, Any]] = {}
    for batch in batches:
        first.setdefault((batch["method"], batch["budget"]), batch)
    full = next((b for (method, _), b in first.items() if method == FULL), None)
    compressed = [b for (method, _), b in first.items() if method != FULL]
    if compressed_method is not None:
        compressed = [b for b in compressed if b["method"] == compressed_method]
    elif any(b["method"] == "dynts" for b in compressed):
        compressed = [b for b in compressed if b["method"] == "dynts"]
    if full is None or not compressed:
        return None
    chosen = min(compressed, key=lambda b: b["budget"])
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(10, 3.8))
    for batch, label in ((full, "full cache"), (chosen, f"{chosen['method']} (budget {chosen['budget']})")):
        steps = batch["step_seconds"]
        throughput = [batch["rows"] / max(seconds, 1e-9) for seconds in steps]
        speed.plot(range(1, len(steps) + 1), _moving_average(throughput, 16), label=label)
        if batch.get("step_kv_bytes"):
            memory.plot(range(1, len(batch["step_kv_bytes"]) + 1), [b / 1e6 for b in batch["step_kv_bytes"]], label=label)
    speed.set_xlabel("decoding step")
    speed.set_ylabel("tokens/s (batch, 16-step average)")
    speed.grid(alpha=0.3)
    speed.legend(fontsize=8)
    memory.set_xlabel("decoding step")
    memory.set_ylabel(f"KV MB ({full.get('kv_bytes_source', '?')})")
    memory.grid(alpha=0.3)
    memory.legend(fontsize=8)
    figure.suptitle(f"throughput and KV memory per decoding step ({full['rows']} rows)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_results(results_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the plots of one results.jsonl into ``out_dir``; returns the files written."""
    records = read_results(results_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    summaries = [r for r in records if r.get("type") == "summary"]
    if summaries:
        written.append(plot_accuracy_vs_budget(summaries, out / "accuracy_vs_budget.png"))
    profile = plot_step_profile([r for r in records if r.get("type") == "batch"], out / "step_profile.png")
    if profile is not None:
        written.append(profile)
    return written

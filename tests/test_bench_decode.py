"""The decode benchmark script on the tiny shape (CPU smoke test) and its step bookkeeping on hand-made traces."""

from __future__ import annotations

import json
import math

import pytest

from dynts.cli import run_module
from dynts.evals.bench_decode import Settings, compaction_spikes, compaction_steps

BUDGET, WINDOW, KEEP_RATIO, BATCH, PROMPT, POINT_WINDOW = 48, 16, 0.3, 2, 8, 5
# 90 lies past the dynts run (the first compaction, then one period): measured whole periods earlier.
POINTS = (40, 90)


def test_compaction_steps_are_the_steps_whose_lengths_drop():
    # lengths before each step (two rows); row 1 is compacted by step 1's bookkeeping, both rows by step 3's
    held = [[5, 9], [6, 10], [7, 4], [8, 5], [3, 3], [4, 4]]
    assert compaction_steps(held) == [1, 3]
    assert compaction_steps([[5], [6], [7]]) == []


def test_compaction_spikes_against_the_intervals_before_them():
    # Synchronisation intervals: their steps take 10 ms each on the device (interval 2's 20 ms: merely slow), their
    # synchronisations 2 ms, or 42 ms for those of intervals 4 and 6, which compacted; interval 0 captured the graph.
    intervals = [5, 4, 4, 4, 3, 4, 4, 4]
    device_ms = [100.0, 10.0, 20.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    sync_ms = [2.0, 2.0, 2.0, 2.0, 42.0, 2.0, 42.0, 2.0]
    seconds = [(count * step + sync) / count / 1000 for count, step, sync in zip(intervals, device_ms, sync_ms)
               for _ in range(count)]
    spikes = compaction_spikes(seconds, intervals, [ms / 1000 for ms in sync_ms], [2, 19, 27])
    assert [spike["step"] for spike in spikes] == [19, 27]  # step 2 is in the capture's interval: not measured
    for spike in spikes:
        assert spike["step_ms"] == pytest.approx(10.0)
        assert spike["compaction_ms"] == pytest.approx(40.0)
        assert spike["spike"] == pytest.approx(5.0)  # 10 ms + 40 ms of compaction, over 10 ms
    # the interval's time per step over the median of intervals 1-3 (10.5, 20.5, 10.5 ms per step)
    assert spikes[0]["interval_steps"] == 3 and spikes[0]["interval_ms"] == pytest.approx(72.0)
    assert spikes[0]["interval_ratio"] == pytest.approx(24.0 / 10.5)
    # interval 6's neighbours: 3 and 5 (not 4, which compacted; not 7, after it)
    assert spikes[1]["interval_ratio"] == pytest.approx(20.5 / 10.5)


@pytest.mark.parametrize("change, message", [
    (dict(points=(10, 70)), "points must be > prompt_len"),
    (dict(models=("llama-70b",)), "models must be among"),
    (dict(full_steps=0), "full_steps must be >= 1"),
    (dict(budget=12), "budget must be > prompt_len"),
    (dict(window=BUDGET), "budget must be > window"),
    (dict(static_steps=("compiled",)), "static_steps must be distinct values among"),
    (dict(static_steps=("fused", "fused")), "static_steps must be distinct values among"),
])
def test_settings_reject_bad_values(change, message):
    base = dict(models=("tiny",), batch_size=BATCH, prompt_len=PROMPT, points=POINTS, budget=BUDGET, window=WINDOW,
                keep_ratio=KEEP_RATIO, point_window=POINT_WINDOW, full_steps=4, plain_steps=2, device="cpu")
    with pytest.raises(ValueError, match=message):
        Settings(**{**base, **change})


def _held_before_step(step: int) -> int:
    """Tokens a row holds before dynts step ``step`` (independent of the benchmark's code): the prompt, one more per
    step, and at the budget a compaction to the window plus the keep quota of the older tokens, or the protected
    prompt if it is larger."""
    held = PROMPT
    for _ in range(step):
        held += 1
        if held >= BUDGET:
            held = WINDOW + max(math.floor(KEEP_RATIO * (BUDGET - WINDOW)), PROMPT)
    return held


def test_tiny_benchmark_runs_on_cpu_and_reports_three_paths_for_both_steps(tmp_path):
    """The whole script at the tiny shape: every figure present, derived figures consistent with the measured ones,
    dynts bounded by its budget and compacted to the policy's length (at a point past its run, measured where it
    holds the same tokens), the full-cache path never evicting."""
    code = run_module("dynts.evals.bench_decode", [
        "--models", "tiny", "--device", "cpu", "--batch-size", str(BATCH), "--prompt-len", str(PROMPT),
        "--points", *map(str, POINTS), "--budget", str(BUDGET), "--window", str(WINDOW), "--keep-ratio",
        str(KEEP_RATIO), "--point-window", str(POINT_WINDOW), "--full-steps", "4", "--plain-steps", "2",
        "--static-steps", "fused", "unfused", "--out", str(tmp_path),
    ])
    assert code == 0
    results = json.loads((tmp_path / "bench_decode.json").read_text())
    rows, record = results["rows"], results["runs"]["tiny"]
    assert [(row["point"], row["step"]) for row in rows] == [(point, kind) for point in POINTS
                                                              for kind in ("fused", "unfused")]
    # K and V of 2 layers x 2 KV heads x 32 dims in bf16, per token and row
    kv_bytes_per_token = 2 * 2 * 2 * 32 * 2
    bandwidth = results["copy_bandwidth_bytes_per_s"]
    for row in rows:
        for path in ("plain", "full", "dynts"):
            assert row[f"{path}_ms"] > 0 and math.isfinite(row[f"{path}_ms"])
            assert row[f"{path}_kv_bytes"] == pytest.approx(BATCH * row[f"{path}_held_tokens"] * kv_bytes_per_token)
            roofline = 1000 * (record["weight_bytes"] + row[f"{path}_kv_bytes"]) / bandwidth
            assert row[f"{path}_roofline_ms"] == pytest.approx(roofline)
            assert row[f"{path}_over_roofline"] == pytest.approx(row[f"{path}_ms"] / roofline)
        assert row["dynts_vs_plain"] == pytest.approx(row["plain_ms"] / row["dynts_ms"])
        assert row["eviction_buys"] == pytest.approx(row["full_ms"] / row["dynts_ms"])
        # plain HF and the full cache hold everything (a few steps past the point); dynts stays within its budget
        for path in ("plain", "full"):
            assert row["point"] < row[f"{path}_held_tokens"] <= row["point"] + 8
        step = row["point"] - PROMPT
        expected = [_held_before_step(s) + 1 for s in range(step - POINT_WINDOW, step + POINT_WINDOW)]
        assert row["dynts_held_tokens"] == pytest.approx(sum(expected) / len(expected))
    assert [row["dynts_measured_at"] for row in rows] == [40, 40, 90 - 23, 90 - 23]  # the period: 48 - (16 + 9)
    compacted_length = WINDOW + math.floor(KEEP_RATIO * (BUDGET - WINDOW))
    for kind, run in record["dynts_runs"].items():
        assert len(run["step_ms"]) == sum(run["sync_intervals"]) == (BUDGET - PROMPT - 1) + 1 + 23 + 2 * POINT_WINDOW
        assert run["held_row0"] == [_held_before_step(step) for step in range(len(run["step_ms"]))]
        assert run["eviction_points"] and all(point["held"] == compacted_length for point in run["eviction_points"])
        assert run["row_compactions"] == BATCH * len(run["compaction_steps"])
        # (at this size the capture's interval ends with the first compaction, the next interval with the second:
        # no interval before them to measure a spike against; the spike arithmetic is tested above)
        assert {spike["step"] for spike in run["spikes"]} <= set(run["compaction_steps"])
        assert 0 < run["scoring_and_eviction_share"] < 1
    table = (tmp_path / "bench_decode.md").read_text()
    assert all(f"| tiny | {point} | {kind} |" in table for point in POINTS for kind in ("fused", "unfused"))
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install 'dynts[eval]')")
    assert (tmp_path / "bench_decode.png").stat().st_size > 0

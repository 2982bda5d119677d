"""The decode benchmark script on the tiny shape (CPU smoke test) and its step bookkeeping on hand-made traces."""

from __future__ import annotations

import json
import math

import pytest

from dynts.evals import bench_decode
from dynts.evals.bench_decode import Settings, compaction_spikes, compaction_steps

BUDGET, WINDOW, KEEP_RATIO, BATCH, PROMPT, POINT_WINDOW = 48, 16, 0.3, 2, 8, 5
POINTS = (40, 70)


def test_compaction_steps_are_the_steps_whose_lengths_drop():
    # lengths before each step (two rows); row 1 is compacted by step 1's bookkeeping, both rows by step 3's
    held = [[5, 9], [6, 10], [7, 4], [8, 5], [3, 3], [4, 4]]
    assert compaction_steps(held) == [1, 3]
    assert compaction_steps([[5], [6], [7]]) == []


def test_compaction_spikes_against_the_median_of_their_neighbours():
    seconds = [0.010] * 30
    seconds[12] = 0.030  # a compaction step three times its neighbours
    seconds[14] = 0.050  # another compaction step among its neighbours: left out of step 12's median
    seconds[5] = 0.020  # one slow ordinary neighbour does not move the median
    spikes = compaction_spikes(seconds, [12, 14])
    assert [spike["step"] for spike in spikes] == [12, 14]
    assert spikes[0]["spike"] == pytest.approx(3.0) and spikes[1]["spike"] == pytest.approx(5.0)
    assert spikes[0]["neighbour_median_ms"] == pytest.approx(10.0)


@pytest.mark.parametrize("change, message", [
    (dict(points=(10, 70)), "points must be > prompt_len"),
    (dict(models=("llama-70b",)), "models must be among"),
    (dict(full_steps=0), "full_steps must be >= 1"),
    (dict(budget=12), "budget must be > prompt_len"),
    (dict(window=BUDGET), "budget must be > window"),
])
def test_settings_reject_bad_values(change, message):
    base = dict(models=("tiny",), batch_size=BATCH, prompt_len=PROMPT, points=POINTS, budget=BUDGET, window=WINDOW,
                keep_ratio=KEEP_RATIO, point_window=POINT_WINDOW, full_steps=4, plain_steps=2, device="cpu")
    with pytest.raises(ValueError, match=message):
        Settings(**{**base, **change})


def test_tiny_benchmark_runs_on_cpu_and_reports_three_paths(tmp_path):
    """The whole script at the tiny shape: every figure present, derived figures consistent with the measured ones,
    dynts bounded by its budget and compacted to the policy's length, the full-cache path never evicting."""
    code = bench_decode.main([
        "--models", "tiny", "--device", "cpu", "--batch-size", str(BATCH), "--prompt-len", str(PROMPT),
        "--points", *map(str, POINTS), "--budget", str(BUDGET), "--window", str(WINDOW), "--keep-ratio",
        str(KEEP_RATIO), "--point-window", str(POINT_WINDOW), "--full-steps", "4", "--plain-steps", "2",
        "--out", str(tmp_path),
    ])
    assert code == 0
    results = json.loads((tmp_path / "bench_decode.json").read_text())
    rows, run = results["rows"], results["runs"]["tiny"]
    assert [row["point"] for row in rows] == list(POINTS)
    # K and V of 2 layers x 2 KV heads x 32 dims in bf16, per token and row
    kv_bytes_per_token = 2 * 2 * 2 * 32 * 2
    bandwidth = results["copy_bandwidth_bytes_per_s"]
    for row in rows:
        for path in ("plain", "full", "dynts"):
            assert row[f"{path}_ms"] > 0 and math.isfinite(row[f"{path}_ms"])
            assert row[f"{path}_kv_bytes"] == pytest.approx(BATCH * row[f"{path}_held_tokens"] * kv_bytes_per_token)
            roofline = 1000 * (run["weight_bytes"] + row[f"{path}_kv_bytes"]) / bandwidth
            assert row[f"{path}_roofline_ms"] == pytest.approx(roofline)
            assert row[f"{path}_over_roofline"] == pytest.approx(row[f"{path}_ms"] / roofline)
        assert row["dynts_vs_plain"] == pytest.approx(row["plain_ms"] / row["dynts_ms"])
        assert row["eviction_buys"] == pytest.approx(row["full_ms"] / row["dynts_ms"])
        # plain HF and the full cache hold everything (a few steps past the point); dynts stays within its budget
        for path in ("plain", "full"):
            assert row["point"] < row[f"{path}_held_tokens"] <= row["point"] + 8
        assert row["dynts_held_tokens"] <= BUDGET + 1
    assert len(run["step_ms"]) == max(POINTS) - PROMPT + POINT_WINDOW
    assert max(run["held_row0"]) <= BUDGET
    compacted_length = WINDOW + math.floor(KEEP_RATIO * (BUDGET - WINDOW))
    assert run["eviction_points"] and all(point["held"] == compacted_length for point in run["eviction_points"])
    assert run["row_compactions"] == BATCH * len(run["compaction_steps"])
    assert 0 < run["scoring_and_eviction_share"] < 1
    table = (tmp_path / "bench_decode.md").read_text()
    assert all(f"| tiny | {point} |" in table for point in POINTS)
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install 'dynts[eval]')")
    assert (tmp_path / "bench_decode.png").stat().st_size > 0

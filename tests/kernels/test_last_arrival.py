"""Split-K sums merged in-launch by the last program of each output block (``last_arrival.py``): the counters are
back to zero after every launch, so launches with different split counts in a row (sharing one stream's counters)
stay exact, and a repeated launch gives the same bits (the merge sums in split order, whichever program ends last)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="needs triton installed (pip install 'dynts[triton]')")

from kernel_cases import pick  # noqa: E402

from dynts.kernels.last_arrival import COUNTERS, arrival_counters  # noqa: E402
from dynts.kernels.reference import concat_linear_reference  # noqa: E402
from dynts.kernels.skinny_linear import SPLIT_COUNTS, concat_linear  # noqa: E402


def test_split_launches_in_a_row_reset_their_counters(device: str) -> None:
    generator = torch.Generator().manual_seed(3)
    rows, depth, sizes = pick(device, 3, 20), pick(device, 600, 4096), pick(device, (150, 40), (3584, 512))
    x = torch.randn(rows, depth, generator=generator).to(device)
    weights = [(torch.randn(size, depth, generator=generator) * 0.05).to(device) for size in sizes]
    biases = [torch.randn(size, generator=generator).to(device) for size in sizes]
    want = concat_linear_reference(x, weights, biases)
    counters = arrival_counters(x.device, 1)
    firsts = {}
    # Split counts that differ from launch to launch, twice over: a counter left non-zero by one launch would make
    # a later launch sum before all its splits are written (or never), and its output would be garbage.
    for _ in range(2):
        for splits in (*SPLIT_COUNTS[1:], None):
            got = concat_linear(x, weights, biases, split_k=splits)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert torch.equal(got, firsts.setdefault(splits, got))
            assert int(counters.count_nonzero()) == 0


def test_a_launch_past_the_counters_is_refused() -> None:
    with pytest.raises(ValueError, match=f"at most {COUNTERS} outputs, got {COUNTERS + 1}"):
        arrival_counters(torch.device("cpu"), COUNTERS + 1)

"""``dynts.device.to_device``: the right values on the device, and on a GPU a copy that does not wait for the work
already queued (a compaction makes five of them between kernels)."""

from __future__ import annotations

import pytest
import torch

from dynts.device import to_device


def test_values_dtype_and_device() -> None:
    table = to_device([[3, 1, 4], [1, 5, 9]], "cpu")
    assert table.dtype == torch.long and table.device.type == "cpu"
    assert table.tolist() == [[3, 1, 4], [1, 5, 9]]
    flags = to_device([True, False], "cpu", dtype=torch.bool)
    assert flags.dtype == torch.bool and flags.tolist() == [True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the copy is only asynchronous there)")
def test_the_copy_does_not_wait_for_queued_work() -> None:
    """A long kernel queued first is still running when ``to_device`` returns: the host did not wait for it. (A copy
    from pageable memory, ``torch.tensor(values).to('cuda')``, returns only after it.)"""
    busy = torch.cuda.current_stream()
    to_device(list(range(1000)), "cuda")  # the pinned-memory cache's first block (steady state: later compactions)
    torch.cuda.synchronize()
    torch.cuda._sleep(500_000_000)  # spins the GPU for well over 100 ms
    table = to_device(list(range(1000)), "cuda")
    assert not busy.query(), "to_device waited for the queued kernel"
    assert table.tolist() == list(range(1000))  # stream order: the copy ran after the kernel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_pageable_copy_waits_so_the_check_above_can_fail() -> None:
    torch.cuda.synchronize()
    torch.cuda._sleep(500_000_000)
    torch.tensor(list(range(1000))).to("cuda")
    assert torch.cuda.current_stream().query()

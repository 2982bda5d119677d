"""``dynts.device``: ``to_device`` gives the right values on the device and, on a GPU, a copy that does not wait for
the work already queued; ``HostCopy`` gives the values as they were when it was made and, on a GPU, waits for its
own copy only, not for the work queued after it."""

from __future__ import annotations

import pytest
import torch

from dynts.device import HostCopy, to_device


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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_a_host_copy_holds_the_values_as_they_were_when_made(device: str) -> None:
    tensor = torch.arange(12, device=device).view(3, 4)[:, :3]  # a strided slice, as the token log's
    copy = HostCopy(tensor)
    tensor.zero_()  # queued after the copy
    assert copy.wait().tolist() == [[0, 1, 2], [4, 5, 6], [8, 9, 10]]
    assert copy.wait().device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the copy is only asynchronous there)")
def test_a_host_copy_does_not_wait_for_work_queued_after_it() -> None:
    torch.cuda.synchronize()
    values = torch.arange(64, device="cuda")
    copy = HostCopy(values)
    torch.cuda._sleep(500_000_000)
    assert copy.wait().tolist() == list(range(64))
    assert not torch.cuda.current_stream().query(), "HostCopy.wait waited for the kernel queued after the copy"

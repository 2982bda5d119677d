"""Triton ragged flash-decoding kernel against the torch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="needs triton installed (pip install 'dynts[triton]')")

from kernel_cases import pick  # noqa: E402

from dynts.kernels.decode_attention_kernel import (  # noqa: E402
    BLOCK_SLOTS, INTERPRETER_SMS, PROGRAMS_PER_SM, decode_attention, decode_splits)
from dynts.kernels.reference import decode_attention_reference  # noqa: E402


@pytest.mark.parametrize(
    "group, dim, dtype",
    [(1, 64, torch.float32), (4, 128, torch.bfloat16), (7, 96, torch.float16), (8, 64, torch.bfloat16),
     (4, 64, torch.float16), (8, 128, torch.float32)],
)
def test_decode_attention_matches_reference(device: str, group: int, dim: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(group * 1000 + dim)
    batch, kv_heads = 3, pick(device, 2, 8)
    capacity = pick(device, 9 * BLOCK_SLOTS + 13, 40 * BLOCK_SLOTS + 13)  # not a multiple of the block
    # A strided view into a larger storage, as the cache passes it: [rows, heads, capacity + headroom, dim][..., :capacity].
    storage_k = torch.randn(batch, kv_heads, capacity + 9, dim, generator=generator).to(device=device, dtype=dtype)
    storage_v = torch.randn(batch, kv_heads, capacity + 9, dim, generator=generator).to(device=device, dtype=dtype)
    keys, values = storage_k[:, :, :capacity], storage_v[:, :, :capacity]
    queries = torch.randn(batch, kv_heads * group, dim, generator=generator).to(device=device, dtype=dtype)
    lengths = torch.tensor([capacity, 1, BLOCK_SLOTS + 1], device=device)  # full, a single slot, one past a block
    want = decode_attention_reference(queries, keys, values, lengths, scale=dim**-0.5)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    # The default split count, one split, and more splits than a short row has blocks (empty splits merge away).
    for num_splits in (None, 1, 7):
        got = decode_attention(queries, keys, values, lengths, scale=dim**-0.5, num_splits=num_splits)
        assert got.shape == (batch, kv_heads * group, dim) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)
    got = decode_attention(queries, keys, values, lengths, scale=dim**-0.5)
    # Slots past a row's length are never read: poisoning them changes nothing.
    storage_k[1, :, 1:] = float("nan")
    storage_v[1, :, 1:] = float("nan")
    again = decode_attention(queries, keys, values, lengths, scale=dim**-0.5)
    assert torch.equal(again[1], got[1])


def test_decode_attention_rejects_mismatched_heads(device: str) -> None:
    queries = torch.randn(2, 6, 64, device=device)
    keys = torch.randn(2, 4, 10, 64, device=device)
    with pytest.raises(ValueError, match="do not match keys"):
        decode_attention(queries, keys, keys, torch.tensor([3, 4], device=device), scale=0.125)


def test_decode_attention_rejects_zero_splits(device: str) -> None:
    queries = torch.randn(2, 4, 64, device=device)
    keys = torch.randn(2, 4, 10, 64, device=device)
    with pytest.raises(ValueError, match="num_splits must be >= 1, got 0"):
        decode_attention(queries, keys, keys, torch.tensor([3, 4], device=device), scale=0.125, num_splits=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_in_the_ring_layout(device: str, dtype: torch.dtype) -> None:
    """Rows whose slots start at ``start`` and wrap around the capacity: the same result as the plain layout holding
    the slots in order (the reference against itself on an unrolled copy, then the kernel against the reference);
    physical slots outside a row's ring range are never read."""
    generator = torch.Generator().manual_seed(5)
    batch, kv_heads, group, dim = 4, pick(device, 2, 8), 4, 64
    capacity = pick(device, 5 * BLOCK_SLOTS + 7, 40 * BLOCK_SLOTS + 7)
    keys = torch.randn(batch, kv_heads, capacity, dim, generator=generator).to(device=device, dtype=dtype)
    values = torch.randn(batch, kv_heads, capacity, dim, generator=generator).to(device=device, dtype=dtype)
    queries = torch.randn(batch, kv_heads * group, dim, generator=generator).to(device=device, dtype=dtype)
    lengths = torch.tensor([capacity, 3 * BLOCK_SLOTS + 5, 1, 2 * BLOCK_SLOTS], device=device)
    start = torch.tensor([capacity // 2, capacity - 2 * BLOCK_SLOTS, capacity - 1, 0], device=device)
    physical = (start.view(-1, 1) + torch.arange(capacity, device=device).view(1, -1)) % capacity
    in_order = [torch.gather(t, 2, physical.view(batch, 1, capacity, 1).expand_as(t)) for t in (keys, values)]
    scale = dim**-0.5
    want = decode_attention_reference(queries, *in_order, lengths, scale=scale)
    torch.testing.assert_close(decode_attention_reference(queries, keys, values, lengths, scale=scale, start=start),
                               want, atol=0, rtol=0)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for num_splits in (None, 1, 5):
        got = decode_attention(queries, keys, values, lengths, scale=scale, num_splits=num_splits, start=start)
        torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)
    ordinal = torch.arange(capacity, device=device).view(1, -1)
    held = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
    held.scatter_(1, physical, ordinal < lengths.view(-1, 1))
    keys.masked_fill_(~held.view(batch, 1, capacity, 1), float("nan"))
    values.masked_fill_(~held.view(batch, 1, capacity, 1), float("nan"))
    again = decode_attention(queries, keys, values, lengths, scale=scale, start=start)
    torch.testing.assert_close(again.float(), want.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("rows, kv_heads", [(1, 1), (3, 2), (5, 3), (4, 4), (16, 1), (20, 8)])
def test_the_default_split_count_fills_one_wave_without_passing_it(rows: int, kv_heads: int) -> None:
    """``decode_splits``: as many programs as one wave of ``PROGRAMS_PER_SM`` per multiprocessor runs, never more
    (a launch just past a wave runs a second, mostly empty one: issue 17), at least one split per (row, KV head), at
    most one per block of slots."""
    wave, pairs = PROGRAMS_PER_SM * INTERPRETER_SMS, rows * kv_heads  # off CUDA: INTERPRETER_SMS multiprocessors
    splits = decode_splits(rows, kv_heads, 100 * BLOCK_SLOTS, torch.device("cpu"))
    if pairs <= wave:
        assert splits * pairs <= wave < (splits + 1) * pairs
    else:
        assert splits == 1
    assert decode_splits(rows, kv_heads, 1, torch.device("cpu")) == 1  # one block of slots: one split

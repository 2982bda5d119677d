"""Triton compaction kernels (dense and paged) against their torch references."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="needs triton installed (pip install 'dynts[triton]')")

from kernel_cases import pick, random_cache, random_keep  # noqa: E402

from dynts.kernels.compaction import compact_dense_  # noqa: E402
from dynts.kernels.paged import compact_paged_  # noqa: E402
from dynts.kernels.reference import compact_paged_reference_, compact_reference_  # noqa: E402
from dynts.kernels.validation import check_compaction_args, check_paged_compaction_args  # noqa: E402

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_dense(cache, rows, keep_index, keep_count, **options):
    """Kernel on one copy, reference on another; both compared in full (slots past keep_count stay unchanged
    in both)."""
    expected = cache.clone()
    compact_reference_(expected, rows, keep_index, keep_count)
    rows, keep_index, keep_count = check_compaction_args([cache], rows, keep_index, keep_count)
    compact_dense_(cache, rows, keep_index, keep_count, **options)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("keep_layers,keep_heads", [(False, False), (True, False), (False, True), (True, True)])
def test_dense_matches_reference(device, dtype, keep_layers, keep_heads):
    generator = torch.Generator().manual_seed(1)
    layers, batch, heads, slots, dim = pick(device, (2, 4, 2, 37, 64), (4, 6, 8, 3001, 128))
    counts = pick(device, [21, 9, 0], [1700, 903, 0])  # ragged, one row with nothing kept
    rows = torch.tensor([3, 0, 2])
    cache = random_cache((layers, batch, heads, slots, dim), dtype, device, generator)
    lists = (layers if keep_layers else 1) * (heads if keep_heads else 1)
    keep = random_keep(lists, counts, slots, generator, width=max(counts) + 3)
    keep = keep.view(layers if keep_layers else 1, heads if keep_heads else 1, 3, -1).transpose(1, 2).contiguous()
    run_dense(cache, rows, keep.to(device), torch.tensor(counts, device=device), block_tokens=pick(device, 4, None))


@pytest.mark.parametrize("dim", [128, 80, 1])
def test_dense_head_dims_and_chunks(device, dim):
    """Head dims 128, not a power of two, and 1; several chunk sizes (multi-chunk schedules)."""
    generator = torch.Generator().manual_seed(dim)
    layers, batch, heads, slots = pick(device, (2, 2, 2, 45), (3, 4, 8, 2049))
    counts = pick(device, [30, 17], [1300, 611])
    for block_tokens in (1, 8, None):
        cache = random_cache((layers, batch, heads, slots, dim), torch.bfloat16, device, generator)
        keep = random_keep(heads, counts, slots, generator).view(1, heads, 2, -1).transpose(1, 2).contiguous()
        run_dense(cache, torch.tensor([1, 0]), keep.to(device), torch.tensor(counts, device=device),
                  block_tokens=block_tokens)


def test_dense_positions_int64(device):
    """The int64 logical-positions tensor, compacted as [1, batch, 1, slots, 1] with the same kernel."""
    generator = torch.Generator().manual_seed(5)
    batch, slots = pick(device, (3, 50), (20, 5000))
    counts = pick(device, [20, 33, 7], [1500] * 10 + [1499] * 10)
    positions = torch.arange(slots).repeat(batch, 1).to(device)
    cache = positions.view(1, batch, 1, slots, 1)
    keep = random_keep(1, counts, slots, generator).unsqueeze(2).to(device)
    rows = torch.arange(batch)
    run_dense(cache, rows, keep, torch.tensor(counts, device=device))
    assert torch.equal(positions[0, : counts[0]], keep[0, 0, 0, : counts[0]])


def test_dense_worst_aliasing(device):
    """Keep every other slot, and keep all but slot 0: destinations are sources of neighbouring lanes, so a
    missing barrier or a wrong chunk order shows (on the GPU; the interpreter runs lanes in order)."""
    layers, batch, heads, slots, dim = pick(device, (1, 2, 2, 64, 64), (8, 8, 8, 4096, 128))
    generator = torch.Generator().manual_seed(11)
    every_other = torch.arange(1, slots, 2)
    all_but_first = torch.arange(1, slots)
    width = all_but_first.numel()
    keep = torch.full((1, 2, 1, width), slots, dtype=torch.long)
    keep[0, 0, 0, : every_other.numel()] = every_other
    keep[0, 1, 0] = all_but_first
    counts = torch.tensor([every_other.numel(), width])
    for block_tokens in pick(device, (4, None), (16, 64, None)):
        cache = random_cache((layers, batch, heads, slots, dim), torch.float16, device, generator)
        run_dense(cache, torch.tensor([0, 1]), keep.to(device), counts.to(device), block_tokens=block_tokens)


def test_dense_leaves_other_rows_and_strided_views(device):
    """A non-contiguous cache view (keys of a [layers, 2, batch, ...] buffer) compacts in place; the other half
    and the rows not listed stay untouched."""
    generator = torch.Generator().manual_seed(3)
    layers, batch, heads, slots, dim = pick(device, (2, 3, 2, 33, 64), (4, 6, 8, 1025, 128))
    buffer = random_cache((layers, 2, batch, heads, slots, dim), torch.float32, device, generator)
    before = buffer.clone()
    keys = buffer[:, 0]
    counts = pick(device, [12], [400])
    keep = random_keep(1, counts, slots, generator).unsqueeze(2).to(device)
    run_dense(keys, torch.tensor([1]), keep, torch.tensor(counts, device=device))
    assert torch.equal(buffer[:, 1], before[:, 1])
    assert torch.equal(buffer[:, 0, [0, 2]], before[:, 0, [0, 2]])


def paged_case(device, dtype, generator, *, layers, num_blocks, block_size, heads, dim, counts, stacked):
    """Layer tensors in vLLM's layout, a block table that scatters the requests over shuffled blocks, keep lists."""
    shape = (2, num_blocks, block_size, heads, dim)
    if stacked:  # views of one allocation, as an allocator that carves one buffer would give
        caches = list(random_cache((layers, *shape), dtype, device, generator).unbind(0))
    else:
        caches = [random_cache(shape, dtype, device, generator) for _ in range(layers)]
    requests = len(counts)
    max_blocks = num_blocks // requests
    table = torch.randperm(num_blocks, generator=generator)[: requests * max_blocks].view(requests, max_blocks)
    return caches, table.to(device=device, dtype=torch.int32), max_blocks * block_size


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("keep_heads", [False, True])
def test_paged_matches_reference(device, dtype, stacked, keep_heads):
    generator = torch.Generator().manual_seed(2)
    layers, num_blocks, block_size, heads, dim = pick(device, (2, 15, 5, 2, 64), (4, 600, 16, 8, 128))
    counts = pick(device, [17, 3, 0], [1900, 1201, 0])
    caches, table, slots = paged_case(
        device, dtype, generator, layers=layers, num_blocks=num_blocks, block_size=block_size, heads=heads,
        dim=dim, counts=counts, stacked=stacked,
    )
    lists = heads if keep_heads else 1
    keep = random_keep(lists, counts, slots, generator).view(1, lists, 3, -1).transpose(1, 2).contiguous().to(device)
    keep_count = torch.tensor(counts, device=device)
    expected = [cache.clone() for cache in caches]
    compact_paged_reference_(expected, table, keep, keep_count)
    table64, keep, keep_count = check_paged_compaction_args(caches, table, keep, keep_count)
    compact_paged_(caches, table64, keep, keep_count, block_tokens=pick(device, 4, None))
    for layer, (got, want) in enumerate(zip(caches, expected)):
        assert torch.equal(got, want), f"layer {layer} differs"


def test_paged_per_layer_lists_and_head_dim_128(device):
    generator = torch.Generator().manual_seed(17)
    layers, num_blocks, block_size, heads = pick(device, (3, 8, 4, 1), (6, 320, 16, 8))
    counts = pick(device, [9, 14], [2000, 1111])
    caches, table, slots = paged_case(
        device, torch.bfloat16, generator, layers=layers, num_blocks=num_blocks, block_size=block_size,
        heads=heads, dim=128, counts=counts, stacked=False,
    )
    keep = random_keep(layers, counts, slots, generator).unsqueeze(2).to(device)
    keep_count = torch.tensor(counts, device=device)
    expected = [cache.clone() for cache in caches]
    compact_paged_reference_(expected, table, keep, keep_count)
    compact_paged_(caches, *check_paged_compaction_args(caches, table, keep, keep_count))
    assert all(torch.equal(got, want) for got, want in zip(caches, expected))


def test_several_tensors_compacted_alike_in_one_call(device):
    """K, V and a slot table's int64 positions and bool state in one ``compact_`` call (validated once): each equals
    its own reference compaction; tensors that do not share batch or slots are refused by name."""
    from dynts import kernels

    generator = torch.Generator().manual_seed(11)
    batch, slots = 3, pick(device, 40, 3001)
    counts = pick(device, [25, 3], [1700, 12])
    tensors = [random_cache((2, batch, 4, slots, 16), torch.bfloat16, device, generator),
               random_cache((2, batch, 4, slots, 8), torch.float32, device, generator),
               random_cache((1, batch, 1, slots, 1), torch.int64, device, generator),
               (random_cache((1, batch, 1, slots, 1), torch.float32, device, generator) > 0)]
    keep = random_keep(1, counts, slots, generator).view(1, 2, 1, -1).to(device)
    rows, keep_count = torch.tensor([2, 0]), torch.tensor(counts, device=device)
    expected = [tensor.clone() for tensor in tensors]
    for tensor in expected:
        compact_reference_(tensor, rows.to(device), keep, keep_count)
    kernels.compact_(tensors, rows, keep, keep_count)
    for got, want in zip(tensors, expected):
        assert torch.equal(got, want)
    shorter = random_cache((1, batch, 1, slots - 1, 1), torch.int64, device, generator)
    with pytest.raises(ValueError, match=r"caches\[1\] must share caches\[0\]'s batch, slots and device"):
        kernels.compact_([tensors[0], shorter], rows, keep, keep_count)

"""Triton compaction kernels (dense and paged) against their torch references."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="needs triton installed (pip install 'dynts[triton]')")

from kernel_cases import pick, random_cache, random_keep  # noqa: E402

from dynts.kernels.compaction import compact_dense_  # noqa: E402
from dynts.kernels.paged import compact_paged_  # noqa: E402
from dynts.kernels.reference import compact_paged_reference_, compact_reference_, compact_ring_reference_  # noqa: E402
from dynts.kernels.validation import (  # noqa: E402
    check_compaction_args, check_paged_compaction_args, check_ring_compaction_args,
)

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


# ---------------------------------------------------------------------------------------------- ring layout
def ring_keep(lists, held, counts, tail, generator, width):
    """[lists, R, width] keep lists below each row's ``held``: a random prefix, a random middle and the last
    ``tail[r]`` slots (the local window), ``counts[r]`` in all; entries past the count are garbage."""
    index = torch.full((lists, len(held), width), 10**6, dtype=torch.long)
    for list_id in range(lists):
        for row, (length, count, kept_tail) in enumerate(zip(held, counts, tail)):
            middle = count - kept_tail
            prefix = int(torch.randint(0, middle + 1, (1,), generator=generator))
            chosen = torch.randperm(length - kept_tail - prefix, generator=generator)[: middle - prefix] + prefix
            index[list_id, row, :count] = torch.cat([
                torch.arange(prefix), chosen.sort().values, torch.arange(length - kept_tail, length)])
    return index


def unrolled(cache, start):
    """Each row's slots in ring order: slot s of row b read at physical (start[b] + s) % slots."""
    slots = cache.shape[3]
    physical = (start.view(1, -1, 1, 1) + torch.arange(slots, device=cache.device).view(1, 1, 1, -1)) % slots
    return torch.gather(cache, 3, physical.unsqueeze(-1).expand(cache.shape[0], -1, cache.shape[2], -1, cache.shape[4]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("keep_layers,keep_heads", [(False, False), (True, True)])
def test_ring_matches_reference_and_keeps_the_window_in_place(device, dtype, keep_layers, keep_heads):
    """The ring compaction against its reference (rows wrapping around the capacity, a row with nothing kept, a row
    keeping everything, several chunk sizes), and the reference against the dense one it mirrors: read in ring order
    from the new start (start + held - keep_count), a row holds exactly what dense compaction of the same slots
    holds; the physical slots of the kept window are untouched."""
    generator = torch.Generator().manual_seed(7)
    layers, batch, heads, slots, dim = pick(device, (2, 5, 2, 41, 16), (4, 6, 8, 3001, 128))
    held = pick(device, [37, 20, 41, 12], [2900, 1500, 3001, 800])
    counts = pick(device, [15, 0, 41, 7], [1300, 0, 3001, 500])
    tail = pick(device, [6, 0, 41, 3], [600, 0, 3001, 200])
    start = torch.tensor(pick(device, [30, 3, 0, 40], [2500, 17, 0, 3000]))  # the first and last rows wrap
    rows = torch.tensor([4, 0, 2, 1])
    width = min(max(counts) + 2, slots)
    lists = (layers if keep_layers else 1, heads if keep_heads else 1)
    keep = ring_keep(lists[0] * lists[1], held, counts, tail, generator, width)
    keep = keep.view(lists[0], lists[1], len(held), width).transpose(1, 2).contiguous()
    args = [t.to(device) for t in (rows, keep, torch.tensor(counts), torch.tensor(held), start)]
    for block_tokens in pick(device, (1, 4, None), (64, None)):
        cache = random_cache((layers, batch, heads, slots, dim), dtype, device, generator)
        before = cache.clone()
        expected = cache.clone()
        compact_ring_reference_(expected, *args)
        checked = check_ring_compaction_args([cache], *args)
        compact_dense_(cache, *checked[:3], ring=checked[3:], block_tokens=block_tokens)
        assert torch.equal(cache, expected)

    dense = unrolled(before, args[4].new_zeros(batch).index_copy(0, args[0], args[4]))
    compact_reference_(dense, *args[:3])
    new_start = (start + torch.tensor(held) - torch.tensor(counts)) % slots
    ring_order = unrolled(expected, args[4].new_zeros(batch).index_copy(0, args[0], new_start.to(device)))
    for request, (row, count, length, kept_tail) in enumerate(zip(rows.tolist(), counts, held, tail)):
        assert torch.equal(ring_order[:, row, :, :count], dense[:, row, :, :count])
        window = (start[request] + torch.arange(length - kept_tail, length)) % slots
        assert torch.equal(expected[:, row, :, window.to(device)], before[:, row, :, window.to(device)])
    untouched = [row for row in range(batch) if row not in rows.tolist()]
    assert torch.equal(expected[:, untouched], before[:, untouched])


def test_ring_worst_aliasing(device):
    """Keep every other slot, and keep all but the last slot: every kept slot moves onto a neighbour's source (the
    mirror of the dense case), across the wrap."""
    layers, batch, heads, slots, dim = pick(device, (1, 2, 2, 64, 16), (8, 2, 8, 4096, 128))
    generator = torch.Generator().manual_seed(13)
    every_other = torch.arange(0, slots - 1, 2)
    all_but_last = torch.arange(0, slots - 1)
    width = all_but_last.numel()
    keep = torch.full((1, 2, 1, width), 0, dtype=torch.long)
    keep[0, 0, 0, : every_other.numel()] = every_other
    keep[0, 1, 0] = all_but_last
    args = [torch.tensor([0, 1]), keep, torch.tensor([every_other.numel(), width]), torch.tensor([slots, slots]),
            torch.tensor([slots // 3, slots - 5])]
    args = [t.to(device) for t in args]
    for block_tokens in pick(device, (4, None), (16, 64, None)):
        cache = random_cache((layers, batch, heads, slots, dim), torch.float16, device, generator)
        expected = cache.clone()
        compact_ring_reference_(expected, *args)
        checked = check_ring_compaction_args([cache], *args)
        compact_dense_(cache, *checked[:3], ring=checked[3:], block_tokens=block_tokens)
        assert torch.equal(cache, expected)


def test_ring_arguments_are_checked_by_name(device):
    from dynts import kernels

    cache = torch.zeros(1, 2, 1, 10, 4, device=device)
    keep = torch.tensor([[[[1, 2, 3]]]], device=device)
    rows, count = torch.tensor([0]), torch.tensor([3])
    with pytest.raises(ValueError, match=r"held must be, per row, in \[keep_count, slots=10\]"):
        kernels.compact_ring_(cache, rows, keep, count, torch.tensor([11]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"start must be, per row, in \[0, slots=10\)"):
        kernels.compact_ring_(cache, rows, keep, count, torch.tensor([5]), torch.tensor([10]))
    with pytest.raises(ValueError, match="slot indices below held"):
        kernels.compact_ring_(cache, rows, keep, count, torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="held must have one entry per row"):
        kernels.compact_ring_(cache, rows, keep, count, torch.tensor([5, 5]), torch.tensor([0]))


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

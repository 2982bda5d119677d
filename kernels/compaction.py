"""Triton kernels: in-place compaction of a dense cache [layers, batch, heads, slots, dim], all layers in one launch.

Two layouts, one kernel (``compact_dense_``): slot s of a row at physical index s (kept slots move to the front), or
a ring, slot s at ``(start + s) % slots`` (``ring=(held, start)``: kept slots move to the end of the held range, so
the local window, the kept tail, does not move; a static decode session uses it).

One program owns one (layer, row, head) and walks its keep list in chunks of BLOCK_TOKENS. Why this is safe in
place, plain layout: kept slot indices are strictly increasing from >= 0, so keep_index[j] >= j; slot t is read only
by lanes j <= t and written only by lane t. Chunks run in ascending order inside one program, and a barrier between
a chunk's loads and its stores means that when lane t stores, every lane j <= t (this chunk or an earlier one)
has already loaded. Lanes with keep_index[j] == j (the unchanged prefix, e.g. the prompt) move nothing.
The ring layout is the mirror image: lane j moves to shift + j (shift = held - keep_count) and, since the indices are
below held, keep_index[j] <= shift + j; so slot t is written only by lane t - shift and read only by lanes above it,
and chunks run from the top down. The lanes that stay in place (keep_index[j] == shift + j) form a suffix, since
keep_index[j] - j never decreases: the program finds where it starts by bisection and walks only the lanes below.

Any dtype Triton can load works, including the int64 positions tensor (dim 1): for small dims the chunk holds more
tokens, so it is the same kernel, not a torch fallback.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements moved per chunk: 16 KiB in flight per program for 2-byte dtypes; at most 1024 tokens (the int64 index
# math per token costs registers when the dim is small).
CHUNK_ELEMENTS = 8192
MAX_BLOCK_TOKENS = 1024


@triton.jit
def _compact_kernel(
    cache_ptr,
    rows_ptr,
    keep_index_ptr,
    keep_count_ptr,
    held_ptr,
    start_ptr,
    dim,
    slots,
    stride_cache_layer,
    stride_cache_batch,
    stride_cache_head,
    stride_cache_slot,
    stride_cache_dim,
    stride_keep_layer,
    stride_keep_row,
    stride_keep_head,
    stride_keep_slot,
    RING: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    request = tl.program_id(1).to(tl.int64)
    layer = tl.program_id(2).to(tl.int64)
    row = tl.load(rows_ptr + request)
    keep_count = tl.load(keep_count_ptr + request)
    cache_base = cache_ptr + layer * stride_cache_layer + row * stride_cache_batch + head * stride_cache_head
    keep_base = keep_index_ptr + layer * stride_keep_layer + request * stride_keep_row + head * stride_keep_head

    token = tl.arange(0, BLOCK_TOKENS)
    if RING:  # top chunk first, only the lanes below the suffix that stays in place
        first = tl.load(start_ptr + request)
        shift = tl.load(held_ptr + request) - keep_count
        low = keep_count * 0
        high = keep_count
        while low < high:
            middle = (low + high) // 2
            stays = tl.load(keep_base + middle * stride_keep_slot) - middle == shift
            high = tl.where(stays, middle, high)
            low = tl.where(stays, low, middle + 1)
        count = low
        lane = count - BLOCK_TOKENS + token
        lane_step = -BLOCK_TOKENS
    else:  # bottom chunk first, every kept lane
        first = 0
        shift = 0
        count = keep_count
        lane = token.to(tl.int64)
        lane_step = BLOCK_TOKENS
    feature = tl.arange(0, BLOCK_DIM)
    feature_mask = feature < dim
    feature_offset = feature * stride_cache_dim
    # The keep list is read one chunk ahead, so each chunk waits for one memory round trip, not two.
    next_source = tl.load(keep_base + lane * stride_keep_slot, mask=(lane >= 0) & (lane < count), other=0)
    for _ in range(0, count, BLOCK_TOKENS):
        in_list = (lane >= 0) & (lane < count)
        source = next_source
        next_lane = lane + lane_step
        next_source = tl.load(keep_base + next_lane * stride_keep_slot, mask=(next_lane >= 0) & (next_lane < count),
                              other=0)
        destination = shift + lane
        moves = in_list & (source != destination)
        if RING:  # storage index first + slot, wrapped once (first < slots and slot < held <= slots)
            source = first + source
            source = tl.where(source >= slots, source - slots, source)
            destination = first + destination
            destination = tl.where(destination >= slots, destination - slots, destination)
        mask = moves[:, None] & feature_mask[None, :]
        values = tl.load(cache_base + source[:, None] * stride_cache_slot + feature_offset[None, :], mask=mask)
        # Every lane of this chunk (and of the chunks before it) has read before any lane overwrites a slot.
        tl.debug_barrier()
        tl.store(cache_base + destination[:, None] * stride_cache_slot + feature_offset[None, :], values, mask=mask)
        lane = next_lane


def compaction_blocks(dim: int, width: int, block_tokens: int | None = None) -> tuple[int, int]:
    """(BLOCK_TOKENS, BLOCK_DIM) for a feature dim and a keep-list width."""
    block_dim = triton.next_power_of_2(dim)
    if block_tokens is None:
        block_tokens = min(triton.next_power_of_2(max(width, 1)), max(CHUNK_ELEMENTS // block_dim, 1), MAX_BLOCK_TOKENS)
    elif block_tokens < 1 or block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens must be a power of two >= 1, got {block_tokens}")
    return block_tokens, block_dim


def compact_dense_(
    cache: torch.Tensor,
    rows: torch.Tensor,
    keep_index: torch.Tensor,
    keep_count: torch.Tensor,
    ring: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    block_tokens: int | None = None,
    num_warps: int = 4,
) -> None:
    """Triton version of ``reference.compact_reference_`` or, with ``ring = (held, start)``, of
    ``reference.compact_ring_reference_`` (same arguments, already validated: see ``validation``; all int64 on the
    cache's device)."""
    layers, _, heads, slots, dim = cache.shape
    row_count, width = rows.numel(), keep_index.shape[-1]
    if row_count == 0 or width == 0:
        return
    keep = keep_index.expand(layers, row_count, heads, width)  # broadcast dims get stride 0
    block_tokens, block_dim = compaction_blocks(dim, width, block_tokens)
    held, start = ring if ring is not None else (keep_count, keep_count)  # not read in the plain layout
    _compact_kernel[(heads, row_count, layers)](
        cache, rows, keep, keep_count, held, start, dim, slots,
        *cache.stride(), *keep.stride(),
        RING=ring is not None, BLOCK_TOKENS=block_tokens, BLOCK_DIM=block_dim, num_warps=num_warps,
    )

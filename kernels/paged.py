"""Triton kernel: in-place compaction of paged KV caches (vLLM CUDA layout), all layers and K/V in one launch.

Each layer's cache is [planes, num_blocks, block_size, kv_heads, head_size] (vLLM's FlashAttention layout, planes
= 2 for K and V); any layout that can be viewed with those five dims works, since the kernel reads strides. Slot s
of a request lives at block ``block_table[r, s // block_size]``, offset ``s % block_size``. Same in-place schedule
as the dense kernel (see ``compaction.py``): one program per (layer, plane, request, head), ascending chunks, a
barrier between loads and stores. Requests of one call must not share blocks (checked by the caller).

The layers are separate tensors (vLLM allocates one per layer); the kernel addresses them all from the first
one's pointer plus per-layer element offsets, so one launch covers every layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .compaction import compaction_blocks


@triton.jit
def _compact_paged_kernel(
    cache_ptr,
    layer_offset_ptr,
    block_table_ptr,
    keep_index_ptr,
    keep_count_ptr,
    dim,
    block_size,
    stride_plane,
    stride_block,
    stride_offset,
    stride_head,
    stride_dim,
    stride_table_row,
    stride_table_block,
    stride_keep_layer,
    stride_keep_row,
    stride_keep_head,
    stride_keep_slot,
    PLANES: tl.constexpr,
    LAYER_OFFSET_MULTIPLE: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    request = tl.program_id(1).to(tl.int64)
    layer_plane = tl.program_id(2)
    layer = (layer_plane // PLANES).to(tl.int64)
    plane = (layer_plane % PLANES).to(tl.int64)
    keep_count = tl.load(keep_count_ptr + request)
    # The caller guarantees the multiple: it tells the compiler the rows stay aligned (16-byte loads).
    layer_offset = tl.multiple_of(tl.load(layer_offset_ptr + layer), LAYER_OFFSET_MULTIPLE)
    cache_base = cache_ptr + layer_offset + plane * stride_plane + head * stride_head
    table_base = block_table_ptr + request * stride_table_row
    keep_base = keep_index_ptr + layer * stride_keep_layer + request * stride_keep_row + head * stride_keep_head

    token = tl.arange(0, BLOCK_TOKENS)
    feature = tl.arange(0, BLOCK_DIM)
    feature_mask = feature < dim
    feature_offset = feature * stride_dim
    # The keep list is read one chunk ahead, so each chunk waits for one memory round trip, not two.
    next_source = tl.load(keep_base + token * stride_keep_slot, mask=token < keep_count, other=0)
    for chunk_start in range(0, keep_count, BLOCK_TOKENS):
        destination = chunk_start + token
        in_list = destination < keep_count
        source = next_source
        next_destination = destination + BLOCK_TOKENS
        next_source = tl.load(
            keep_base + next_destination * stride_keep_slot, mask=next_destination < keep_count, other=0
        )
        moves = in_list & (source != destination)
        # slots fit in int32 (checked by the caller): 32-bit division is inlined, 64-bit is a slow call
        source_slot = source.to(tl.int32)
        destination_slot = destination.to(tl.int32)
        source_block = tl.load(table_base + (source_slot // block_size) * stride_table_block, mask=in_list, other=0)
        destination_block = tl.load(
            table_base + (destination_slot // block_size) * stride_table_block, mask=in_list, other=0
        )
        source_offset = source_block.to(tl.int64) * stride_block + (source_slot % block_size) * stride_offset
        destination_offset = (
            destination_block.to(tl.int64) * stride_block + (destination_slot % block_size) * stride_offset
        )
        mask = moves[:, None] & feature_mask[None, :]
        values = tl.load(cache_base + source_offset[:, None] + feature_offset[None, :], mask=mask)
        # Every lane of this chunk (and of earlier chunks) has read before any lane overwrites a slot.
        tl.debug_barrier()
        tl.store(cache_base + destination_offset[:, None] + feature_offset[None, :], values, mask=mask)


def compact_paged_(
    kv_caches: Sequence[torch.Tensor],
    block_table: torch.Tensor,
    keep_index: torch.Tensor,
    keep_count: torch.Tensor,
    *,
    block_tokens: int | None = None,
    num_warps: int = 4,
) -> None:
    """Triton version of ``reference.compact_paged_reference_`` (arguments already validated: see
    ``validation.check_paged_compaction_args``; block_table, keep_index, keep_count int64 on the caches' device)."""
    first = kv_caches[0]
    planes, _, block_size, heads, dim = first.shape
    layers = len(kv_caches)
    row_count, width = block_table.shape[0], keep_index.shape[-1]
    if row_count == 0 or width == 0:
        return
    item = first.element_size()
    byte_offsets = [tensor.data_ptr() - first.data_ptr() for tensor in kv_caches]
    if any(offset % item for offset in byte_offsets):
        raise ValueError(f"kv_caches tensors must start a whole number of {first.dtype} elements apart")
    element_offsets = [offset // item for offset in byte_offsets]
    layer_offsets = torch.tensor(element_offsets, dtype=torch.long, device=first.device)
    offset_multiple = 16 if all(offset % 16 == 0 for offset in element_offsets) else 1
    keep = keep_index.expand(layers, row_count, heads, width)
    block_tokens, block_dim = compaction_blocks(dim, width, block_tokens)
    _compact_paged_kernel[(heads, row_count, layers * planes)](
        first, layer_offsets, block_table, keep, keep_count, dim, block_size,
        *first.stride(), *block_table.stride(), *keep.stride(),
        PLANES=planes, LAYER_OFFSET_MULTIPLE=offset_multiple, BLOCK_TOKENS=block_tokens, BLOCK_DIM=block_dim, num_warps=num_warps,
    )

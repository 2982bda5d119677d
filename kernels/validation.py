"""Argument checks shared by the compaction paths (torch reference and Triton).

The Triton kernels write through raw addresses, and their in-place schedule is only safe when every kept slot
index satisfies ``keep_index[j] >= j``; so the values are checked, not only the shapes. All value checks of one
call end in a single device-to-host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_integer(name: str, tensor: torch.Tensor, dims: int) -> None:
    if tensor.dtype not in _INDEX_DTYPES or tensor.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-d int32/int64 tensor, got {tensor.dtype} of shape {tuple(tensor.shape)}")


def _keep_flags(keep_index: torch.Tensor, keep_count: torch.Tensor, slot_limit: int) -> dict[str, torch.Tensor]:
    """Device-side flags: keep_count in [0, K] and, for j < keep_count[r], strictly increasing indices in [0, limit)."""
    width = keep_index.shape[-1]
    valid = torch.arange(width, device=keep_index.device) < keep_count.view(1, -1, 1, 1)
    previous = torch.cat([torch.full_like(keep_index[..., :1], -1), keep_index[..., :-1]], dim=-1)
    ordered = (keep_index > previous) & (keep_index < slot_limit)
    return {
        "keep_count": ((keep_count >= 0) & (keep_count <= width)).all(),
        "keep_index": (ordered | ~valid).all(),
    }


def _raise_on_failed(flags: dict[str, torch.Tensor], messages: dict[str, str]) -> None:
    if not flags:
        return
    passed = torch.stack(list(flags.values())).cpu()  # the one sync of the check
    for name, ok in zip(flags, passed.tolist()):
        if not ok:
            raise ValueError(messages[name])


def _check_dense_shape(name: str, cache: torch.Tensor, keep_index: torch.Tensor, row_count: int) -> None:
    if cache.dim() != 5:
        raise ValueError(f"{name} must be [layers, batch, heads, slots, dim], got shape {tuple(cache.shape)}")
    layers, _, heads, slots, _ = cache.shape
    layers_g, index_rows, heads_g, width = keep_index.shape
    if layers_g not in (1, layers) or index_rows != row_count or heads_g not in (1, heads):
        raise ValueError(
            f"keep_index must be [layers_g, R, heads_g, K] with layers_g in {{1, {layers}}}, R = len(rows) = {row_count}, "
            f"heads_g in {{1, {heads}}} ({name}); got {tuple(keep_index.shape)}"
        )
    if width > slots:
        raise ValueError(f"keep_index width K must be in [0, slots={slots}], got {width}")


def check_compaction_args(
    caches: Sequence[torch.Tensor], rows: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor,
    *, check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the arguments of ``compact_`` (dense layout; several tensors compacted alike share their batch,
    slots and device); returns rows, keep_index, keep_count as int64 on the caches' device. ``check_values=False``
    checks shapes only (no device synchronisation)."""
    rows, keep_index, keep_count, flags, messages = _dense_compaction_args(caches, rows, keep_index, keep_count,
                                                                           check_values)
    _raise_on_failed(flags, messages)
    return rows, keep_index, keep_count


def check_ring_compaction_args(
    caches: Sequence[torch.Tensor], rows: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor,
    held: torch.Tensor, start: torch.Tensor, *, check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the arguments of ``compact_ring_``: those of ``compact_`` plus, per compacted row, ``held`` in
    [keep_count, slots], ``start`` in [0, slots) and kept indices below ``held``; returns rows, keep_index,
    keep_count, held, start as int64 on the caches' device (one device synchronisation for all value checks)."""
    rows, keep_index, keep_count, flags, messages = _dense_compaction_args(caches, rows, keep_index, keep_count,
                                                                           check_values)
    _check_integer("held", held, 1)
    _check_integer("start", start, 1)
    row_count, slots = rows.numel(), caches[0].shape[3]
    for name, tensor in (("held", held), ("start", start)):
        if tensor.numel() != row_count:
            raise ValueError(f"{name} must have one entry per row (R = {row_count}), got {tensor.numel()}")
    held, start = (t.to(device=rows.device, dtype=torch.long) for t in (held, start))
    if row_count and check_values:
        width = keep_index.shape[-1]
        valid = torch.arange(width, device=rows.device) < keep_count.view(1, -1, 1, 1)
        flags["held"] = ((held >= keep_count) & (held <= slots)).all()
        flags["start"] = ((start >= 0) & (start < slots)).all()
        flags["keep_below_held"] = ((keep_index < held.view(1, -1, 1, 1)) | ~valid).all()
    _raise_on_failed(flags, messages | {
        "held": f"held must be, per row, in [keep_count, slots={slots}]",
        "start": f"start must be, per row, in [0, slots={slots})",
        "keep_below_held": "keep_index must hold, for j < keep_count[r], slot indices below held[r]",
    })
    return rows, keep_index, keep_count, held, start


def _dense_compaction_args(
    caches: Sequence[torch.Tensor], rows: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor,
    check_values: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
    """Shape checks (raised now) and device-side value flags (raised by the caller, in one sync) of a compaction."""
    if len(caches) == 0:
        raise ValueError("compact_ needs at least one cache tensor")
    _check_integer("rows", rows, 1)
    _check_integer("keep_index", keep_index, 4)
    _check_integer("keep_count", keep_count, 1)
    row_count = rows.numel()
    cache = caches[0]
    for index, tensor in enumerate(caches):
        _check_dense_shape("cache" if len(caches) == 1 else f"caches[{index}]", tensor, keep_index, row_count)
        if (tensor.shape[1], tensor.shape[3], tensor.device) != (cache.shape[1], cache.shape[3], cache.device):
            raise ValueError(f"caches[{index}] must share caches[0]'s batch, slots and device: got shape "
                             f"{tuple(tensor.shape)} on {tensor.device}, caches[0] {tuple(cache.shape)} on {cache.device}")
    _, batch, _, slots, _ = cache.shape
    width = keep_index.shape[-1]
    if keep_count.numel() != row_count:
        raise ValueError(f"keep_count must have one entry per row (R = {row_count}), got {keep_count.numel()}")
    device = cache.device
    rows, keep_index, keep_count = (t.to(device=device, dtype=torch.long) for t in (rows, keep_index, keep_count))
    flags = {}
    if row_count and check_values:
        ordered_rows = rows.sort().values
        flags["rows"] = (ordered_rows[0] >= 0) & (ordered_rows[-1] < batch) & (ordered_rows.diff() > 0).all()
        if width:
            flags.update(_keep_flags(keep_index, keep_count, slots))
    messages = {
        "rows": f"rows must hold distinct batch indices in [0, batch={batch})",
        "keep_count": f"keep_count entries must be in [0, K={width}]",
        "keep_index": f"keep_index must hold, for j < keep_count[r], strictly increasing slot indices in [0, slots={slots})",
    }
    return rows, keep_index, keep_count, flags, messages


def check_paged_compaction_args(
    kv_caches: Sequence[torch.Tensor], block_table: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the arguments of ``compact_paged_``; returns block_table, keep_index, keep_count as int64 on the
    caches' device."""
    if len(kv_caches) == 0:
        raise ValueError("kv_caches must hold at least one layer tensor")
    first = kv_caches[0]
    if first.dim() != 5:
        raise ValueError(
            f"each kv_caches tensor must be [planes, num_blocks, block_size, kv_heads, head_size] (vLLM FlashAttention "
            f"layout, planes = 2 for K and V), got shape {tuple(first.shape)}"
        )
    for layer, tensor in enumerate(kv_caches):
        if (tensor.shape, tensor.stride(), tensor.dtype, tensor.device) != (first.shape, first.stride(), first.dtype, first.device):
            raise ValueError(
                f"kv_caches[{layer}] must match kv_caches[0] in shape, strides, dtype and device; got "
                f"{tuple(tensor.shape)}/{tensor.stride()}/{tensor.dtype}/{tensor.device} vs "
                f"{tuple(first.shape)}/{first.stride()}/{first.dtype}/{first.device}"
            )
    layers = len(kv_caches)
    _, num_blocks, block_size, heads, _ = first.shape
    _check_integer("block_table", block_table, 2)
    _check_integer("keep_index", keep_index, 4)
    _check_integer("keep_count", keep_count, 1)
    row_count, max_blocks = block_table.shape
    layers_g, index_rows, heads_g, width = keep_index.shape
    if layers_g not in (1, layers) or index_rows != row_count or heads_g not in (1, heads):
        raise ValueError(
            f"keep_index must be [layers_g, R, heads_g, K] with layers_g in {{1, {layers}}}, R = block_table rows = "
            f"{row_count}, heads_g in {{1, {heads}}}; got {tuple(keep_index.shape)}"
        )
    if keep_count.numel() != row_count:
        raise ValueError(f"keep_count must have one entry per block-table row (R = {row_count}), got {keep_count.numel()}")
    device = first.device
    block_table, keep_index, keep_count = (t.to(device=device, dtype=torch.long) for t in (block_table, keep_index, keep_count))
    slot_limit = max_blocks * block_size
    if slot_limit >= 2**31:
        raise ValueError(f"max_blocks * block_size must be < 2**31 (32-bit slot math), got {slot_limit}")
    flags = {}
    if row_count and width:
        flags.update(_keep_flags(keep_index, keep_count, slot_limit))
        # Blocks a row reads or writes: those below its highest kept slot. They must exist and belong to one row
        # only: a block shared by two rows (prefix caching) would let one program overwrite another's source.
        valid = torch.arange(width, device=device) < keep_count.view(1, -1, 1, 1)
        highest = torch.where(valid, keep_index, -1).amax(dim=(0, 2, 3))  # [R]
        blocks_used = torch.div(highest, block_size, rounding_mode="floor") + 1
        touched = torch.arange(max_blocks, device=device).view(1, -1) < blocks_used.view(-1, 1)
        in_range = torch.where(touched, (block_table >= 0) & (block_table < num_blocks), True).all()
        # Untouched entries become distinct negative numbers, so "all distinct" only constrains the touched ones.
        placeholders = -1 - torch.arange(block_table.numel(), device=device).view_as(block_table)
        ordered = torch.where(touched, block_table, placeholders).flatten().sort().values
        flags["block_table"] = in_range & (ordered.diff() > 0).all()
    _raise_on_failed(flags, {
        "keep_count": f"keep_count entries must be in [0, K={width}]",
        "keep_index": (
            f"keep_index must hold, for j < keep_count[r], strictly increasing slot indices in "
            f"[0, max_blocks * block_size = {slot_limit})"
        ),
        "block_table": (
            f"block_table entries of the blocks a row touches must be block ids in [0, num_blocks={num_blocks}) that no "
            "other row of the call uses (no shared blocks: prefix caching must be off)"
        ),
    })
    return block_table, keep_index, keep_count

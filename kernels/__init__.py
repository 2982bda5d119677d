"""Kernels behind the cache storage and the fast decode step: compaction, attention scores, decode attention, the
fused per-layer ops and the skinny projections of a decode step.

Each op has a torch reference (``reference.py``, the specification, also the CPU path). CUDA tensors take the
Triton kernels (``compaction.py``, ``paged.py``, ``attention_score_kernel.py``, ``decode_attention_kernel.py``,
``fused_decode.py``, ``skinny_linear.py``) when Triton is installed: the one dispatch rule and its switch (``DYNTS_KERNELS``,
``set_kernel_mode``) are in ``dispatch.py`` and serve ``linear_attention/`` too. Triton is imported only when a kernel
first runs, so CPU installs without it import this package fine.
A split-K projection's splits are summed by the last of its programs to finish, in the same launch, through
per-stream counters (``last_arrival.py``).
``custom_ops.py`` registers ``torch.ops.dynts.decode_attention``, the form of ``decode_attention`` that
``torch.compile`` traces without a graph break.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import custom_ops  # noqa: F401  (registers torch.ops.dynts.decode_attention for torch.compile)
from .dispatch import KERNEL_MODES, kernel_mode, kernels_in_mode, set_kernel_mode, use_triton
from .decode_step_checks import (
    check_concat_linear_args, check_rms_norm_args, check_rotary_and_store_args, check_silu_gated_linear_args,
)
from .reference import (
    REDUCTIONS, attention_scores_reference, compact_paged_reference_, compact_reference_, compact_ring_reference_,
    concat_linear_reference, decode_attention_reference, rms_norm_reference, rotary_and_store_reference,
    silu_gated_linear_reference,
)
from .validation import check_compaction_args, check_paged_compaction_args, check_ring_compaction_args

__all__ = [
    "KERNEL_MODES", "REDUCTIONS", "attention_scores", "compact_", "compact_paged_", "compact_ring_", "concat_linear",
    "decode_attention", "kernel_mode", "kernels_in_mode", "rms_norm", "rotary_and_store", "set_kernel_mode",
    "silu_gated_linear", "use_triton",
]

# Longest query window one score-kernel call handles; longer windows (a prefill) are split into causal chunks.
MAX_QUERY_CHUNK = 64
# Most activation rows the skinny projection kernels take; more rows are a real GEMM, which cuBLAS runs well.
SKINNY_MAX_ROWS = 64


def compact_(
    cache: torch.Tensor | Sequence[torch.Tensor], rows: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor,
    *, check_values: bool = True,
) -> None:
    """In place: move each selected row's kept slots to the front. See ``reference.compact_reference_``.

    ``cache``: one tensor, or several compacted alike (K and V; a slot table's positions and states), sharing their
    batch, slots and device. All layers in one launch per tensor on the Triton path, any dtype (the int64 positions
    tensor too, as [.., slots, 1]). Arguments are validated first (one device sync for all the tensors); bad ones
    raise ValueError. ``check_values=False`` skips the value checks and their sync, for arguments valid by
    construction (a ``dynts.policy.KeepPlan`` and distinct rows): shapes are still checked.
    """
    caches = [cache] if isinstance(cache, torch.Tensor) else list(cache)
    rows, keep_index, keep_count = check_compaction_args(caches, rows, keep_index, keep_count, check_values=check_values)
    for tensor in caches:
        if not use_triton(tensor):
            compact_reference_(tensor, rows, keep_index, keep_count)
        else:
            from .compaction import compact_dense_

            compact_dense_(tensor, rows, keep_index, keep_count)


def compact_ring_(
    cache: torch.Tensor | Sequence[torch.Tensor], rows: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor,
    held: torch.Tensor, start: torch.Tensor, *, check_values: bool = True,
) -> None:
    """In place, the ring layout: move each selected row's kept slots to the end of its ``held`` slots, so that a
    kept tail does not move. See ``reference.compact_ring_reference_``; tensors and checks as in ``compact_``."""
    caches = [cache] if isinstance(cache, torch.Tensor) else list(cache)
    rows, keep_index, keep_count, held, start = check_ring_compaction_args(
        caches, rows, keep_index, keep_count, held, start, check_values=check_values)
    for tensor in caches:
        if not use_triton(tensor):
            compact_ring_reference_(tensor, rows, keep_index, keep_count, held, start)
        else:
            from .compaction import compact_dense_

            compact_dense_(tensor, rows, keep_index, keep_count, ring=(held, start))


def compact_paged_(
    kv_caches: Sequence[torch.Tensor], block_table: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor
) -> None:
    """In place, paged KV caches (vLLM CUDA layout, one tensor per layer). See ``reference.compact_paged_reference_``.

    All layers and both K and V in one launch on the Triton path. Arguments are validated first (one device sync).
    """
    block_table, keep_index, keep_count = check_paged_compaction_args(kv_caches, block_table, keep_index, keep_count)
    if not use_triton(kv_caches[0]):
        compact_paged_reference_(kv_caches, block_table, keep_index, keep_count)
    else:
        from .paged import compact_paged_ as compact_paged_triton_

        compact_paged_triton_(kv_caches, block_table, keep_index, keep_count)


def attention_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_len: torch.Tensor,
    *,
    scale: float,
    query_count: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    reduce_queries: str = "sum",
    reduce_group: str = "sum",
) -> torch.Tensor:
    """Causal softmax attention of the newest queries over cached keys, reduced per key slot.

    See ``reference.attention_scores_reference``. Windows longer than ``MAX_QUERY_CHUNK`` are processed in
    causal chunks (sum and max are exact across chunks; mean divides the sum by the query count). Arbitrary
    ``query_valid`` / ``key_valid`` masks (padding between kept tokens, rare) take the torch reference.
    """
    batch, _, window, _ = queries.shape
    key_len = key_len.to(queries.device)
    if query_valid is not None or key_valid is not None:
        return attention_scores_reference(
            queries, keys, key_len, scale=scale, query_count=query_count, key_start=key_start,
            query_valid=query_valid, key_valid=key_valid, reduce_queries=reduce_queries, reduce_group=reduce_group,
        )
    if query_count is None:
        query_count = torch.full((batch,), window, dtype=torch.long, device=queries.device)
    query_count = query_count.to(queries.device)
    if window <= MAX_QUERY_CHUNK:
        if not use_triton(queries):
            score = attention_scores_reference
        else:
            from .attention_score_kernel import attention_scores_triton as score
        return score(
            queries, keys, key_len, scale=scale, query_count=query_count, key_start=key_start,
            reduce_queries=reduce_queries, reduce_group=reduce_group,
        )
    chunk_reduce = "max" if reduce_queries == "max" else "sum"
    if (chunk_reduce == "max") != (reduce_group == "max"):
        # max over a GQA group does not commute with a sum over query chunks (and vice versa)
        raise ValueError(
            f"a query window of {window} (> {MAX_QUERY_CHUNK}) needs reduce_queries and reduce_group both 'max' or "
            f"both 'sum'/'mean'; got {reduce_queries!r} and {reduce_group!r}"
        )
    total = None
    for start in range(0, window, MAX_QUERY_CHUNK):
        end = min(start + MAX_QUERY_CHUNK, window)
        # The chunk's queries sit just before slot key_len - (window - end); later keys are invisible to them.
        chunk_key_len = key_len - (window - end)
        chunk_count = (query_count - (window - end)).clamp(0, end - start)
        part = attention_scores(
            queries[:, :, start:end], keys, chunk_key_len, scale=scale, query_count=chunk_count,
            key_start=key_start, reduce_queries=chunk_reduce, reduce_group=reduce_group,
        )
        total = part if total is None else (torch.maximum(total, part) if chunk_reduce == "max" else total + part)
    if reduce_queries == "mean":
        total = total / query_count.clamp(min=1).view(batch, 1, 1).float()
    return total


def decode_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, *, scale: float,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step's attention over each row's first ``lengths`` slots (``start``: the ring layout's per-row
    start). See ``reference.decode_attention_reference``. No host synchronisation: safe inside a captured CUDA
    graph."""
    if not use_triton(queries):
        return decode_attention_reference(queries, keys, values, lengths, scale=scale, start=start)
    from .decode_attention_kernel import decode_attention as decode_attention_triton

    return decode_attention_triton(queries, keys, values, lengths, scale=scale, start=start)


# Per-layer elementwise work of a Llama / Qwen2 decode step, fused (``fused_decode.py``). Arguments are checked
# from shapes and dtypes only (no device sync: safe inside a captured CUDA graph); bad ones raise ValueError.
def rms_norm(
    hidden: torch.Tensor, weight: torch.Tensor, *, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new residual stream): RMSNorm after the residual add. See ``reference.rms_norm_reference``."""
    check_rms_norm_args(hidden, weight, eps, residual)
    if not use_triton(hidden):
        return rms_norm_reference(hidden, weight, eps=eps, residual=residual)
    from .fused_decode import rms_norm as rms_norm_triton

    return rms_norm_triton(hidden, weight, eps=eps, residual=residual)


def rotary_and_store(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    key_cache: torch.Tensor, value_cache: torch.Tensor, layer: int, slots: torch.Tensor,
) -> torch.Tensor:
    """Rotated queries; the rotated keys and the values written at each row's ``slots`` entry of ``layer``. See
    ``reference.rotary_and_store_reference`` (``slots`` must lie in [0, capacity): they are not read on the host)."""
    check_rotary_and_store_args(queries, keys, values, cos, sin, key_cache, value_cache, layer, slots)
    if not use_triton(queries):
        return rotary_and_store_reference(queries, keys, values, cos, sin, key_cache, value_cache, layer, slots)
    from .fused_decode import rotary_and_store as rotary_and_store_triton

    return rotary_and_store_triton(queries, keys, values, cos, sin, key_cache, value_cache, layer, slots)


# The projections of a decode step (``skinny_linear.py``), checked the same way.
def _skinny(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether a projection of ``x`` takes the skinny Triton kernel: few rows, weights stored row by row."""
    return use_triton(x) and x.shape[0] <= SKINNY_MAX_ROWS and all(weight.is_contiguous() for weight in weights)


def concat_linear(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """``x`` ([rows, in]) projected by one to three weights ([out_i, in], read in place) plus their biases (all or
    none), side by side. See ``reference.concat_linear_reference``. No host synchronisation."""
    check_concat_linear_args(x, weights, biases)
    if not _skinny(x, weights):
        return concat_linear_reference(x, weights, biases)
    from .skinny_linear import concat_linear as concat_linear_triton

    return concat_linear_triton(x, list(weights), None if biases is None else list(biases))


def silu_gated_linear(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
    gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu(x @ gate_weight^T + gate_bias) * (x @ up_weight^T + up_bias)`` in one pass over both weights. See
    ``reference.silu_gated_linear_reference``. No host synchronisation."""
    check_silu_gated_linear_args(x, gate_weight, up_weight, gate_bias, up_bias)
    if not _skinny(x, (gate_weight, up_weight)):
        return silu_gated_linear_reference(x, gate_weight, up_weight, gate_bias, up_bias)
    from .skinny_linear import silu_gated_linear as silu_gated_linear_triton

    return silu_gated_linear_triton(x, gate_weight, up_weight, gate_bias, up_bias)

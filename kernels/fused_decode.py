"""Triton kernels for the per-layer elementwise work of a Llama / Qwen2 decode step (one token per row).

At batch 20 on an 8B model a decode step ran ~1,000 small elementwise, norm and copy kernels (2.5 ms of a 9.1 ms
step, issue 17); these fuse each group into one launch:

* ``rms_norm``: residual add + RMSNorm, one program per row (the whole hidden size in registers);
* ``rotary_and_store``: RoPE of the queries and keys plus the write of the keys and values into the dense storage
  at each row's physical end, one program per (query or KV head, row).

(The gated MLP's SiLU-and-mul is fused into its projections: ``skinny_linear.silu_gated_linear``.)

Each rounds where transformers rounds (the sum of the residual add, the normalised value, each RoPE product) and keeps everything else in float32, so on a GPU the results match the torch references in
``reference.py`` to the last bit in almost every element; fused multiply-adds are disabled for the same reason
(``enable_fp_fusion=False``). Inputs were validated by the dispatchers in ``dynts.kernels``
(``decode_step_checks``); no values are read on the host, so the launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dependent_launch import dependent_launch_options, wait_for_prior_kernel


@triton.jit
def _rms_norm_kernel(
    hidden, residual, weight, normed, summed, eps, size,
    stride_hidden, stride_residual, stride_normed, stride_summed,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, GRID_DEPENDENT: tl.constexpr,
):
    wait_for_prior_kernel(GRID_DEPENDENT)
    row = tl.program_id(0).to(tl.int64)
    column = tl.arange(0, BLOCK)
    mask = column < size
    x = tl.load(hidden + row * stride_hidden + column, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual + row * stride_residual + column, mask=mask, other=0.0).to(tl.float32)
        rounded = (x + r).to(summed.dtype.element_ty)  # the new residual stream, rounded as torch's add rounds it
        tl.store(summed + row * stride_summed + column, rounded, mask=mask)
        x = rounded.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / size
    normalized = (x * tl.rsqrt(variance + eps)).to(normed.dtype.element_ty).to(tl.float32)
    w = tl.load(weight + column, mask=mask, other=0.0).to(tl.float32)
    tl.store(normed + row * stride_normed + column, (w * normalized).to(normed.dtype.element_ty), mask=mask)


def rms_norm(
    hidden: torch.Tensor, weight: torch.Tensor, *, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path of ``reference.rms_norm_reference`` (same arguments and results)."""
    size = hidden.shape[-1]
    rows_in = hidden.reshape(-1, size)
    normed = torch.empty(rows_in.shape, dtype=hidden.dtype, device=hidden.device)
    if residual is None:
        residual_in, summed = rows_in, rows_in  # not read, not written
    else:
        residual_in = residual.reshape(-1, size)
        summed = torch.empty_like(normed)
    block = triton.next_power_of_2(size)
    # The whole row sits in registers: 8-16 elements per thread.
    warps = min(16, max(1, block // 512))
    if rows_in.shape[0] > 0:
        _rms_norm_kernel[(rows_in.shape[0],)](
            rows_in, residual_in, weight, normed, summed, float(eps), size,
            rows_in.stride(0), residual_in.stride(0), normed.stride(0), summed.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps, enable_fp_fusion=False,
            **dependent_launch_options(hidden.device),
        )
    normed = normed.view(hidden.shape)
    return normed, hidden if residual is None else summed.view(hidden.shape)


@triton.jit
def _rotate_half(x_ptr, cos_ptr, sin_ptr, half, HALF: tl.constexpr):
    """(first half, second half) of ``x * cos + rotate_half(x) * sin``, rounded like transformers (each product
    to x's dtype, then the sum)."""
    mask = half < HALF
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + half, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + half, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + HALF + half, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + half, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + HALF + half, mask=mask, other=0.0).to(tl.float32)
    first = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
    second = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    return first.to(dtype), second.to(dtype)


@triton.jit
def _rotary_and_store_kernel(
    queries, keys, values, cos, sin, rotated_queries, key_cache, value_cache, slots,
    stride_q_row, stride_q_head, stride_k_row, stride_k_head, stride_v_row, stride_v_head,
    stride_cos_row, stride_sin_row, stride_out_row, stride_out_head,
    stride_kc_row, stride_kc_head, stride_kc_slot, stride_vc_row, stride_vc_head, stride_vc_slot,
    Q_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    VALUE_DIM: tl.constexpr, BLOCK_VALUE: tl.constexpr, GRID_DEPENDENT: tl.constexpr,
):
    wait_for_prior_kernel(GRID_DEPENDENT)
    head = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    half = tl.arange(0, BLOCK_HALF)
    mask = half < HALF
    cos_row = cos + row * stride_cos_row
    sin_row = sin + row * stride_sin_row
    if head < Q_HEADS:
        first, second = _rotate_half(queries + row * stride_q_row + head * stride_q_head, cos_row, sin_row, half, HALF)
        out = rotated_queries + row * stride_out_row + head * stride_out_head
        tl.store(out + half, first, mask=mask)
        tl.store(out + HALF + half, second, mask=mask)
    else:
        kv_head = head - Q_HEADS
        slot = tl.load(slots + row).to(tl.int64)
        first, second = _rotate_half(keys + row * stride_k_row + kv_head * stride_k_head, cos_row, sin_row, half, HALF)
        key_slot = key_cache + row * stride_kc_row + kv_head * stride_kc_head + slot * stride_kc_slot
        tl.store(key_slot + half, first, mask=mask)
        tl.store(key_slot + HALF + half, second, mask=mask)
        feature = tl.arange(0, BLOCK_VALUE)
        value = tl.load(values + row * stride_v_row + kv_head * stride_v_head + feature, mask=feature < VALUE_DIM)
        value_slot = value_cache + row * stride_vc_row + kv_head * stride_vc_head + slot * stride_vc_slot
        tl.store(value_slot + feature, value, mask=feature < VALUE_DIM)


def rotary_and_store(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    key_cache: torch.Tensor, value_cache: torch.Tensor, layer: int, slots: torch.Tensor,
) -> torch.Tensor:
    """Triton path of ``reference.rotary_and_store_reference`` (same arguments and effects)."""
    rows, q_heads, dim = queries.shape
    kv_heads, value_dim = keys.shape[1], values.shape[2]
    rotated = torch.empty(rows, q_heads, dim, dtype=queries.dtype, device=queries.device)
    layer_keys, layer_values = key_cache[layer], value_cache[layer]  # views: the layer's offset is in the pointer
    if rows > 0:
        _rotary_and_store_kernel[(q_heads + kv_heads, rows)](
            queries, keys, values, cos, sin, rotated, layer_keys, layer_values, slots,
            queries.stride(0), queries.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
            cos.stride(0), sin.stride(0), rotated.stride(0), rotated.stride(1),
            layer_keys.stride(0), layer_keys.stride(1), layer_keys.stride(2),
            layer_values.stride(0), layer_values.stride(1), layer_values.stride(2),
            Q_HEADS=q_heads, HALF=dim // 2, BLOCK_HALF=triton.next_power_of_2(dim // 2),
            VALUE_DIM=value_dim, BLOCK_VALUE=triton.next_power_of_2(value_dim),
            num_warps=1, enable_fp_fusion=False, **dependent_launch_options(queries.device),
        )
    return rotated

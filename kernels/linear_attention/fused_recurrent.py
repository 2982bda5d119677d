"""Token-by-token gated delta rule for decode (one or a few tokens), forward only, state updated in place.

One program per (sequence, value head, block of value channels) keeps its [key_dim, BV] slice of the float32
state in registers across the tokens, so the state is read once and written once per call. Inputs may be
strided views (transformers passes slices of one projection): only the last dim must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 32


@triton.jit
def _fused_recurrent_kernel(
    q, k, v, g, beta, o, h0, ht, cu_seqlens, scale, T,
    stride_q_batch, stride_q_token, stride_q_head,
    stride_k_batch, stride_k_token, stride_k_head,
    stride_v_batch, stride_v_token, stride_v_head,
    stride_g_batch, stride_g_token, stride_g_head,
    stride_beta_batch, stride_beta_token, stride_beta_head,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr, L2NORM: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
):
    i_seq_head = tl.program_id(0)
    i_v = tl.program_id(1)
    i_seq = i_seq_head // HV
    hv = i_seq_head % HV
    h = hv // (HV // H)
    if IS_VARLEN:
        batch = i_seq * 0
        bos = tl.load(cu_seqlens + i_seq).to(tl.int64)
        eos = tl.load(cu_seqlens + i_seq + 1).to(tl.int64)
    else:
        batch = i_seq.to(tl.int64)
        bos = batch * 0
        eos = bos + T

    cols_k = tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    k_ok = cols_k < K
    v_ok = cols_v < V
    state_offset = ((i_seq * HV + hv) * K + cols_k[:, None]).to(tl.int64) * V + cols_v[None, :]
    state_mask = k_ok[:, None] & v_ok[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_S = tl.load(h0 + state_offset, mask=state_mask, other=0.0)

    for t in range(bos, eos):
        p_q = q + batch * stride_q_batch + t * stride_q_token + h * stride_q_head
        p_k = k + batch * stride_k_batch + t * stride_k_token + h * stride_k_head
        p_v = v + batch * stride_v_batch + t * stride_v_token + hv * stride_v_head
        p_g = g + batch * stride_g_batch + t * stride_g_token + hv * stride_g_head
        b_q = tl.load(p_q + cols_k, mask=k_ok, other=0.0).to(tl.float32)
        b_k = tl.load(p_k + cols_k, mask=k_ok, other=0.0).to(tl.float32)
        b_v = tl.load(p_v + cols_v, mask=v_ok, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + batch * stride_beta_batch + t * stride_beta_token + hv * stride_beta_head)
        if L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
        if PER_CHANNEL:
            b_g = tl.load(p_g + cols_k, mask=k_ok, other=0.0).to(tl.float32)
            b_S = b_S * tl.exp(b_g)[:, None]
        else:
            b_S = b_S * tl.exp(tl.load(p_g).to(tl.float32))
        b_delta = b_beta.to(tl.float32) * (b_v - tl.sum(b_S * b_k[:, None], 0))
        b_S += b_k[:, None] * b_delta[None, :]
        b_o = tl.sum(b_S * (b_q * scale)[:, None], 0)
        # Output rows are batch-major [B, T, HV, V]; a variable-length batch has B = 1.
        p_o = o + ((batch * T + t) * HV + hv) * V + cols_v
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=v_ok)

    if STORE_FINAL_STATE:
        tl.store(ht + state_offset, b_S, mask=state_mask)


def fused_recurrent_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    final_state: torch.Tensor | None,
    use_qk_l2norm_in_kernel: bool,
    cu_seqlens: torch.Tensor | None,
    per_channel: bool,
) -> torch.Tensor:
    """Launch the decode kernel; writes the final state into ``final_state`` (may be ``initial_state``)."""
    batch, length, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    sequences = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    out = torch.empty(batch, length, value_heads, value_dim, dtype=q.dtype, device=q.device)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if per_channel and g.stride(-1) != 1:
        g = g.contiguous()
    grid = (sequences * value_heads, triton.cdiv(value_dim, BLOCK_V))
    _fused_recurrent_kernel[grid](
        q, k, v, g, beta, out, initial_state, final_state, cu_seqlens, scale, length,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *g.stride()[:3], *beta.stride()[:3],
        H=heads, HV=value_heads, K=key_dim, V=value_dim,
        BK=max(16, triton.next_power_of_2(key_dim)), BV=BLOCK_V,
        PER_CHANNEL=per_channel, L2NORM=use_qk_l2norm_in_kernel, IS_VARLEN=cu_seqlens is not None,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=final_state is not None,
        num_warps=4,
    )
    return out

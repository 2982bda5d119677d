"""Naive recurrent references for gated delta-rule linear attention (the specification of the Triton kernels).

Per value head, the state S is a [key_dim, value_dim] float32 matrix. For every token t:

    S   <- Diag(exp(g_t)) S                      (KDA: g_t has one gate per key channel; GDN: one per head)
    u_t  = beta_t (v_t - S^T k_t)
    S   <- S + k_t u_t^T
    o_t  = S^T (scale q_t)

Layouts follow flash-linear-attention: q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV, K] (KDA) or [B, T, HV]
(GDN), in log space; beta [B, T, HV]; states [N, HV, K, V] float32. HV may be a multiple of H (grouped value
heads: value head hv reads query/key head hv // (HV // H)). Variable-length batches are passed as B = 1 with
``cu_seqlens`` ([N + 1] int, cumulative sequence lengths).
"""

from __future__ import annotations

import torch

L2NORM_EPS = 1e-6


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + 1e-6) over the last dim: the normalisation fla and transformers apply in-kernel."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


def _naive_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, total, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    group = value_heads // heads
    scale = key_dim**-0.5 if scale is None else scale
    per_channel = g.dim() == 4
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2_normalize(q), l2_normalize(k)
    q, k = (x.repeat_interleave(group, dim=2) for x in (q, k))
    if cu_seqlens is None:
        segments = [(b, 0, total) for b in range(batch)]
    else:
        bounds = cu_seqlens.tolist()
        segments = [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    out = torch.zeros(batch, total, value_heads, value_dim, dtype=torch.float32, device=q.device)
    finals = []
    for index, (b, start, end) in enumerate(segments):
        state = torch.zeros(value_heads, key_dim, value_dim, dtype=torch.float32, device=q.device)
        if initial_state is not None:
            state = initial_state[index].float().clone()
        for t in range(start, end):
            decay = g[b, t].exp()
            state = state * (decay[:, :, None] if per_channel else decay[:, None, None])
            delta = beta[b, t, :, None] * (v[b, t] - torch.einsum("hkv,hk->hv", state, k[b, t]))
            state = state + k[b, t, :, :, None] * delta[:, None, :]
            out[b, t] = torch.einsum("hkv,hk->hv", state, q[b, t] * scale)
        finals.append(state)
    final_state = torch.stack(finals) if output_final_state else None
    return out, final_state


def naive_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention, token by token in float32; g is [B, T, HV, K] (one gate per key channel).

    Returns the output [B, T, HV, V] in q's dtype and, if asked, the final state [N, HV, K, V] float32.
    """
    out, final_state = _naive_recurrent(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens
    )
    return out.to(q.dtype), final_state


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet, token by token in float32; g is [B, T, HV] (one gate per head).

    Returns the output [B, T, HV, V] in q's dtype and, if asked, the final state [N, HV, K, V] float32.
    """
    out, final_state = _naive_recurrent(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens
    )
    return out.to(q.dtype), final_state

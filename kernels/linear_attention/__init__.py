"""Linear-attention ops for hybrid models: Kimi Delta Attention (KDA) and Gated DeltaNet (GDN), forward only.

Signatures follow flash-linear-attention (``fla.ops.kda`` / ``fla.ops.gated_delta_rule``) so the ops can serve
transformers' calls (see ``dynts.integrations.hf_linear_attention``):

    o, final_state = chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None)

q, k [B, T, H, K]; v [B, T, HV, V] (HV a multiple of H); g in log space, [B, T, HV, K] for KDA and [B, T, HV]
for GDN; beta [B, T, HV]; states [N, HV, K, V] float32; o [B, T, HV, V] in q's dtype. Variable-length batches:
B = 1 and ``cu_seqlens`` [N + 1]. ``chunk_*`` is the prefill (chunk 64); ``fused_recurrent_*`` the decode,
which by default writes the final state into ``initial_state`` (``inplace_final_state=True``).

Which path runs follows ``dynts.kernels.dispatch``: the Triton kernels for CUDA tensors (and for CPU tensors under
``TRITON_INTERPRET=1`` in mode ``triton``, as the tests use), else the naive float32 recurrence in ``naive.py`` (the
specification the kernels are tested against).
"""

from __future__ import annotations

import torch

from ..dispatch import use_triton
from .common import check_cu_seqlens_values, check_inputs
from .naive import naive_recurrent_gated_delta_rule, naive_recurrent_kda

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_kda",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_kda",
    "naive_recurrent_gated_delta_rule",
    "naive_recurrent_kda",
]


def _chunk(op: str, per_channel: bool, q, k, v, g, beta, scale, initial_state, output_final_state,
           use_qk_l2norm_in_kernel, cu_seqlens):
    check_inputs(op, q, k, v, g, beta, initial_state, cu_seqlens, per_channel)
    if cu_seqlens is not None:
        check_cu_seqlens_values(op, cu_seqlens, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not use_triton(q):
        naive = naive_recurrent_kda if per_channel else naive_recurrent_gated_delta_rule
        return naive(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                     cu_seqlens)
    from .chunk import chunk_delta_rule_triton  # imports Triton: only when a kernel runs

    return chunk_delta_rule_triton(q, k, v, g, beta, scale, initial_state, output_final_state,
                                   use_qk_l2norm_in_kernel, cu_seqlens, per_channel)


def _fused_recurrent(op: str, per_channel: bool, q, k, v, g, beta, scale, initial_state, output_final_state,
                     use_qk_l2norm_in_kernel, cu_seqlens, inplace_final_state):
    check_inputs(op, q, k, v, g, beta, initial_state, cu_seqlens, per_channel)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    in_place = inplace_final_state and initial_state is not None
    if in_place and not initial_state.is_contiguous():
        raise ValueError(f"{op}: inplace_final_state needs a contiguous initial_state")
    if not use_triton(q):
        naive = naive_recurrent_kda if per_channel else naive_recurrent_gated_delta_rule
        out, final_state = naive(q, k, v, g, beta, scale, initial_state, True, use_qk_l2norm_in_kernel, cu_seqlens)
        if in_place:
            initial_state.copy_(final_state)
            final_state = initial_state
        return out, final_state if output_final_state else None
    if in_place:
        final_state = initial_state
    elif output_final_state:
        sequences = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        final_state = q.new_empty(sequences, v.shape[2], q.shape[-1], v.shape[-1], dtype=torch.float32)
    else:
        final_state = None
    if initial_state is not None and not initial_state.is_contiguous():
        initial_state = initial_state.contiguous()
    from .fused_recurrent import fused_recurrent_delta_rule_triton  # imports Triton: only when a kernel runs

    out = fused_recurrent_delta_rule_triton(q, k, v, g, beta, scale, initial_state, final_state,
                                            use_qk_l2norm_in_kernel, cu_seqlens, per_channel)
    return out, final_state if output_final_state else None


def chunk_kda(
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
    """KDA prefill, chunked (64 tokens). g: [B, T, HV, K] log-space per-channel gate. Returns (o, final_state)."""
    return _chunk("chunk_kda", True, q, k, v, g, beta, scale, initial_state, output_final_state,
                  use_qk_l2norm_in_kernel, cu_seqlens)


def chunk_gated_delta_rule(
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
    """GDN prefill, chunked (64 tokens). g: [B, T, HV] log-space per-head gate. Returns (o, final_state)."""
    return _chunk("chunk_gated_delta_rule", False, q, k, v, g, beta, scale, initial_state, output_final_state,
                  use_qk_l2norm_in_kernel, cu_seqlens)


def fused_recurrent_kda(
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
    inplace_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA decode, token by token. With ``inplace_final_state`` the final state overwrites ``initial_state``."""
    return _fused_recurrent("fused_recurrent_kda", True, q, k, v, g, beta, scale, initial_state,
                            output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, inplace_final_state)


def fused_recurrent_gated_delta_rule(
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
    inplace_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GDN decode, token by token. With ``inplace_final_state`` the final state overwrites ``initial_state``."""
    return _fused_recurrent("fused_recurrent_gated_delta_rule", False, q, k, v, g, beta, scale, initial_state,
                            output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, inplace_final_state)

"""Shared checks of the linear-attention ops (which kernel runs is decided by ``dynts.kernels.dispatch``)."""

from __future__ import annotations

import torch

from ..dispatch import interpreting  # noqa: F401  (the kernels pick single launch shapes under the interpreter)

CHUNK_SIZE = 64
# Register budget of the kernels: a whole key row and a whole value row (padded to a power of two) per program.
MAX_HEAD_DIM = 256
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_inputs(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    per_channel: bool,
) -> None:
    """Raise ValueError naming the offending argument when shapes, dtypes or devices do not fit."""
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be [batch, tokens, heads, key_dim], got shape {tuple(q.shape)}")
    batch, tokens, heads, key_dim = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"{op}: v must be [batch, tokens, value_heads, value_dim] with q's batch and tokens, "
                         f"got {tuple(v.shape)}")
    value_heads, value_dim = v.shape[2], v.shape[3]
    if value_heads % heads != 0:
        raise ValueError(f"{op}: v's value_heads ({value_heads}) must be a multiple of q's heads ({heads})")
    for name, dim in (("key_dim", key_dim), ("value_dim", value_dim)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{op}: {name} must be in [1, {MAX_HEAD_DIM}], got {dim}")
    gate_shape = (batch, tokens, value_heads, key_dim) if per_channel else (batch, tokens, value_heads)
    if tuple(g.shape) != gate_shape:
        kind = "[batch, tokens, value_heads, key_dim] (one gate per key channel)" if per_channel else \
            "[batch, tokens, value_heads] (one gate per head)"
        raise ValueError(f"{op}: g must be {kind} = {gate_shape}, got {tuple(g.shape)}")
    if tuple(beta.shape) != (batch, tokens, value_heads):
        raise ValueError(f"{op}: beta must be [batch, tokens, value_heads] = {(batch, tokens, value_heads)}, "
                         f"got {tuple(beta.shape)}")
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dtype not in INPUT_DTYPES:
            raise ValueError(f"{op}: {name} must be bfloat16, float16 or float32, got {tensor.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, tensor in (("g", g), ("beta", beta)):
        if not tensor.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating tensor, got {tensor.dtype}")
    for name, tensor in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if tensor.device != q.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}, q on {q.device}; all inputs must share a device")
    sequences = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"{op}: with cu_seqlens the batch must be flattened to 1, got batch {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"{op}: cu_seqlens must be a 1-D integer tensor [sequences + 1], got "
                             f"{tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
        sequences = cu_seqlens.numel() - 1
    if initial_state is not None:
        expected = (sequences, value_heads, key_dim, value_dim)
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"{op}: initial_state must be [sequences, value_heads, key_dim, value_dim] = "
                             f"{expected}, got {tuple(initial_state.shape)}")
        if initial_state.dtype != torch.float32:
            raise ValueError(f"{op}: initial_state must be float32 (the state is kept in fp32), got "
                             f"{initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"{op}: initial_state is on {initial_state.device}, q on {q.device}")


def check_cu_seqlens_values(op: str, cu_seqlens: torch.Tensor, tokens: int) -> None:
    """Prefill only (reads the values, a host sync): 0 first, non-decreasing, the token count last."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != tokens or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{op}: cu_seqlens must start at 0, not decrease and end at the token count {tokens}, "
                         f"got {bounds}")

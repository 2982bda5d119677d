"""Torch custom ops over the dynts kernels, so that ``torch.compile`` can trace a decode step that calls them.

``torch.ops.dynts.decode_attention`` is opaque to the compiler (no graph break: the fake implementation gives the
output's shape, dtype and device without running anything) and runs ``dynts.kernels.decode_attention`` (Triton on
CUDA, the torch reference elsewhere). Eager callers use that function directly (the op's dispatch costs a few
microseconds per call); code that ``torch.compile`` traces calls the op. Registered on import of ``dynts.kernels``.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("dynts::decode_attention", mutates_args=())
def decode_attention_op(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dynts.kernels.decode_attention`` as an op: [batch, q_heads, dim] queries over each row's first ``lengths``
    slots of [batch, kv_heads, slots, dim] keys and values (``start``: the ring layout's per-row start); returns a new
    [batch, q_heads, value_dim] tensor."""
    from . import decode_attention  # the package is initialised by the time an op runs

    return decode_attention(queries, keys, values, lengths, scale=scale, start=start)


@decode_attention_op.register_fake
def _decode_attention_shape(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    return queries.new_empty(queries.shape[0], queries.shape[1], values.shape[-1])

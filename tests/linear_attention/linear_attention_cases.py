"""Random inputs for the linear-attention ops and the error measure the tests use."""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from dynts.integrations.hf_linear_attention import find_dispatch_points
from dynts.kernels.linear_attention import (
    chunk_gated_delta_rule,
    chunk_kda,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_kda,
    naive_recurrent_gated_delta_rule,
    naive_recurrent_kda,
)

# name -> (chunk op, fused recurrent op, naive reference, one gate per key channel)
OPS = {
    "kda": (chunk_kda, fused_recurrent_kda, naive_recurrent_kda, True),
    "gdn": (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, naive_recurrent_gated_delta_rule, False),
}
TOLERANCE = 0.005  # relative RMSE, outputs and final state (fla's bar)


def relative_rmse(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference||, in float64 on CPU."""
    output, reference = output.double().cpu(), reference.double().cpu()
    return ((output - reference).norm() / reference.norm()).item()


def make_inputs(op: str, batch: int, tokens: int, heads: int, value_heads: int, key_dim: int, value_dim: int, *,
                dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0, gate_scale: float = 1.0,
                sequences: int | None = None) -> dict:
    """q, k, v (dtype), g (log-space gate, fp32), beta (fp32) and a float32 initial state, on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    per_channel = OPS[op][3]
    gate_shape = (batch, tokens, value_heads, key_dim) if per_channel else (batch, tokens, value_heads)
    inputs = dict(
        q=torch.randn(batch, tokens, heads, key_dim, generator=generator).to(dtype),
        k=torch.randn(batch, tokens, heads, key_dim, generator=generator).to(dtype),
        v=torch.randn(batch, tokens, value_heads, value_dim, generator=generator).to(dtype),
        g=F.logsigmoid(torch.randn(gate_shape, generator=generator)) * gate_scale,
        beta=torch.rand(batch, tokens, value_heads, generator=generator),
        initial_state=torch.randn(sequences or batch, value_heads, key_dim, value_dim, generator=generator) * 0.1,
    )
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def naive_fp32(op: str, inputs: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive recurrence on the same (rounded) inputs upcast to fp32, on CPU: output fp32, final state."""
    upcast = {name: tensor.float().cpu() for name, tensor in inputs.items()}
    cu_seqlens = kwargs.pop("cu_seqlens", None)
    return OPS[op][2](**upcast, output_final_state=True, use_qk_l2norm_in_kernel=True,
                      cu_seqlens=None if cu_seqlens is None else cu_seqlens.cpu(), **kwargs)


@contextmanager
def transformers_torch_path(model: torch.nn.Module):
    """Route ``model``'s linear-attention dispatch points to transformers' own torch functions while inside.

    transformers picks fla over its torch code when fla is installed (where fla is installed as the independent
    reference of the benchmarks); the HF tests compare against the torch code whatever is installed.
    """
    points = find_dispatch_points(model)
    originals = [getattr(module, attribute) for module, attribute, _ in points]
    for (module, attribute, _), original in zip(points, originals):
        setattr(module, attribute, inspect.unwrap(original))
    try:
        yield
    finally:
        for (module, attribute, _), original in zip(points, originals):
            setattr(module, attribute, original)

"""Fused decode-step Triton kernels (RMSNorm + residual, RoPE + K/V write) against their torch
references on awkward shapes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="needs triton installed (pip install 'dynts[triton]')")

from kernel_cases import pick  # noqa: E402

from dynts import kernels  # noqa: E402
from dynts.kernels.fused_decode import rms_norm, rotary_and_store  # noqa: E402
from dynts.kernels.skinny_linear import silu_gated_linear  # noqa: E402
from dynts.kernels.reference import (  # noqa: E402
    rms_norm_reference, rotary_and_store_reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One unit in the last place of each dtype, relative.
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def randn(*shape: int, dtype: torch.dtype, device: str, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def assert_matches(got: torch.Tensor, want: torch.Tensor, device: str) -> None:
    """A few units in the last place apart at most (a result is rounded up to three times, and the interpreter
    truncates to bfloat16 where a GPU rounds to nearest); compiled on a GPU, the same bits in almost every element."""
    assert got.dtype == want.dtype and got.shape == want.shape
    ulp = ULP[want.dtype] if want.dtype != torch.float32 else 2.0**-20  # fp32: rsqrt / exp approximations
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=4 * ulp * scale)
    if device == "cuda" and want.dtype != torch.float32:  # fp32 rsqrt / exp approximations differ in the last bits
        assert (got == want).float().mean().item() >= 0.99


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel_matches_reference(device, dtype, with_residual):
    generator = torch.Generator().manual_seed(3)
    rows, size = 5, pick(device, 100, 3584)  # not a power of two (Qwen-7B's hidden size on the GPU)
    # Rows of a wider buffer (strided), as a step's [rows, 1, size] slices can be.
    hidden = randn(rows, 1, size + 24, dtype=dtype, device=device, generator=generator)[..., :size]
    residual = randn(rows, 1, size, dtype=dtype, device=device, generator=generator) if with_residual else None
    weight = randn(size, dtype=dtype, device=device, generator=generator)
    normed, summed = rms_norm(hidden, weight, eps=1e-6, residual=residual)
    want_normed, want_summed = rms_norm_reference(hidden, weight, eps=1e-6, residual=residual)
    assert_matches(normed, want_normed, device)
    if with_residual:
        assert_matches(summed, want_summed, device)
    else:
        assert summed is hidden


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, value_dim", [(64, 64), (80, 48), (128, 128)])
def test_rotary_and_store_kernel_matches_reference(device, dtype, dim, value_dim):
    generator = torch.Generator().manual_seed(dim)
    rows, q_heads, kv_heads = 3, pick(device, 4, 32), pick(device, 2, 8)
    layers, capacity = 3, pick(device, 11, 5003)
    # q, k, v as views of one fused projection (strided rows and heads), as a fused qkv GEMM would give them.
    width = q_heads * dim + kv_heads * dim + kv_heads * value_dim
    fused = randn(rows, width, dtype=dtype, device=device, generator=generator)
    queries = fused[:, : q_heads * dim].view(rows, q_heads, dim)
    keys = fused[:, q_heads * dim : (q_heads + kv_heads) * dim].view(rows, kv_heads, dim)
    values = fused[:, (q_heads + kv_heads) * dim :].view(rows, kv_heads, value_dim)
    angles = torch.rand(rows, dim // 2, generator=generator) * 100
    cos = angles.cos().repeat(1, 2).to(device=device, dtype=dtype)
    sin = angles.sin().repeat(1, 2).to(device=device, dtype=dtype)
    key_cache = randn(layers, rows, kv_heads, capacity, dim, dtype=dtype, device=device, generator=generator)
    value_cache = randn(layers, rows, kv_heads, capacity, value_dim, dtype=dtype, device=device, generator=generator)
    want_keys, want_values = key_cache.clone(), value_cache.clone()
    slots = torch.tensor([capacity - 1, 0, capacity // 2], device=device)  # the last slot, the first, a middle one
    rotated = rotary_and_store(queries, keys, values, cos, sin, key_cache, value_cache, 1, slots)
    want = rotary_and_store_reference(queries, keys, values, cos, sin, want_keys, want_values, 1, slots)
    assert_matches(rotated, want, device)
    assert_matches(key_cache, want_keys, device)  # every other slot and layer untouched, bit for bit
    assert torch.equal(value_cache, want_values)  # values are copied, not computed


def test_public_ops_run_the_kernels_on_cuda(device):
    """dynts.kernels routes CUDA tensors to these kernels (CPU tensors take the references, checked above)."""
    if device != "cuda":
        pytest.skip("needs a CUDA GPU: the routing to Triton is for CUDA tensors (CPU tensors take the torch references)")
    generator = torch.Generator().manual_seed(5)
    hidden, residual = (randn(4, 256, dtype=torch.bfloat16, device=device, generator=generator) for _ in range(2))
    weight = randn(256, dtype=torch.bfloat16, device=device, generator=generator)
    for got, want in zip(kernels.rms_norm(hidden, weight, eps=1e-5, residual=residual),
                         rms_norm(hidden, weight, eps=1e-5, residual=residual)):
        assert torch.equal(got, want)
    projection = randn(64, 256, dtype=torch.bfloat16, device=device, generator=generator)
    assert torch.equal(kernels.silu_gated_linear(hidden, projection, projection),
                       silu_gated_linear(hidden, projection, projection))

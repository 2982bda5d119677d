"""The decode-step references (RMSNorm + residual, RoPE + K/V write, SiLU-and-mul) against transformers' own Llama /
Qwen2 modules, and the argument checks of the public ops."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from dynts import kernels
from dynts.kernels.reference import rms_norm_reference, rotary_and_store_reference, silu_and_mul_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def randn(*shape: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, Qwen2RMSNorm])
def test_rms_norm_reference_is_transformers_norm(norm_class, dtype):
    generator = torch.Generator().manual_seed(0)
    norm = norm_class(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=generator))
    hidden = randn(5, 1, 96, dtype=dtype, generator=generator)
    residual = randn(5, 1, 96, dtype=dtype, generator=generator)
    with torch.no_grad():
        normed, summed = rms_norm_reference(hidden, norm.weight, eps=1e-5)
        assert summed is hidden and torch.equal(normed, norm(hidden))
        normed, summed = rms_norm_reference(hidden, norm.weight, eps=1e-5, residual=residual)
        assert torch.equal(summed, residual + hidden) and torch.equal(normed, norm(residual + hidden))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_reference_is_transformers_rotation_and_writes_only_the_slots(dtype):
    generator = torch.Generator().manual_seed(1)
    rows, q_heads, kv_heads, dim, capacity = 3, 4, 2, 64, 9
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=q_heads * dim, num_attention_heads=q_heads,
                                              rope_theta=500000.0))
    queries = randn(rows, q_heads, dim, dtype=dtype, generator=generator)
    keys = randn(rows, kv_heads, dim, dtype=dtype, generator=generator)
    values = randn(rows, kv_heads, dim, dtype=dtype, generator=generator)
    positions = torch.tensor([[17], [4000], [3]])  # ragged rows decode at their own positions
    cos, sin = rotary(queries, positions)  # [rows, 1, dim] in the queries' dtype
    want_q, want_k = apply_rotary_pos_emb(queries.unsqueeze(2), keys.unsqueeze(2), cos, sin)  # [rows, heads, 1, dim]
    key_cache = randn(2, rows, kv_heads, capacity, dim, dtype=dtype, generator=generator)
    value_cache = randn(2, rows, kv_heads, capacity, dim, dtype=dtype, generator=generator)
    before_keys, before_values = key_cache.clone(), value_cache.clone()
    slots = torch.tensor([0, 8, 5])
    rotated = rotary_and_store_reference(queries, keys, values, cos[:, 0], sin[:, 0], key_cache, value_cache, 1, slots)
    assert torch.equal(rotated, want_q[:, :, 0])
    written = torch.zeros(2, rows, kv_heads, capacity, dtype=torch.bool)
    for row, slot in enumerate(slots.tolist()):
        assert torch.equal(key_cache[1, row, :, slot], want_k[row, :, 0])
        assert torch.equal(value_cache[1, row, :, slot], values[row])
        written[1, row, :, slot] = True
    assert torch.equal(key_cache[~written], before_keys[~written])
    assert torch.equal(value_cache[~written], before_values[~written])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_reference_is_the_transformers_mlp(dtype):
    generator = torch.Generator().manual_seed(2)
    config = LlamaConfig(hidden_size=48, num_attention_heads=4, intermediate_size=136, hidden_act="silu")
    mlp = LlamaMLP(config).to(dtype)
    x = randn(4, 1, 48, dtype=dtype, generator=generator)
    with torch.no_grad():
        ours = mlp.down_proj(silu_and_mul_reference(mlp.gate_proj(x), mlp.up_proj(x)))
        assert torch.equal(ours, mlp(x))


# ---------------------------------------------------------------------------------------------------- checks
def _rotary_args(**change):
    args = dict(queries=torch.randn(2, 4, 8), keys=torch.randn(2, 2, 8), values=torch.randn(2, 2, 6),
                cos=torch.randn(2, 8), sin=torch.randn(2, 8), key_cache=torch.zeros(3, 2, 2, 5, 8),
                value_cache=torch.zeros(3, 2, 2, 5, 6), layer=1, slots=torch.tensor([0, 4]))
    args.update(change)
    return args


@pytest.mark.parametrize("change, message", [
    (dict(layer=3), r"layer must be an int in \[0, 3\)"),
    (dict(slots=torch.tensor([0.0, 4.0])), "slots must be an int32/int64 tensor"),
    (dict(slots=torch.tensor([0, 1, 2])), r"slots must be .* \[rows\] = \[2\]"),
    (dict(queries=torch.randn(2, 4, 7)), "head dim must be even"),
    (dict(cos=torch.randn(2, 4)), r"cos must be \[rows, dim\] = \(2, 8\)"),
    (dict(keys=torch.randn(2, 2, 8).half()), "keys must have queries's dtype"),
    (dict(value_cache=torch.zeros(3, 2, 2, 6, 6)), "value_cache must be"),
    (dict(queries=torch.randn(2, 8, 4).transpose(1, 2)), "queries must have unit stride"),
])
def test_rotary_and_store_rejects_bad_arguments(change, message):
    args = _rotary_args(**change)
    with pytest.raises(ValueError, match=message):
        kernels.rotary_and_store(**args)
    assert not args["key_cache"].any() and not args["value_cache"].any()


@pytest.mark.parametrize("call, message", [
    (lambda: kernels.rms_norm(torch.randn(2, 8), torch.ones(8), eps=-1e-6), "eps must be a float >= 0"),
    (lambda: kernels.rms_norm(torch.randn(2, 8), torch.ones(7), eps=1e-6), r"weight must be \[size\] = \[8\]"),
    (lambda: kernels.rms_norm(torch.randn(2, 8), torch.ones(8), eps=1e-6, residual=torch.randn(2, 8).half()),
     "residual must have hidden's dtype"),
    (lambda: kernels.rms_norm(torch.randint(0, 3, (2, 8)), torch.ones(8), eps=1e-6), "hidden must be float32"),
])
def test_norm_rejects_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()

"""Argument checks of the decode-step ops (RMSNorm, rotary embedding + K/V write, the projections).

They read shapes, dtypes and devices only, never values (no device synchronisation: the ops run inside captured
CUDA graphs), and raise ValueError naming the argument and what it must be. No Triton import: the dispatchers in
``dynts.kernels`` check before choosing the torch reference or the Triton kernel.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_float(name: str, tensor: torch.Tensor, unit_stride: bool = True) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if unit_stride and tensor.dim() >= 1 and tensor.shape[-1] > 0 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dim (got strides {tensor.stride()})")


def _check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], *, shape: bool) -> None:
    """All ``tensors`` on the first one's device with its dtype (and its shape when ``shape``)."""
    first_name, first = names[0], tensors[0]
    for name, tensor in zip(names[1:], tensors[1:]):
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device}, {first_name} on {first.device}: they must share a device")
        if tensor.dtype != first.dtype:
            raise ValueError(f"{name} must have {first_name}'s dtype {first.dtype}, got {tensor.dtype}")
        if shape and tensor.shape != first.shape:
            raise ValueError(f"{name} must have {first_name}'s shape {tuple(first.shape)}, got {tuple(tensor.shape)}")


def check_rms_norm_args(hidden: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None) -> None:
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must be [..., size] with size >= 1, got shape {tuple(hidden.shape)}")
    if weight.shape != hidden.shape[-1:]:
        raise ValueError(f"weight must be [size] = [{hidden.shape[-1]}] (hidden's last dim), got {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device}, hidden on {hidden.device}: they must share a device")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or math.isnan(eps) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if residual is not None:
        _check_float("residual", residual)
        _check_same(("hidden", "residual"), (hidden, residual), shape=True)


def check_rotary_and_store_args(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    key_cache: torch.Tensor, value_cache: torch.Tensor, layer: int, slots: torch.Tensor,
) -> None:
    for name, tensor in (("queries", queries), ("keys", keys), ("values", values), ("cos", cos), ("sin", sin),
                         ("key_cache", key_cache), ("value_cache", value_cache)):
        _check_float(name, tensor)
    _check_same(("queries", "keys", "values", "cos", "sin", "key_cache", "value_cache"),
                (queries, keys, values, cos, sin, key_cache, value_cache), shape=False)
    if queries.dim() != 3 or keys.dim() != 3 or values.dim() != 3:
        raise ValueError(f"queries, keys and values must be [rows, heads, dim], got shapes {tuple(queries.shape)}, "
                         f"{tuple(keys.shape)}, {tuple(values.shape)}")
    rows, _, dim = queries.shape
    if dim % 2:
        raise ValueError(f"the head dim must be even (the rotation pairs its halves), got {dim}")
    if keys.shape[0] != rows or keys.shape[2] != dim:
        raise ValueError(f"keys must be [rows={rows}, kv_heads, dim={dim}], got {tuple(keys.shape)}")
    kv_heads = keys.shape[1]
    if values.shape[:2] != (rows, kv_heads):
        raise ValueError(f"values must be [rows={rows}, kv_heads={kv_heads}, value_dim], got {tuple(values.shape)}")
    for name, tensor in (("cos", cos), ("sin", sin)):
        if tensor.shape != (rows, dim):
            raise ValueError(f"{name} must be [rows, dim] = {(rows, dim)}, got {tuple(tensor.shape)}")
    if key_cache.dim() != 5 or key_cache.shape[1:3] != (rows, kv_heads) or key_cache.shape[4] != dim:
        raise ValueError(f"key_cache must be [layers, rows={rows}, kv_heads={kv_heads}, capacity, dim={dim}], got "
                         f"{tuple(key_cache.shape)}")
    expected = (*key_cache.shape[:4], values.shape[2])
    if value_cache.shape != expected:
        raise ValueError(f"value_cache must be [layers, rows, kv_heads, capacity, value_dim] = {expected}, got "
                         f"{tuple(value_cache.shape)}")
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < key_cache.shape[0]:
        raise ValueError(f"layer must be an int in [0, {key_cache.shape[0]}), got {layer!r}")
    if not isinstance(slots, torch.Tensor) or slots.shape != (rows,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an int32/int64 tensor [rows] = [{rows}] (each row's physical end), got "
                         f"{slots.dtype if isinstance(slots, torch.Tensor) else type(slots).__name__} "
                         f"{tuple(getattr(slots, 'shape', ()))}")
    if slots.device != queries.device:
        raise ValueError(f"slots is on {slots.device}, queries on {queries.device}: they must share a device")


def _check_linear_bias(name: str, bias: torch.Tensor, size: int, x: torch.Tensor) -> None:
    _check_float(name, bias)
    _check_same(("x", name), (x, bias), shape=False)
    if bias.shape != (size,):
        raise ValueError(f"{name} must be [{size}] (its weight's output size), got {tuple(bias.shape)}")


def _check_linear_weight(name: str, weight: torch.Tensor, x: torch.Tensor) -> None:
    _check_float(name, weight, unit_stride=False)  # any layout: one not stored row by row takes the reference
    _check_same(("x", name), (x, weight), shape=False)
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{name} must be [out_features, {x.shape[1]}] (x's last dim), got {tuple(weight.shape)}")


def check_concat_linear_args(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None
) -> None:
    _check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be [rows, in_features], got shape {tuple(x.shape)}")
    if not isinstance(weights, (list, tuple)) or not 1 <= len(weights) <= 3:
        raise ValueError(f"weights must be a list of 1 to 3 weight tensors, got {type(weights).__name__} "
                         f"of length {len(weights) if isinstance(weights, (list, tuple)) else '-'}")
    for index, weight in enumerate(weights):
        _check_linear_weight(f"weights[{index}]", weight, x)
    if biases is None:
        return
    if not isinstance(biases, (list, tuple)) or len(biases) != len(weights):
        raise ValueError(f"biases must be None or a list with one bias per weight ({len(weights)}), got "
                         f"{type(biases).__name__} of length {len(biases) if isinstance(biases, (list, tuple)) else '-'}")
    for index, (weight, bias) in enumerate(zip(weights, biases)):
        if bias is None:
            raise ValueError(f"biases[{index}] is None: give every weight a bias (zeros for none) or pass biases=None")
        _check_linear_bias(f"biases[{index}]", bias, weight.shape[0], x)


def check_silu_gated_linear_args(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
    gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None,
) -> None:
    _check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be [rows, in_features], got shape {tuple(x.shape)}")
    _check_linear_weight("gate_weight", gate_weight, x)
    _check_linear_weight("up_weight", up_weight, x)
    if up_weight.shape != gate_weight.shape:
        raise ValueError(f"up_weight must have gate_weight's shape {tuple(gate_weight.shape)}, got "
                         f"{tuple(up_weight.shape)}")
    if (gate_bias is None) != (up_bias is None):
        raise ValueError("gate_bias and up_bias must both be given or both be None")
    if gate_bias is not None:
        _check_linear_bias("gate_bias", gate_bias, gate_weight.shape[0], x)
        _check_linear_bias("up_bias", up_bias, gate_weight.shape[0], x)

"""Triton kernels: the linear layers of a decode step (a few rows of activations, large weights).

At batch 20 a decode step's projections are matrix-vector products in all but name: each weight is read once, and
the few activation rows ride along in L2. cuBLAS ran them at 76-86% of the copy bandwidth on an H200 (issue 17),
the small ones (o_proj, k and v) lowest. Here the weight rows sit on the wide side of the tensor-core product
(``out^T = W @ x^T``, 64 or 128 weight rows per program against the rows padded to 16-64), the weight tiles stream
through a software pipeline, and K is split across programs when the output alone has too few blocks to fill the
GPU (the last split to finish a block of columns sums them in the same launch: ``last_arrival.py``). Two forms:

* ``concat_linear``: ``x @ [W0; W1; W2]^T (+ biases)``, reading up to three weights in place: the q, k and v
  projections in one launch without a concatenated copy of their weights;
* ``silu_gated_linear``: ``silu(x @ Wg^T) * (x @ Wu^T)``: the gate and up projections and the activation in one
  launch (the intermediate activations are never written).

Launch shapes (weight rows and K per tile, pipeline depth, and for ``concat_linear`` the split count) are
autotuned per shape on the card in use. Each result is rounded where ``F.linear`` and transformers round (the
product plus bias once; the gate, the up projection, the SiLU and the product each once): only the order of the
fp32 sums differs from cuBLAS.
References: ``reference.concat_linear_reference`` and ``reference.silu_gated_linear_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dependent_launch import dependent_launch_options, prefetch_to_l2, wait_for_prior_kernel
from .dispatch import dots_in_float32, interpreting, multiprocessors
from .last_arrival import arrival_counters, last_to_arrive

# Splits of K tried with each tile (in the autotuning); K per split is a multiple of SPLIT_K_GRANULE (the widest
# tuned BLOCK_K), so every split walks whole tiles.
SPLIT_COUNTS = (1, 2, 3, 4)
SPLIT_K_GRANULE = 256

_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 256}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
_SMALLEST_BLOCK_N = min(config.kwargs["BLOCK_N"] for config in _CONFIGS)

# Shared memory the pipelined tiles of one program may take: below every recent card's per-block limit (A100 163 KB,
# H100 / H200 227 KB), leaving room for the compiler's own buffers.
SHARED_MEMORY_BUDGET = 144 * 1024


def _fit_stages(weights_per_program: int):
    """An ``early_config_prune``: each config's pipeline shortened until its tiles fit ``SHARED_MEMORY_BUDGET``
    (float32 inputs and the gated kernel's two weights take more per stage), duplicates dropped."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        element = args["x_ptr"].element_size()
        fitted = {}
        for config in configs:
            block_n, block_k = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
            per_stage = (weights_per_program * block_n + args["M_PAD"]) * block_k * element
            stages = max(1, min(config.num_stages, 1 + SHARED_MEMORY_BUDGET // per_stage))
            fitted.setdefault((tuple(sorted(config.kwargs.items())), stages), triton.Config(
                dict(config.kwargs), num_warps=config.num_warps, num_stages=stages))
        return list(fitted.values())

    return prune


def _useful_splits(then):
    """An ``early_config_prune`` for tuning the split count: a split count only where fewer splits leave
    multiprocessors without a program (more would only add partial sums), then the prune ``then``."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        processors = multiprocessors(args["x_ptr"].device, otherwise=1)
        useful = [config for config in configs if (config.kwargs["SPLIT_K"] - 1)
                  * triton.cdiv(args["N_TOTAL"], config.kwargs["BLOCK_N"]) < processors]
        return then(useful, named_args, **kwargs)

    return prune


def _tuned(key: list[str], weights_per_program: int, split_counts: tuple[int, ...] = ()):
    """Autotuned over ``_CONFIGS`` on a GPU, each crossed with ``split_counts`` (as ``SPLIT_K``) when given; the
    first config with the first split count under the interpreter (nothing to time there)."""
    configs = _CONFIGS[:1] if interpreting() else _CONFIGS
    prune = _fit_stages(weights_per_program)
    if split_counts:
        counts = split_counts[:1] if interpreting() else split_counts
        configs = [triton.Config({**config.kwargs, "SPLIT_K": splits}, num_warps=config.num_warps,
                                 num_stages=config.num_stages) for config in configs for splits in counts]
        prune = _useful_splits(prune)
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})


@triton.jit
def _k_range(split, K, SPLIT_K: tl.constexpr, K_GRANULE: tl.constexpr):
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), K_GRANULE) * K_GRANULE
    k_begin = split * k_per_split
    return k_begin, tl.minimum(k_begin + k_per_split, K)  # a split past K has nothing to add: its partial is zero


# Weight columns (of K) each program asks L2 for before it waits for the kernel before it (dependent launches only;
# 0: none; else a power of two of at least one 128-byte line). On an H200, 256 took 0.02-0.06 ms off a decode step
# (Llama-8B and Qwen-7B shapes, 4.5k and 15k held tokens) and 512 was slower than 256.
PREFETCH_COLUMNS = 256


@triton.jit
def _prefetch_weights(w_ptr, stride_w, n, n_mask, k_begin, k_end, PREFETCH: tl.constexpr):
    """L2 prefetch of the first ``PREFETCH`` columns of rows ``n`` from ``k_begin``: one address per 128-byte line."""
    LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth
    k = k_begin + tl.arange(0, PREFETCH // LINE) * LINE
    rows = tl.where(n_mask, n, 0)
    columns = tl.minimum(k, tl.maximum(k_end - 1, 0))
    prefetch_to_l2(w_ptr + rows[:, None] * stride_w + columns[None, :])


@triton.jit
def _accumulate(acc, w_ptr, stride_w, n, n_mask, x_ptr, stride_x, m, m_mask, k, k_mask, DOT_FLOAT32: tl.constexpr):
    """acc [BLOCK_N, M_PAD] += W[n, k] @ x[m, k]^T."""
    w = tl.load(w_ptr + n[:, None] * stride_w + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
    x = tl.load(x_ptr + m[None, :] * stride_x + k[:, None], mask=m_mask[None, :] & k_mask[:, None], other=0.0)
    if DOT_FLOAT32:
        return acc + tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision="ieee")
    return acc + tl.dot(w, x)


@triton.jit
def _concat_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, partial_ptr, counters_ptr,
    M, K, N0, N1, N2, N_TOTAL, w_offset1, w_offset2, b_offset1, b_offset2,
    stride_x, stride_w, stride_out, stride_partial_split, stride_partial_row,
    M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FLOAT32: tl.constexpr, K_GRANULE: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GRID_DEPENDENT: tl.constexpr,
    PREFETCH_K: tl.constexpr,
):
    """Weights 1 and 2 (and their biases) are addressed from weight 0's pointer by element offsets, so that the
    weight a block reads is chosen with integer selects that keep the alignment the loads are vectorised on."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    blocks0 = tl.cdiv(N0, BLOCK_N)
    blocks1 = tl.cdiv(N1, BLOCK_N)
    # Which weight this block of output columns comes from (a block never straddles two weights).
    in1 = block >= blocks0
    in2 = block >= blocks0 + blocks1
    w_ptr += tl.where(in2, w_offset2, tl.where(in1, w_offset1, 0))
    b_ptr += tl.where(in2, b_offset2, tl.where(in1, b_offset1, 0))
    size = tl.where(in2, N2, tl.where(in1, N1, N0))
    column_start = tl.where(in2, N0 + N1, tl.where(in1, N0, 0))
    local = block - tl.where(in2, blocks0 + blocks1, tl.where(in1, blocks0, 0))
    n = local * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < size
    m = tl.arange(0, M_PAD)
    m_mask = m < M
    k_begin, k_end = _k_range(split, K, SPLIT_K, K_GRANULE)
    if GRID_DEPENDENT and PREFETCH_K > 0:  # the weights are read-only for the whole step: safe before the wait
        _prefetch_weights(w_ptr, stride_w, n, n_mask, k_begin, k_end, PREFETCH_K)
    wait_for_prior_kernel(GRID_DEPENDENT)
    acc = tl.zeros([BLOCK_N, M_PAD], tl.float32)
    for k_start in range(k_begin, k_end, BLOCK_K):
        k = k_start + tl.arange(0, BLOCK_K)
        acc = _accumulate(acc, w_ptr, stride_w, n, n_mask, x_ptr, stride_x, m, m_mask, k, k < k_end, DOT_FLOAT32)
    column = column_start + n
    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + m[None, :] * stride_out + column[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        partial_offsets = m[None, :] * stride_partial_row + column[:, None]
        tl.store(partial_ptr + split * stride_partial_split + partial_offsets, acc, mask=mask)
        if last_to_arrive(counters_ptr, block, SPLIT_K):
            # The splits summed in split order from zero, then the bias: one rounding, as with one split.
            acc = tl.zeros([BLOCK_N, M_PAD], tl.float32)
            for other in tl.static_range(SPLIT_K):
                acc += tl.load(partial_ptr + other * stride_partial_split + partial_offsets, mask=mask, other=0.0,
                               cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + m[None, :] * stride_out + column[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_gated_kernel(
    x_ptr, gate_ptr, up_ptr, gate_bias_ptr, up_bias_ptr, out_ptr,
    M, K, N, stride_x, stride_gate, stride_up, stride_out,
    M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FLOAT32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GRID_DEPENDENT: tl.constexpr, PREFETCH_K: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    if GRID_DEPENDENT and PREFETCH_K > 0:  # the weights are read-only for the whole step: safe before the wait
        _prefetch_weights(gate_ptr, stride_gate, n, n_mask, 0, K, PREFETCH_K)
        _prefetch_weights(up_ptr, stride_up, n, n_mask, 0, K, PREFETCH_K)
    wait_for_prior_kernel(GRID_DEPENDENT)
    m = tl.arange(0, M_PAD)
    m_mask = m < M
    gate = tl.zeros([BLOCK_N, M_PAD], tl.float32)
    up = tl.zeros([BLOCK_N, M_PAD], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k = k_start + tl.arange(0, BLOCK_K)
        k_mask = k < K
        gate = _accumulate(gate, gate_ptr, stride_gate, n, n_mask, x_ptr, stride_x, m, m_mask, k, k_mask, DOT_FLOAT32)
        up = _accumulate(up, up_ptr, stride_up, n, n_mask, x_ptr, stride_x, m, m_mask, k, k_mask, DOT_FLOAT32)
    if HAS_BIAS:
        gate += tl.load(gate_bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        up += tl.load(up_bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    dtype = out_ptr.dtype.element_ty
    # Rounded as transformers rounds: each projection, then SiLU, then the product.
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + m[None, :] * stride_out + n[:, None], (activated * up).to(dtype),
             mask=n_mask[:, None] & m_mask[None, :])


# The split count tuned with the tile (the default), or given (``split_k``: tests, benchmarks).
_concat_linear_tuned = _tuned(["M_PAD", "K", "N_TOTAL", "HAS_BIAS"], 1, SPLIT_COUNTS)(_concat_linear_kernel)
_concat_linear_given_split = _tuned(["M_PAD", "K", "N_TOTAL", "SPLIT_K", "HAS_BIAS"], 1)(_concat_linear_kernel)
_silu_gated_tuned = _tuned(["M_PAD", "K", "N", "HAS_BIAS"], 2)(_silu_gated_kernel)


def rows_padded(rows: int) -> int:
    """Activation rows as the tensor-core product sees them (at least 16, a power of two)."""
    return max(16, triton.next_power_of_2(rows))


def _element_offsets(tensors: list[torch.Tensor]) -> list[int]:
    """Element offsets of tensors 1 and 2 from tensor 0 (0 for absent ones): one pointer reaches all three."""
    size = tensors[0].element_size()
    offsets = [(tensor.data_ptr() - tensors[0].data_ptr()) // size for tensor in tensors[1:]]
    return offsets + [0] * (2 - len(offsets))


def concat_linear(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Triton path of ``reference.concat_linear_reference`` (checked arguments: x [M, K] with M <= 64, one to three
    weights [N_i, K], biases all given or none). ``split_k``: splits of K, one of ``SPLIT_COUNTS`` (tuned with the
    launch shape when None)."""
    rows, depth = x.shape
    sizes = [weight.shape[0] for weight in weights]
    total = sum(sizes)
    padded_sizes = sizes + [0] * (3 - len(sizes))
    has_bias = biases is not None
    w_offsets = _element_offsets(weights)
    b_offsets = _element_offsets(biases) if has_bias else [0, 0]
    out = torch.empty(rows, total, dtype=x.dtype, device=x.device)
    if rows == 0 or total == 0:
        return out
    if split_k is not None and split_k not in SPLIT_COUNTS:
        raise ValueError(f"split_k must be one of {SPLIT_COUNTS} or None, got {split_k}")
    # Room for the most splits the tuning may pick (fp32 partial sums; not touched with one split).
    partial = torch.empty(split_k or max(SPLIT_COUNTS), rows, total, dtype=torch.float32, device=x.device)
    # One counter per column block (the smallest tuned BLOCK_N gives the most blocks).
    counters = arrival_counters(x.device, sum(triton.cdiv(size, _SMALLEST_BLOCK_N) for size in sizes))

    def grid(meta):
        return (sum(triton.cdiv(size, meta["BLOCK_N"]) for size in sizes), meta["SPLIT_K"])

    kernel = _concat_linear_tuned if split_k is None else _concat_linear_given_split
    kernel[grid](
        x, weights[0], biases[0] if has_bias else weights[0], out, partial, counters,
        rows, depth, *padded_sizes, total, *w_offsets, *b_offsets,
        x.stride(0), weights[0].stride(0), out.stride(0), partial.stride(0), partial.stride(1),
        M_PAD=rows_padded(rows), HAS_BIAS=has_bias, DOT_FLOAT32=dots_in_float32(x.dtype), K_GRANULE=SPLIT_K_GRANULE,
        **({} if split_k is None else {"SPLIT_K": split_k}), **dependent_launch_options(x.device),
        PREFETCH_K=PREFETCH_COLUMNS,
    )
    return out


def silu_gated_linear(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
    gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton path of ``reference.silu_gated_linear_reference`` (checked arguments: x [M, K] with M <= 64, gate and
    up weights [N, K], biases both given or neither)."""
    rows, depth = x.shape
    size = gate_weight.shape[0]
    out = torch.empty(rows, size, dtype=x.dtype, device=x.device)
    if rows == 0 or size == 0:
        return out
    has_bias = gate_bias is not None

    def grid(meta):
        return (triton.cdiv(size, meta["BLOCK_N"]),)

    _silu_gated_tuned[grid](
        x, gate_weight, up_weight, gate_bias if has_bias else gate_weight, up_bias if has_bias else up_weight, out,
        rows, depth, size, x.stride(0), gate_weight.stride(0), up_weight.stride(0), out.stride(0),
        M_PAD=rows_padded(rows), HAS_BIAS=has_bias, DOT_FLOAT32=dots_in_float32(x.dtype),
        **dependent_launch_options(x.device), PREFETCH_K=PREFETCH_COLUMNS,
    )
    return out

"""Triton kernel: one decoding step's attention over ragged rows of the dense cache (flash-decoding).

Each row reads only its first ``lengths[row]`` slots (its physical length; in the ring layout of a static session
they start at the row's ``start`` and wrap around the capacity), so a compacted cache is cheaper to attend to, and
the grid depends only on the capacity, so the launch can be captured in a CUDA graph while the lengths change on the
device. GQA is native: one program serves all query heads of a KV head (no repeated K/V).

Split-K: program (split, kv_head, row) runs an online softmax over its share of the row's slots and writes a
partial output and log-sum-exp; a second kernel merges the splits. The number of splits is fixed per launch (as
many programs as one wave of the GPU runs: ``decode_splits``) and each row's length is divided among them on the
device, so every program has work in proportion to the row's length; a grid sized by the capacity instead would
launch thousands of empty programs for a long full-cache buffer holding few tokens.
Reference: ``reference.decode_attention_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dependent_launch import dependent_launch_options, wait_for_prior_kernel
from .dispatch import dots_in_float32, multiprocessors

BLOCK_SLOTS = 64
# Programs per streaming multiprocessor a launch aims for, and the depth of each program's K/V pipeline. Measured on
# an H200 at batch 20 (Llama-8B and Qwen-7B heads; 192 launch shapes of splits, block, warps and stages): 4 programs
# per multiprocessor with 2 stages came within ~2% of the best shape from 2k to 4.5k held slots (the lengths a
# compressed cache holds) and ran 4-5% faster there than 8 with 3 stages; at 15k within 1.5% either way. The split
# count must keep the launch within that one wave: a launch just past it runs a second, mostly empty wave (Llama-8B
# at 4k held slots, 32 layers: 640 programs 1.12x the bandwidth roofline, 480 programs 1.08x; Qwen-7B 560 vs 480:
# 1.37x vs 1.21x; issue 17).
PROGRAMS_PER_SM = 4
PIPELINE_STAGES = 2
# Multiprocessors assumed off CUDA (the Triton interpreter in tests): a few splits, so the merge is exercised.
INTERPRETER_SMS = 4


def decode_splits(rows: int, kv_heads: int, slots: int, device: torch.device) -> int:
    """Splits per (row, KV head): as many as fit in one wave of ``PROGRAMS_PER_SM`` programs per multiprocessor of
    ``device`` (at least one), at most one per block of slots."""
    wanted = PROGRAMS_PER_SM * multiprocessors(device, INTERPRETER_SMS) // max(rows * kv_heads, 1)
    return max(1, min(wanted, triton.cdiv(slots, BLOCK_SLOTS)))


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, lengths_ptr, start_ptr, out_ptr, lse_ptr,
    scale, capacity,
    stride_q_batch, stride_q_head,
    stride_k_batch, stride_k_head, stride_k_slot,
    stride_v_batch, stride_v_head, stride_v_slot,
    stride_out_batch, stride_out_head, stride_out_split,
    stride_lse_batch, stride_lse_head, stride_lse_split,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, BLOCK_DIM: tl.constexpr,
    VALUE_DIM: tl.constexpr, BLOCK_VALUE_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FLOAT32: tl.constexpr, RING: tl.constexpr, GRID_DEPENDENT: tl.constexpr,
):
    wait_for_prior_kernel(GRID_DEPENDENT)
    split = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    row = tl.program_id(2).to(tl.int64)
    length = tl.load(lengths_ptr + row)
    first = 0
    if RING:
        first = tl.load(start_ptr + row)
    # This row's share per split, whole blocks: the splits divide the row's length, not the capacity.
    split_slots = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_slots
    group = tl.arange(0, GROUP_PAD)
    group_mask = group < GROUP
    feature = tl.arange(0, BLOCK_DIM)
    value_feature = tl.arange(0, BLOCK_VALUE_DIM)
    q_heads = kv_head * GROUP + group
    q = tl.load(
        q_ptr + row * stride_q_batch + q_heads[:, None] * stride_q_head + feature[None, :],
        mask=group_mask[:, None] & (feature[None, :] < DIM), other=0.0,
    )
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_VALUE_DIM], tl.float32)
    k_base = k_ptr + row * stride_k_batch + kv_head * stride_k_head
    v_base = v_ptr + row * stride_v_batch + kv_head * stride_v_head
    end = tl.minimum(start + split_slots, length)
    for block_start in range(start, end, BLOCK_N):
        slot = block_start + tl.arange(0, BLOCK_N)
        slot_mask = slot < end
        if RING:  # slot s at physical index (first + s) % capacity, wrapped at most once
            physical = first + slot
            slot = tl.where(physical >= capacity, physical - capacity, physical)
        k = tl.load(k_base + slot[:, None] * stride_k_slot + feature[None, :],
                    mask=slot_mask[:, None] & (feature[None, :] < DIM), other=0.0)
        if DOT_FLOAT32:
            logits = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        else:
            logits = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [GROUP_PAD, BLOCK_N]
        logits = tl.where(slot_mask[None, :], logits, float("-inf"))
        new_m = tl.maximum(m, tl.max(logits, axis=1))
        correction = tl.exp(m - new_m)
        p = tl.exp(logits - new_m[:, None])
        l = l * correction + tl.sum(p, axis=1)
        v = tl.load(v_base + slot[:, None] * stride_v_slot + value_feature[None, :],
                    mask=slot_mask[:, None] & (value_feature[None, :] < VALUE_DIM), other=0.0)
        if DOT_FLOAT32:
            acc = acc * correction[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = new_m
    has_slots = end > start
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    lse = tl.where(has_slots, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
    out_offsets = (row * stride_out_batch + q_heads[:, None] * stride_out_head + split * stride_out_split
                   + value_feature[None, :])
    tl.store(out_ptr + out_offsets, out, mask=group_mask[:, None] & (value_feature[None, :] < VALUE_DIM))
    tl.store(lse_ptr + row * stride_lse_batch + q_heads * stride_lse_head + split * stride_lse_split, lse, mask=group_mask)


@triton.jit
def _decode_merge_kernel(
    partial_ptr, lse_ptr, out_ptr, num_splits,
    stride_p_batch, stride_p_head, stride_p_split,
    stride_lse_batch, stride_lse_head, stride_lse_split,
    stride_out_batch, stride_out_head,
    VALUE_DIM: tl.constexpr, BLOCK_VALUE_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr, GRID_DEPENDENT: tl.constexpr,
):
    wait_for_prior_kernel(GRID_DEPENDENT)
    head = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    splits = tl.arange(0, BLOCK_SPLITS)
    split_mask = splits < num_splits
    lse = tl.load(lse_ptr + row * stride_lse_batch + head * stride_lse_head + splits * stride_lse_split,
                  mask=split_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weight = tl.where(split_mask & (lse > float("-inf")), tl.exp(lse - top), 0.0)
    feature = tl.arange(0, BLOCK_VALUE_DIM)
    partial = tl.load(
        partial_ptr + row * stride_p_batch + head * stride_p_head + splits[:, None] * stride_p_split + feature[None, :],
        mask=split_mask[:, None] & (feature[None, :] < VALUE_DIM), other=0.0,
    )
    out = tl.sum(partial * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(out_ptr + row * stride_out_batch + head * stride_out_head + feature, out.to(out_ptr.dtype.element_ty),
             mask=feature < VALUE_DIM)


def decode_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, *, scale: float,
    num_splits: int | None = None, start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton path of ``decode_attention_reference`` (same arguments and result). ``num_splits``: splits per (row,
    KV head), ``decode_splits`` when None."""
    batch, q_heads, dim = queries.shape
    _, kv_heads, slots, key_dim = keys.shape
    value_dim = values.shape[-1]
    if key_dim != dim or q_heads % kv_heads:
        raise ValueError(f"queries {tuple(queries.shape)} do not match keys {tuple(keys.shape)}")
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or queries.stride(-1) != 1:
        raise ValueError("decode_attention needs unit stride along the head dim")
    group = q_heads // kv_heads
    if num_splits is None:
        num_splits = decode_splits(batch, kv_heads, slots, queries.device)
    elif num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    partial = torch.empty(batch, q_heads, num_splits, value_dim, dtype=torch.float32, device=queries.device)
    lse = torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=queries.device)
    _decode_partial_kernel[(num_splits, kv_heads, batch)](
        queries, keys, values, lengths, lengths if start is None else start, partial, lse, scale, slots,
        queries.stride(0), queries.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim,
        BLOCK_DIM=triton.next_power_of_2(dim), VALUE_DIM=value_dim, BLOCK_VALUE_DIM=triton.next_power_of_2(value_dim),
        NUM_SPLITS=num_splits, BLOCK_N=BLOCK_SLOTS,
        DOT_FLOAT32=dots_in_float32(queries.dtype), RING=start is not None, num_stages=PIPELINE_STAGES,
        **dependent_launch_options(queries.device),
    )
    out = torch.empty(batch, q_heads, value_dim, dtype=queries.dtype, device=queries.device)
    _decode_merge_kernel[(q_heads, batch)](
        partial, lse, out, num_splits,
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        out.stride(0), out.stride(1),
        VALUE_DIM=value_dim, BLOCK_VALUE_DIM=triton.next_power_of_2(value_dim),
        BLOCK_SPLITS=max(2, triton.next_power_of_2(num_splits)), **dependent_launch_options(queries.device),
    )
    return out

"""Triton kernels: softmax attention of the newest queries over cached keys, reduced per key slot.

Exact softmax in two passes over the keys, never materialising [heads x window x slots]:
1. statistics: per (row, kv head, key chunk) program, the running max and sum of exp of every query row of the
   GQA group (rows = group heads x window, one tile of up to 128 rows at a time);
2. scores: the same programs merge the chunk statistics into the exact max and sum, recompute the logits, turn
   them into probabilities and reduce them over the window and the group to one float per key slot.
Splitting the keys into chunks gives enough programs to fill the GPU at any batch size.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .dispatch import dots_in_float32, multiprocessors
from .reference import REDUCTIONS

MAX_WINDOW = 64
BLOCK_KEYS = 64
MAX_BLOCK_ROWS = 128
# Programs to aim for when splitting the keys into chunks (a few per multiprocessor).
PROGRAMS_PER_SM = 4
_REDUCE_CODE = {"sum": 0, "mean": 1, "max": 2}
# Multiprocessors assumed under the interpreter: any fixed figure; chunking does not change the result.
INTERPRETER_MULTIPROCESSORS = 132


@triton.jit
def _program_rows(key_len_ptr, key_start_ptr, kv_heads, slots, splits, TILES: tl.constexpr):
    """What a program of either kernel works on, from its id: query tile, key split, (batch, KV head), and that
    row's cached keys: key_len, key_limit = min(key_len, slots), first_key (left padding ends there)."""
    program = tl.program_id(0)
    tile = program % TILES
    split = (program // TILES) % splits
    batch_head = program // (TILES * splits)
    batch = (batch_head // kv_heads).to(tl.int64)
    kv_head = (batch_head % kv_heads).to(tl.int64)
    key_len = tl.load(key_len_ptr + batch)
    key_limit = tl.minimum(key_len, slots)
    first_key = tl.load(key_start_ptr + batch)
    return tile, split, batch_head, batch, kv_head, key_len, key_limit, first_key


@triton.jit
def _load_query_tile(
    q_ptr, batch, kv_head, tile, group, window, dim,
    stride_qb, stride_qh, stride_qw, stride_qd,
    WINDOW_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr,
):
    """Query rows of one tile (row = group head * WINDOW_PAD + window index) and their group head / window index."""
    row = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    group_head = row // WINDOW_PAD
    position = row % WINDOW_PAD
    row_exists = (group_head < group) & (position < window)
    feature = tl.arange(0, BLOCK_DIM)
    q_head = (kv_head * group + group_head).to(tl.int64)
    pointers = (q_ptr + batch * stride_qb + q_head[:, None] * stride_qh + position[:, None] * stride_qw
                + feature[None, :] * stride_qd)
    queries = tl.load(pointers, mask=row_exists[:, None] & (feature[None, :] < dim), other=0.0)
    return queries, position, row_exists


@triton.jit
def _logits(
    queries, k_ptr, batch, kv_head, block_start, first_key, key_limit, key_len, window, position, dim, scale_log2,
    stride_kb, stride_kh, stride_ks, stride_kd,
    BLOCK_KEYS: tl.constexpr, BLOCK_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_FLOAT32: tl.constexpr,
):
    """Logits (log2 units) of a tile of queries against keys [block_start, block_start + BLOCK_KEYS); -inf where a
    query does not see the key. Keys in [first_key, key_limit) are visible, key_limit = min(key_len, slots)."""
    key = block_start + tl.arange(0, BLOCK_KEYS)
    feature = tl.arange(0, BLOCK_DIM)
    in_cache = (key < key_limit) & (key >= first_key)
    pointers = k_ptr + batch * stride_kb + kv_head * stride_kh + key[:, None] * stride_ks + feature[None, :] * stride_kd
    keys = tl.load(pointers, mask=in_cache[:, None] & (feature[None, :] < dim), other=0.0)
    if DOT_FLOAT32:
        logits = tl.dot(queries.to(tl.float32), tl.trans(keys.to(tl.float32)), input_precision="tf32x3")
    else:
        logits = tl.dot(queries, tl.trans(keys))
    logits = logits * scale_log2
    visible = in_cache[None, :]
    if CAUSAL:
        # the query at window index w is the token of slot key_len - window + w
        visible = visible & (key[None, :] <= (key_len - window + position)[:, None])
    return tl.where(visible, logits, float("-inf"))


@triton.jit
def _score_statistics_kernel(
    q_ptr, k_ptr, key_len_ptr, key_start_ptr, row_max_ptr, row_sum_ptr,
    kv_heads, group, window, dim, slots, key_chunk, splits, scale_log2,
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    TILES: tl.constexpr, WINDOW_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_KEYS: tl.constexpr,
    BLOCK_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_FLOAT32: tl.constexpr,
):
    tile, split, batch_head, batch, kv_head, key_len, key_limit, first_key = _program_rows(
        key_len_ptr, key_start_ptr, kv_heads, slots, splits, TILES)
    queries, position, _ = _load_query_tile(
        q_ptr, batch, kv_head, tile, group, window, dim, stride_qb, stride_qh, stride_qw, stride_qd,
        WINDOW_PAD, BLOCK_ROWS, BLOCK_DIM,
    )
    row_max = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_ROWS,), tl.float32)
    chunk_start = split * key_chunk
    chunk_end = tl.minimum(chunk_start + key_chunk, key_limit)
    # skip whole blocks of left padding
    first_block = tl.maximum(chunk_start, (first_key // BLOCK_KEYS) * BLOCK_KEYS)
    for block_start in range(first_block, chunk_end, BLOCK_KEYS):
        logits = _logits(
            queries, k_ptr, batch, kv_head, block_start, first_key, key_limit, key_len, window, position, dim, scale_log2,
            stride_kb, stride_kh, stride_ks, stride_kd, BLOCK_KEYS, BLOCK_DIM, CAUSAL, DOT_FLOAT32,
        )
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row that sees nothing yet: avoid -inf - -inf
        row_sum = row_sum * tl.exp2(row_max - shift) + tl.sum(tl.exp2(logits - shift[:, None]), axis=1)
        row_max = new_max
    out = ((batch_head * TILES + tile) * splits + split) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    tl.store(row_max_ptr + out, row_max)
    tl.store(row_sum_ptr + out, row_sum)


@triton.jit
def _score_reduce_kernel(
    q_ptr, k_ptr, key_len_ptr, key_start_ptr, query_count_ptr, row_max_ptr, row_sum_ptr, scores_ptr,
    kv_heads, group, window, dim, slots, key_chunk, splits, scale_log2,
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    TILES: tl.constexpr, WINDOW_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_KEYS: tl.constexpr,
    BLOCK_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_FLOAT32: tl.constexpr,
    REDUCE_QUERIES: tl.constexpr, REDUCE_GROUP: tl.constexpr,
):
    tile, split, batch_head, batch, kv_head, key_len, key_limit, first_key = _program_rows(
        key_len_ptr, key_start_ptr, kv_heads, slots, splits, TILES)
    query_count = tl.load(query_count_ptr + batch)
    queries, position, row_exists = _load_query_tile(
        q_ptr, batch, kv_head, tile, group, window, dim, stride_qb, stride_qh, stride_qw, stride_qd,
        WINDOW_PAD, BLOCK_ROWS, BLOCK_DIM,
    )
    # Merge the per-chunk statistics of this tile's rows into the exact softmax max and sum.
    row_max = tl.full((BLOCK_ROWS,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_ROWS,), tl.float32)
    statistics = (batch_head * TILES + tile) * splits * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    for other_split in range(0, splits):
        part_max = tl.load(row_max_ptr + statistics + other_split * BLOCK_ROWS)
        part_sum = tl.load(row_sum_ptr + statistics + other_split * BLOCK_ROWS)
        new_max = tl.maximum(row_max, part_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp2(row_max - shift) + part_sum * tl.exp2(part_max - shift)
        row_max = new_max
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    # One factor per row: 1 / softmax sum, 0 for rows that are padding, not real queries, or see no key; the
    # means (positive constants) are folded in too, since they commute with both sum and max.
    used = row_exists & (position >= window - query_count) & (row_sum > 0)
    weight = tl.where(used, 1.0 / tl.where(used, row_sum, 1.0), 0.0)
    if REDUCE_QUERIES == 1:
        weight = weight / tl.maximum(query_count, 1).to(tl.float32)
    if REDUCE_GROUP == 1:
        weight = weight / group

    chunk_start = split * key_chunk
    chunk_end = tl.minimum(chunk_start + key_chunk, slots)
    out_base = scores_ptr + (batch_head * TILES + tile).to(tl.int64) * slots
    # Blocks [first_block, compute_end) hold visible keys; the rest of the chunk (left padding, slots past
    # key_len) scores 0. Separate loops keep the compute loop free of branches, so Triton can pipeline its loads.
    first_block = tl.maximum(chunk_start, (first_key // BLOCK_KEYS) * BLOCK_KEYS)
    compute_end = tl.minimum(chunk_end, key_limit)
    compute_blocks = tl.cdiv(tl.maximum(compute_end - first_block, 0), BLOCK_KEYS)
    compute_end = first_block + compute_blocks * BLOCK_KEYS
    zeros = tl.zeros((BLOCK_KEYS,), tl.float32)
    for block_start in range(chunk_start, tl.minimum(first_block, chunk_end), BLOCK_KEYS):
        key = block_start + tl.arange(0, BLOCK_KEYS)
        tl.store(out_base + key, zeros, mask=key < chunk_end)
    for block_start in range(first_block, compute_end, BLOCK_KEYS):
        key = block_start + tl.arange(0, BLOCK_KEYS)
        logits = _logits(
            queries, k_ptr, batch, kv_head, block_start, first_key, key_limit, key_len, window, position, dim, scale_log2,
            stride_kb, stride_kh, stride_ks, stride_kd, BLOCK_KEYS, BLOCK_DIM, CAUSAL, DOT_FLOAT32,
        )
        probabilities = tl.exp2(logits - shift[:, None]) * weight[:, None]  # invisible keys: exp2(-inf) = 0
        if REDUCE_QUERIES == 2 and REDUCE_GROUP == 2:
            score = tl.max(probabilities, axis=0)
        elif REDUCE_QUERIES != 2 and REDUCE_GROUP != 2:
            score = tl.sum(probabilities, axis=0)
        else:
            per_head = tl.reshape(probabilities, (BLOCK_ROWS // WINDOW_PAD, WINDOW_PAD, BLOCK_KEYS))
            if REDUCE_QUERIES == 2:
                score = tl.sum(tl.max(per_head, axis=1), axis=0)
            else:
                score = tl.max(tl.sum(per_head, axis=1), axis=0)
        tl.store(out_base + key, score, mask=key < chunk_end)
    for block_start in range(compute_end, chunk_end, BLOCK_KEYS):
        key = block_start + tl.arange(0, BLOCK_KEYS)
        tl.store(out_base + key, zeros, mask=key < chunk_end)


def attention_scores_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_len: torch.Tensor,
    *,
    scale: float,
    query_count: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
    reduce_queries: str = "sum",
    reduce_group: str = "sum",
    causal: bool = True,
    key_chunk: int | None = None,
    block_keys: int = BLOCK_KEYS,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Triton version of ``reference.attention_scores_reference`` for windows of 1..64 queries.

    Tuning knobs (the defaults are what the dispatcher uses): key_chunk, keys per program (a multiple of
    block_keys; None picks it so that the grid fills the GPU); block_keys, keys per inner step (16..256, a power
    of two); num_warps (None: 8 for 128-row tiles, else 4).
    """
    if queries.dim() != 4 or keys.dim() != 4:
        raise ValueError(
            f"queries must be [batch, q_heads, window, dim] and keys [batch, kv_heads, slots, dim]; got "
            f"{tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    batch, q_heads, window, dim = queries.shape
    _, kv_heads, slots, _ = keys.shape
    if keys.shape[0] != batch or keys.shape[3] != dim:
        raise ValueError(f"keys must be [batch={batch}, kv_heads, slots, dim={dim}], got {tuple(keys.shape)}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a positive multiple of kv_heads ({kv_heads})")
    if not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"window (queries.shape[2]) must be in [1, {MAX_WINDOW}], got {window}")
    if queries.dtype != keys.dtype or queries.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"queries and keys must share one dtype of float16/bfloat16/float32, got {queries.dtype}, {keys.dtype}")
    for name, value in (("reduce_queries", reduce_queries), ("reduce_group", reduce_group)):
        if value not in REDUCTIONS:
            raise ValueError(f"{name} must be one of {REDUCTIONS}, got {value!r}")
    device = queries.device
    key_len = key_len.to(device=device, dtype=torch.long).contiguous()
    if query_count is None:
        query_count = torch.full((batch,), window, dtype=torch.long, device=device)
    query_count = query_count.to(device=device, dtype=torch.long).contiguous()
    if key_start is None:
        key_start = torch.zeros(batch, dtype=torch.long, device=device)
    key_start = key_start.to(device=device, dtype=torch.long).contiguous()
    for name, tensor in (("key_len", key_len), ("query_count", query_count), ("key_start", key_start)):
        if tensor.shape != (batch,):
            raise ValueError(f"{name} must be [batch={batch}], got shape {tuple(tensor.shape)}")

    group = q_heads // kv_heads
    window_pad = triton.next_power_of_2(window)
    # float32 runs its dots as 3 TF32 products (near-float32 accuracy): smaller tiles keep it in shared memory
    float32 = queries.dtype == torch.float32
    max_rows = MAX_BLOCK_ROWS // 2 if float32 else MAX_BLOCK_ROWS
    block_rows = max(16, min(max_rows, triton.next_power_of_2(group * window_pad)))
    tiles = triton.cdiv(group * window_pad, block_rows)
    block_dim = max(16, triton.next_power_of_2(dim))
    if block_keys not in (16, 32, 64, 128, 256):
        raise ValueError(f"block_keys must be a power of two in [16, 256], got {block_keys}")
    if key_chunk is None:
        wanted_splits = triton.cdiv(PROGRAMS_PER_SM * multiprocessors(device, INTERPRETER_MULTIPROCESSORS), batch * kv_heads * tiles)
        key_chunk = block_keys * triton.cdiv(triton.cdiv(max(slots, 1), wanted_splits), block_keys)
    elif key_chunk < block_keys or key_chunk % block_keys:
        raise ValueError(f"key_chunk must be a positive multiple of block_keys={block_keys}, got {key_chunk}")
    splits = triton.cdiv(max(slots, 1), key_chunk)
    programs = batch * kv_heads * tiles * splits
    meta = dict(
        TILES=tiles, WINDOW_PAD=window_pad, BLOCK_ROWS=block_rows, BLOCK_KEYS=block_keys, BLOCK_DIM=block_dim,
        CAUSAL=causal, DOT_FLOAT32=dots_in_float32(queries.dtype),
        num_warps=num_warps or (8 if block_rows >= 128 else 4), num_stages=2 if float32 else 3,
    )
    scale_log2 = scale * math.log2(math.e)
    strides = (*queries.stride(), *keys.stride())
    row_max = torch.empty(programs * block_rows, dtype=torch.float32, device=device)
    row_sum = torch.empty_like(row_max)
    scores = torch.empty(batch, kv_heads, tiles, slots, dtype=torch.float32, device=device)
    if programs == 0:
        return scores.sum(2)
    _score_statistics_kernel[(programs,)](
        queries, keys, key_len, key_start, row_max, row_sum,
        kv_heads, group, window, dim, slots, key_chunk, splits, scale_log2, *strides, **meta,
    )
    _score_reduce_kernel[(programs,)](
        queries, keys, key_len, key_start, query_count, row_max, row_sum, scores,
        kv_heads, group, window, dim, slots, key_chunk, splits, scale_log2, *strides,
        REDUCE_QUERIES=_REDUCE_CODE[reduce_queries], REDUCE_GROUP=_REDUCE_CODE[reduce_group], **meta,
    )
    if tiles == 1:
        return scores.squeeze(2)
    return scores.amax(2) if reduce_group == "max" else scores.sum(2)

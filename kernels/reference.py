"""Torch references for the dynts kernels.

Each function here is the specification of one op: the Triton kernels next to it must give the same result
(tests compare them on awkward shapes). They are also the path taken for CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Reduction = str  # "sum" | "mean" | "max"
REDUCTIONS = ("sum", "mean", "max")


def compact_reference_(cache: torch.Tensor, rows: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor) -> None:
    """Move the kept slots of the selected rows to the front of their storage, in place.

    cache:      [layers, batch, heads, slots, dim] (any dtype). Slot tensors without a feature dim are passed
                with dim 1 (``x.unsqueeze(-1)``).
    rows:       [R] int64, the batch rows to compact (others are untouched).
    keep_index: [layers_g, R, heads_g, K] int64, layers_g in {1, layers}, heads_g in {1, heads} (broadcast).
                For j < keep_count[r] the entries are strictly increasing slot indices.
    keep_count: [R] int64; slots >= keep_count[r] of a compacted row hold unspecified data afterwards.

    After the call, ``cache[l, rows[r], h, j] == old_cache[l, rows[r], h, keep_index[l', r, h', j]]`` for
    ``j < keep_count[r]`` (l' = l or 0, h' = h or 0).
    """
    layers, _, heads, _, dim = cache.shape
    if keep_index.shape[-1] == 0 or rows.numel() == 0:
        return
    # Padding past the longest kept list moves nothing: leave it out (a plan's K is the longest held length).
    index = keep_index[..., : int(keep_count.max())].expand(layers, -1, heads, -1)  # [L, R, H, K]
    # Entries past keep_count may be anything: clamp them onto a valid slot so the gather stays in bounds; their
    # destination slots are beyond the new physical length and never read.
    width = torch.arange(index.shape[-1], device=index.device)
    valid = width < keep_count.view(1, -1, 1, 1)
    index = torch.where(valid, index, torch.zeros_like(index))
    selected = cache[:, rows]  # [L, R, H, S, D] (a copy of the selected rows only)
    gathered = torch.gather(selected, 3, index.unsqueeze(-1).expand(-1, -1, -1, -1, dim))
    kept = torch.where(valid.unsqueeze(-1), gathered, selected[:, :, :, : index.shape[-1]])
    cache[:, rows, :, : index.shape[-1]] = kept


def compact_ring_reference_(
    cache: torch.Tensor, rows: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor, held: torch.Tensor,
    start: torch.Tensor,
) -> None:
    """Compact the selected rows of a ring-laid-out cache in place, keeping the end of each row where it is.

    Ring layout: slot s (in logical order) of row b lives at physical index ``(start[b] + s) % slots``.
    cache, rows, keep_index, keep_count: as in ``compact_reference_``, keep_index < held[r].
    held:  [R] int64, each compacted row's length before the compaction.
    start: [R] int64 in [0, slots), each compacted row's ring start.

    The kept slots move to the end of the held range: after the call, the physical index of slot
    ``held[r] - keep_count[r] + j`` holds what slot ``keep_index[.., r, .., j]`` held, for ``j < keep_count[r]``; so a
    kept tail (the local window) does not move. The caller then advances the row's start by ``held - keep_count``
    (the row's slots are numbered from the first kept one again). Every other physical index is unchanged.
    """
    layers, _, heads, slots, dim = cache.shape
    if keep_index.shape[-1] == 0 or rows.numel() == 0:
        return
    index = keep_index.expand(layers, -1, heads, -1)
    for request, (row, count, length, first) in enumerate(
        zip(rows.tolist(), keep_count.tolist(), held.tolist(), start.tolist())
    ):
        source = (first + index[:, request, :, :count]) % slots  # [L, H, count]
        destination = (first + length - count + torch.arange(count, device=cache.device)) % slots
        values = torch.gather(cache[:, row], 2, source.unsqueeze(-1).expand(-1, -1, -1, dim))  # a copy: reads first
        cache[:, row, :, destination] = values



def compact_paged_reference_(
    kv_caches: Sequence[torch.Tensor], block_table: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor
) -> None:
    """Paged version of ``compact_reference_`` for vLLM's CUDA layout, in place.

    kv_caches:   one tensor per layer, [planes, num_blocks, block_size, kv_heads, head_size] (vLLM FlashAttention
                 layout; planes = 2 for K and V). Slot s of request r lives in block ``block_table[r, s //
                 block_size]`` at offset ``s % block_size``.
    block_table: [R, max_blocks] int32/int64, the block-table rows of the requests to compact.
    keep_index:  [layers_g, R, heads_g, K] int64, as in ``compact_reference_``.
    keep_count:  [R] int64.

    After the call, logical slot j < keep_count[r] of request r holds what logical slot keep_index[l', r, h', j]
    held, in every layer, plane and head; all other slots are unchanged.
    """
    if len(kv_caches) == 0 or keep_index.shape[-1] == 0 or block_table.shape[0] == 0:
        return
    block_size, heads = kv_caches[0].shape[2], kv_caches[0].shape[3]
    row_count, width = block_table.shape[0], keep_index.shape[-1]
    device = kv_caches[0].device
    table = block_table.to(device=device, dtype=torch.long)
    request = torch.arange(row_count, device=device).view(-1, 1, 1)
    head = torch.arange(heads, device=device).view(1, -1, 1)
    destination = torch.arange(width, device=device).view(1, 1, -1)
    valid = (destination < keep_count.to(device).view(-1, 1, 1)).expand(row_count, heads, width)

    def location(slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (block id, offset) of kept lanes
        slot = torch.where(valid, slot, 0)  # lanes past keep_count may hold anything
        return table[request, slot // block_size][valid], (slot % block_size)[valid]

    heads_index = head.expand(row_count, heads, width)[valid]
    destination_block, destination_offset = location(destination.expand(row_count, heads, width))
    for layer, cache in enumerate(kv_caches):
        source = keep_index[layer if keep_index.shape[0] > 1 else 0].to(device).expand(row_count, heads, width)
        source_block, source_offset = location(source)
        kept = cache[:, source_block, source_offset, heads_index]  # advanced indexing copies: reads precede writes
        cache[:, destination_block, destination_offset, heads_index] = kept


def attention_scores_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_len: torch.Tensor,
    *,
    scale: float,
    query_count: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    reduce_queries: Reduction = "sum",
    reduce_group: Reduction = "sum",
    causal: bool = True,
) -> torch.Tensor:
    """Softmax attention of the most recent queries over each row's cached keys, reduced per key slot.

    queries:     [batch, q_heads, window, dim]; the query at window index w belongs to key slot
                 ``key_len - window + w`` (the queries are the newest tokens, whose keys are cached).
    keys:        [batch, kv_heads, slots, dim] (slots >= key_len[b] are ignored).
    key_len:     [batch] int64, the physical length of each row.
    query_count: [batch] int64 or None: only the last query_count[b] queries of a row are real (a row that
                 has seen fewer tokens than the window); None means all.
    key_start:   [batch] int64 or None: keys at slots < key_start[b] are invisible (left padding during a
                 prefill); None means 0.
    query_valid: [batch, window] bool or None: which queries are real (instead of ``query_count``, for padding
                 between real tokens); the mean over queries divides by their number.
    key_valid:   [batch, >= key_len.max()] bool or None: which key slots are visible at all (padding between
                 real tokens is not).
    causal:      a query does not see keys newer than itself.
    Returns      [batch, kv_heads, slots] float32: per query the exact softmax over the visible keys, then
                 reduced over the (valid) queries and over the q heads of each GQA group. Slots past key_len
                 are 0.
    """
    batch, q_heads, window, dim = queries.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    group = q_heads // kv_heads
    for name, value in (("reduce_queries", reduce_queries), ("reduce_group", reduce_group)):
        if value not in REDUCTIONS:
            raise ValueError(f"{name} must be one of {REDUCTIONS}, got {value!r}")
    device = queries.device
    key_len = key_len.to(device)
    if query_count is None:
        query_count = torch.full((batch,), window, dtype=torch.long, device=device)
    query_count = query_count.to(device)

    slot = torch.arange(slots, device=device)
    query_slot = key_len.view(batch, 1) - window + torch.arange(window, device=device)  # [B, W]
    visible = slot.view(1, 1, slots) < key_len.view(batch, 1, 1)  # [B, 1, S]
    if key_start is not None:
        visible = visible & (slot.view(1, 1, slots) >= key_start.to(device).view(batch, 1, 1))
    if causal:
        visible = visible & (slot.view(1, 1, slots) <= query_slot.unsqueeze(-1))  # [B, W, S]
    if key_valid is not None:
        width = min(slots, key_valid.shape[1])
        visible_keys = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        visible_keys[:, :width] = key_valid[:, :width].to(device)
        visible = visible & visible_keys.view(batch, 1, slots)
    if query_valid is None:
        query_valid = torch.arange(window, device=device).view(1, window) >= (window - query_count.view(batch, 1))  # [B, W]
    else:
        query_valid = query_valid.to(device=device, dtype=torch.bool)
        query_count = query_valid.sum(dim=1)

    q = queries.float().view(batch, kv_heads, group, window, dim)
    k = keys.float().unsqueeze(2)  # [B, Hkv, 1, S, D]
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hkv, G, W, S]
    logits = logits.masked_fill(~visible.view(batch, 1, 1, -1, slots), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a query that sees no key contributes nothing
    valid = query_valid.view(batch, 1, 1, window, 1)
    if reduce_queries == "max":
        per_query = probs.masked_fill(~valid, 0.0).amax(dim=3)
    else:
        per_query = probs.masked_fill(~valid, 0.0).sum(dim=3)
        if reduce_queries == "mean":
            per_query = per_query / query_count.clamp(min=1).view(batch, 1, 1, 1).float()
    if reduce_group == "max":
        scores = per_query.amax(dim=2)
    else:
        scores = per_query.sum(dim=2)
        if reduce_group == "mean":
            scores = scores / group
    return scores.masked_fill(~(slot.view(1, 1, slots) < key_len.view(batch, 1, 1)), 0.0)


def decode_attention_reference(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, *, scale: float,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step's attention over each row's first ``lengths[b]`` cached slots (GQA, no padding mask).

    queries: [batch, q_heads, dim]; keys: [batch, kv_heads, slots, dim]; values: [batch, kv_heads, slots, value_dim]
    (strided views of the storage are fine); lengths: [batch] int64 >= 1. Returns [batch, q_heads, value_dim] in
    the queries' dtype; softmax in fp32.
    start: None (slot s at physical index s), or [batch] int64 in [0, slots): the ring layout, slot s of row b at
    physical index ``(start[b] + s) % slots`` (see ``compact_ring_reference_``).
    """
    batch, q_heads, _ = queries.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    if start is not None:  # back to slot order, then the same computation
        physical = (start.view(batch, 1) + torch.arange(slots, device=keys.device).view(1, slots)) % slots
        keys = torch.gather(keys, 2, physical.view(batch, 1, slots, 1).expand(-1, kv_heads, -1, keys.shape[-1]))
        values = torch.gather(values, 2, physical.view(batch, 1, slots, 1).expand(-1, kv_heads, -1, values.shape[-1]))
    group = q_heads // kv_heads
    q = queries.float().view(batch, kv_heads, group, -1)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scale  # [B, Hkv, G, S]
    valid = torch.arange(slots, device=keys.device).view(1, 1, 1, slots) < lengths.view(batch, 1, 1, 1)
    probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    out = torch.matmul(probs, values.float())  # [B, Hkv, G, Dv]
    return out.reshape(batch, q_heads, -1).to(queries.dtype)


def rms_norm_reference(
    hidden: torch.Tensor, weight: torch.Tensor, *, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of a decoder's hidden states, after adding the residual stream when one is given (Llama / Qwen2).

    hidden: [..., size]; residual: None or hidden's shape and dtype; weight: [size].
    Returns (normed, summed): ``summed = hidden + residual`` in hidden's dtype (``hidden`` itself without a
    residual), the new residual stream; ``normed = weight * (summed / sqrt(mean(summed^2) + eps))`` with the mean in
    float32 and the normalised value rounded to hidden's dtype before the weight multiplies it (transformers'
    LlamaRMSNorm / Qwen2RMSNorm), in hidden's dtype.
    """
    summed = hidden if residual is None else hidden + residual
    x = summed.float()
    normalized = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)
    return (weight * normalized).to(hidden.dtype), summed


def rotary_and_store_reference(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    key_cache: torch.Tensor, value_cache: torch.Tensor, layer: int, slots: torch.Tensor,
) -> torch.Tensor:
    """Rotary embedding of one decode step's queries and keys, and the write of its K/V at each row's physical end.

    queries [rows, q_heads, dim]; keys [rows, kv_heads, dim]; values [rows, kv_heads, value_dim]; cos, sin
    [rows, dim] in queries' dtype (the model's rotary embedding at each row's position); key_cache
    [layers, rows, kv_heads, capacity, dim] and value_cache [layers, rows, kv_heads, capacity, value_dim] (the dense
    storage); slots [rows] int, each in [0, capacity) (each row's physical length).
    Rotation as transformers' ``apply_rotary_pos_emb`` (rotate-half layout): ``x * cos + rotate_half(x) * sin`` in
    x's dtype, each product rounded, then the sum. Writes ``key_cache[layer, r, :, slots[r]]`` = the rotated keys
    of row r and ``value_cache[layer, r, :, slots[r]]`` = its values; returns the rotated queries.
    """

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos.unsqueeze(1) + rotated_half * sin.unsqueeze(1)

    rows = torch.arange(queries.shape[0], device=queries.device)
    # [layer, rows, :, slots]: the two index tensors pair up row by row; the result is [rows, heads, dim].
    key_cache[layer, rows, :, slots] = rotate(keys)
    value_cache[layer, rows, :, slots] = values
    return rotate(queries)


def silu_and_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation of Llama / Qwen2: ``silu(gate) * up`` (gate, up [..., size], one dtype), with
    SiLU rounded to the dtype before the product, as transformers computes ``act_fn(gate_proj(x)) * up_proj(x)``."""
    return torch.nn.functional.silu(gate) * up


def concat_linear_reference(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """``x`` ([M, K]) projected by each weight ([N_i, K]) plus its bias, side by side: [M, sum N_i], each output
    rounded once, as one ``F.linear`` over the concatenated weights (a Llama layer's q, k and v projections)."""
    return torch.cat([torch.nn.functional.linear(x, weight, None if biases is None else bias)
                      for weight, bias in zip(weights, biases if biases is not None else weights)], dim=-1)


def silu_gated_linear_reference(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
    gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gated MLP before its down projection: ``silu(x @ Wg^T + bg) * (x @ Wu^T + bu)``, rounded as
    transformers rounds it (each projection, then SiLU, then the product)."""
    linear = torch.nn.functional.linear
    return silu_and_mul_reference(linear(x, gate_weight, gate_bias), linear(x, up_weight, up_bias))

"""Chunked prefill for gated delta-rule attention (KDA: per-channel gate; GDN: per-head gate), forward only.

Two Triton kernels, chunk size 64 split into four sub-blocks of 16 rows:

1. ``_chunk_intra_kernel`` (one program per chunk and value head, all chunks in parallel). With G the in-chunk
   cumulative gate (log2 space) it builds the strictly lower matrix A[s, r] = beta_s sum_i k_s,i k_r,i
   2^(G_s,i - G_r,i) and the causal score matrix P[s, r] = scale sum_i q_s,i k_r,i 2^(G_s,i - G_r,i), inverts
   (I + A) by forward substitution on the 16x16 diagonal blocks and block elimination across them (the UT
   transform), and writes W = (I + A)^-1 Diag(beta) (2^G * K), U = (I + A)^-1 Diag(beta) V, Qg = scale q 2^G,
   Kd = k 2^(G_end - G), P and the chunk decay 2^G_end.
   Decay ratios are never formed as 2^G_s / 2^G_r (that overflows for strong gates): on the diagonal sub-blocks
   each pair's exponent is computed exactly, off the diagonal both factors are taken relative to the first row
   of the later sub-block, so each is <= 1.
2. ``_chunk_inter_kernel`` (one program per sequence, value head and block of value channels) walks the chunks
   in order with the float32 state S: U' = U - W S, O = Qg S + P U', S = Diag(2^G_end) S + Kd^T U'.

Variable-length batches: every sequence is cut into its own chunks (``cu_seqlens``); rows past a sequence's end
are masked on load and store, so chunks never mix sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import CHUNK_SIZE

INTER_BLOCK_V = 32


@triton.jit
def _load_sub_block(
    q, k, g, beta, token0, valid, row0: tl.constexpr, h, hv, prefix,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
    PER_CHANNEL: tl.constexpr, L2NORM: tl.constexpr,
):
    rows = row0 + tl.arange(0, 16)
    cols = tl.arange(0, BK)
    row_ok = rows < valid
    mask = row_ok[:, None] & (cols < K)[None, :]
    token = token0 + rows.to(tl.int64)
    qk_offset = (token * H + h)[:, None] * K + cols[None, :]
    b_k = tl.load(k + qk_offset, mask=mask, other=0.0).to(tl.float32)
    b_q = tl.load(q + qk_offset, mask=mask, other=0.0).to(tl.float32)
    if L2NORM:
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 1) + 1e-6)[:, None]
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 1) + 1e-6)[:, None]
    b_beta = tl.load(beta + token * HV + hv, mask=row_ok, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        b_g = tl.load(g + (token * HV + hv)[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b_g = b_g * 1.4426950408889634
        b_G = prefix[None, :] + tl.cumsum(b_g, axis=0)
        prefix = prefix + tl.sum(b_g, 0)
    else:
        b_g = tl.load(g + token * HV + hv, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        b_G = prefix + tl.cumsum(b_g, axis=0)
        prefix = prefix + tl.sum(b_g, 0)
    return b_q, b_k, b_beta, b_G, prefix


@triton.jit
def _diagonal_scores(b_q, b_k, b_G, PER_CHANNEL: tl.constexpr):
    """Key-key and query-key decayed products within one sub-block (lower triangle incl. diagonal)."""
    o = tl.arange(0, 16)
    lower = o[:, None] >= o[None, :]
    if PER_CHANNEL:
        b_A = tl.zeros([16, 16], dtype=tl.float32)
        b_P = tl.zeros([16, 16], dtype=tl.float32)
        # Column by column: the exponent G_s - G_r is exact for every pair (no factorisation that could overflow).
        for r in range(16):
            pick = (o == r)[:, None]
            k_r = tl.sum(tl.where(pick, b_k, 0.0), 0)
            G_r = tl.sum(tl.where(pick, b_G, 0.0), 0)
            decay = tl.exp2(tl.where((o >= r)[:, None], b_G - G_r[None, :], float("-inf")))
            k_decayed = decay * k_r[None, :]
            column = (o == r)[None, :]
            b_A = tl.where(column, tl.sum(b_k * k_decayed, 1)[:, None], b_A)
            b_P = tl.where(column, tl.sum(b_q * k_decayed, 1)[:, None], b_P)
    else:
        decay = tl.exp2(tl.where(lower, b_G[:, None] - b_G[None, :], float("-inf")))
        b_A = tl.dot(b_k, tl.trans(b_k), input_precision="tf32x3") * decay
        b_P = tl.dot(b_q, tl.trans(b_k), input_precision="tf32x3") * decay
    return b_A, b_P


@triton.jit
def _later_factors(b_q, b_k, b_G, PER_CHANNEL: tl.constexpr):
    """Row factors of sub-block i for its products with earlier sub-blocks, relative to i's first row (<= 1)."""
    if PER_CHANNEL:
        o = tl.arange(0, 16)
        G_ref = tl.sum(tl.where((o == 0)[:, None], b_G, 0.0), 0)
        relative = tl.exp2(b_G - G_ref[None, :])
        return b_q * relative, b_k * relative, G_ref
    else:
        G_ref = tl.sum(tl.where(tl.arange(0, 16) == 0, b_G, 0.0), 0)
        relative = tl.exp2(b_G - G_ref)
        return b_q * relative[:, None], b_k * relative[:, None], G_ref


@triton.jit
def _off_diagonal_scores(left_q, left_k, G_ref, b_k_j, b_G_j, PER_CHANNEL: tl.constexpr):
    """Products of a later sub-block (factors from ``_later_factors``) with an earlier one, j < i."""
    if PER_CHANNEL:
        right = b_k_j * tl.exp2(G_ref[None, :] - b_G_j)
    else:
        right = b_k_j * tl.exp2(G_ref - b_G_j)[:, None]
    b_A = tl.dot(left_k, tl.trans(right), input_precision="tf32x3")
    b_P = tl.dot(left_q, tl.trans(right), input_precision="tf32x3")
    return b_A, b_P


@triton.jit
def _invert_unit_lower(b_A):
    """(I + A)^-1 for a strictly lower 16x16 A, by forward substitution row by row."""
    o = tl.arange(0, 16)
    b_T = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    for r in range(1, 16):
        pick = (o == r)[:, None]
        a_r = tl.sum(tl.where(pick, b_A, 0.0), 0)
        b_T = tl.where(pick, b_T - tl.sum(a_r[:, None] * b_T, 0)[None, :], b_T)
    return b_T


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def _store_block(ptr, token0, valid, row0: tl.constexpr, hv, value, HV: tl.constexpr, WIDTH: tl.constexpr,
                 BW: tl.constexpr, col0: tl.constexpr):
    rows = row0 + tl.arange(0, 16)
    cols = col0 + tl.arange(0, BW)
    token = token0 + rows.to(tl.int64)
    mask = (rows < valid)[:, None] & (cols < WIDTH)[None, :]
    tl.store(ptr + (token * HV + hv)[:, None] * WIDTH + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weighted_values(v, token0, valid, row0: tl.constexpr, hv, b_beta, HV: tl.constexpr, V: tl.constexpr,
                     BVF: tl.constexpr):
    rows = row0 + tl.arange(0, 16)
    cols = tl.arange(0, BVF)
    token = token0 + rows.to(tl.int64)
    mask = (rows < valid)[:, None] & (cols < V)[None, :]
    b_v = tl.load(v + (token * HV + hv)[:, None] * V + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return b_v * b_beta[:, None]


@triton.jit
def _decay_rows(b_G, PER_CHANNEL: tl.constexpr):
    if PER_CHANNEL:
        return tl.exp2(b_G)
    else:
        return tl.exp2(b_G)[:, None]


@triton.jit
def _chunk_intra_kernel(
    q, k, v, g, beta, w, u, qg, kd, p, gamma, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr,
    PER_CHANNEL: tl.constexpr, L2NORM: tl.constexpr,
):
    i_chunk = tl.program_id(0)
    hv = tl.program_id(1)
    h = hv // (HV // H)
    i_seq = tl.load(chunk_indices + 2 * i_chunk)
    i_in_seq = tl.load(chunk_indices + 2 * i_chunk + 1)
    bos = tl.load(cu_seqlens + i_seq).to(tl.int64)
    eos = tl.load(cu_seqlens + i_seq + 1).to(tl.int64)
    token0 = bos + i_in_seq.to(tl.int64) * 64
    valid = (eos - token0).to(tl.int32)

    if PER_CHANNEL:
        prefix = tl.zeros([BK], dtype=tl.float32)
    else:
        prefix = tl.sum(tl.zeros([16], dtype=tl.float32), 0)
    o16 = tl.arange(0, 16)
    strict = o16[:, None] > o16[None, :]
    zero_block = tl.zeros([16, 16], dtype=tl.float32)

    # Row sub-block by row sub-block: load it, form its products with itself and the earlier sub-blocks, store
    # its causal scores P (scaled, dense 64x64 lower-triangular tile per chunk) and Qg = scale q 2^G right away
    # so that only k, G (and the A blocks) stay live.
    q0, k0, beta0, G0, prefix = _load_sub_block(q, k, g, beta, token0, valid, 0, h, hv, prefix, H, HV, K, BK,
                                                PER_CHANNEL, L2NORM)
    A00, P00 = _diagonal_scores(q0, k0, G0, PER_CHANNEL)
    _store_block(p, token0, valid, 0, hv, P00 * scale, HV, 64, 16, 0)
    _store_block(p, token0, valid, 0, hv, zero_block, HV, 64, 16, 16)
    _store_block(p, token0, valid, 0, hv, zero_block, HV, 64, 16, 32)
    _store_block(p, token0, valid, 0, hv, zero_block, HV, 64, 16, 48)
    _store_block(qg, token0, valid, 0, hv, q0 * _decay_rows(G0, PER_CHANNEL) * scale, HV, K, BK, 0)

    q1, k1, beta1, G1, prefix = _load_sub_block(q, k, g, beta, token0, valid, 16, h, hv, prefix, H, HV, K, BK,
                                                PER_CHANNEL, L2NORM)
    A11, P11 = _diagonal_scores(q1, k1, G1, PER_CHANNEL)
    lq, lk, ref = _later_factors(q1, k1, G1, PER_CHANNEL)
    A10, P10 = _off_diagonal_scores(lq, lk, ref, k0, G0, PER_CHANNEL)
    _store_block(p, token0, valid, 16, hv, P10 * scale, HV, 64, 16, 0)
    _store_block(p, token0, valid, 16, hv, P11 * scale, HV, 64, 16, 16)
    _store_block(p, token0, valid, 16, hv, zero_block, HV, 64, 16, 32)
    _store_block(p, token0, valid, 16, hv, zero_block, HV, 64, 16, 48)
    _store_block(qg, token0, valid, 16, hv, q1 * _decay_rows(G1, PER_CHANNEL) * scale, HV, K, BK, 0)

    q2, k2, beta2, G2, prefix = _load_sub_block(q, k, g, beta, token0, valid, 32, h, hv, prefix, H, HV, K, BK,
                                                PER_CHANNEL, L2NORM)
    A22, P22 = _diagonal_scores(q2, k2, G2, PER_CHANNEL)
    lq, lk, ref = _later_factors(q2, k2, G2, PER_CHANNEL)
    A20, P20 = _off_diagonal_scores(lq, lk, ref, k0, G0, PER_CHANNEL)
    A21, P21 = _off_diagonal_scores(lq, lk, ref, k1, G1, PER_CHANNEL)
    _store_block(p, token0, valid, 32, hv, P20 * scale, HV, 64, 16, 0)
    _store_block(p, token0, valid, 32, hv, P21 * scale, HV, 64, 16, 16)
    _store_block(p, token0, valid, 32, hv, P22 * scale, HV, 64, 16, 32)
    _store_block(p, token0, valid, 32, hv, zero_block, HV, 64, 16, 48)
    _store_block(qg, token0, valid, 32, hv, q2 * _decay_rows(G2, PER_CHANNEL) * scale, HV, K, BK, 0)

    q3, k3, beta3, G3, prefix = _load_sub_block(q, k, g, beta, token0, valid, 48, h, hv, prefix, H, HV, K, BK,
                                                PER_CHANNEL, L2NORM)
    A33, P33 = _diagonal_scores(q3, k3, G3, PER_CHANNEL)
    lq, lk, ref = _later_factors(q3, k3, G3, PER_CHANNEL)
    A30, P30 = _off_diagonal_scores(lq, lk, ref, k0, G0, PER_CHANNEL)
    A31, P31 = _off_diagonal_scores(lq, lk, ref, k1, G1, PER_CHANNEL)
    A32, P32 = _off_diagonal_scores(lq, lk, ref, k2, G2, PER_CHANNEL)
    _store_block(p, token0, valid, 48, hv, P30 * scale, HV, 64, 16, 0)
    _store_block(p, token0, valid, 48, hv, P31 * scale, HV, 64, 16, 16)
    _store_block(p, token0, valid, 48, hv, P32 * scale, HV, 64, 16, 32)
    _store_block(p, token0, valid, 48, hv, P33 * scale, HV, 64, 16, 48)
    _store_block(qg, token0, valid, 48, hv, q3 * _decay_rows(G3, PER_CHANNEL) * scale, HV, K, BK, 0)
    G_end = prefix

    # Kd = k 2^(G_end - G): each row's contribution to the state leaving the chunk.
    if PER_CHANNEL:
        _store_block(kd, token0, valid, 0, hv, k0 * tl.exp2(G_end[None, :] - G0), HV, K, BK, 0)
        _store_block(kd, token0, valid, 16, hv, k1 * tl.exp2(G_end[None, :] - G1), HV, K, BK, 0)
        _store_block(kd, token0, valid, 32, hv, k2 * tl.exp2(G_end[None, :] - G2), HV, K, BK, 0)
        _store_block(kd, token0, valid, 48, hv, k3 * tl.exp2(G_end[None, :] - G3), HV, K, BK, 0)
        cols = tl.arange(0, BK)
        tl.store(gamma + (i_chunk * HV + hv) * K + cols, tl.exp2(G_end), mask=cols < K)
    else:
        _store_block(kd, token0, valid, 0, hv, k0 * tl.exp2(G_end - G0)[:, None], HV, K, BK, 0)
        _store_block(kd, token0, valid, 16, hv, k1 * tl.exp2(G_end - G1)[:, None], HV, K, BK, 0)
        _store_block(kd, token0, valid, 32, hv, k2 * tl.exp2(G_end - G2)[:, None], HV, K, BK, 0)
        _store_block(kd, token0, valid, 48, hv, k3 * tl.exp2(G_end - G3)[:, None], HV, K, BK, 0)
        tl.store(gamma + i_chunk * HV + hv, tl.exp2(G_end))

    # Rows of Diag(beta) (2^G * K) for W; after this k and G are dead.
    bk0 = k0 * _decay_rows(G0, PER_CHANNEL) * beta0[:, None]
    bk1 = k1 * _decay_rows(G1, PER_CHANNEL) * beta1[:, None]
    bk2 = k2 * _decay_rows(G2, PER_CHANNEL) * beta2[:, None]
    bk3 = k3 * _decay_rows(G3, PER_CHANNEL) * beta3[:, None]

    # A row s carries beta_s; the diagonal blocks keep only their strict lower part.
    A00 = tl.where(strict, A00, 0.0) * beta0[:, None]
    A11 = tl.where(strict, A11, 0.0) * beta1[:, None]
    A22 = tl.where(strict, A22, 0.0) * beta2[:, None]
    A33 = tl.where(strict, A33, 0.0) * beta3[:, None]
    A10 = A10 * beta1[:, None]
    A20 = A20 * beta2[:, None]
    A21 = A21 * beta2[:, None]
    A30 = A30 * beta3[:, None]
    A31 = A31 * beta3[:, None]
    A32 = A32 * beta3[:, None]

    # (I + A)^-1, block lower triangular: T_ii by substitution, T_ij = -T_ii sum_{j<=m<i} A_im T_mj.
    T00 = _invert_unit_lower(A00)
    T11 = _invert_unit_lower(A11)
    T22 = _invert_unit_lower(A22)
    T33 = _invert_unit_lower(A33)
    T10 = -_dot(_dot(T11, A10), T00)
    T21 = -_dot(_dot(T22, A21), T11)
    T20 = -_dot(T22, _dot(A20, T00) + _dot(A21, T10))
    T32 = -_dot(_dot(T33, A32), T22)
    T31 = -_dot(T33, _dot(A31, T11) + _dot(A32, T21))
    T30 = -_dot(T33, _dot(A30, T00) + _dot(A31, T10) + _dot(A32, T20))

    # W = T Diag(beta) (2^G * K)
    _store_block(w, token0, valid, 0, hv, _dot(T00, bk0), HV, K, BK, 0)
    _store_block(w, token0, valid, 16, hv, _dot(T10, bk0) + _dot(T11, bk1), HV, K, BK, 0)
    _store_block(w, token0, valid, 32, hv, _dot(T20, bk0) + _dot(T21, bk1) + _dot(T22, bk2), HV, K, BK, 0)
    _store_block(w, token0, valid, 48, hv,
                 _dot(T30, bk0) + _dot(T31, bk1) + _dot(T32, bk2) + _dot(T33, bk3), HV, K, BK, 0)

    # U = T Diag(beta) V
    bv0 = _weighted_values(v, token0, valid, 0, hv, beta0, HV, V, BVF)
    bv1 = _weighted_values(v, token0, valid, 16, hv, beta1, HV, V, BVF)
    bv2 = _weighted_values(v, token0, valid, 32, hv, beta2, HV, V, BVF)
    bv3 = _weighted_values(v, token0, valid, 48, hv, beta3, HV, V, BVF)
    _store_block(u, token0, valid, 0, hv, _dot(T00, bv0), HV, V, BVF, 0)
    _store_block(u, token0, valid, 16, hv, _dot(T10, bv0) + _dot(T11, bv1), HV, V, BVF, 0)
    _store_block(u, token0, valid, 32, hv, _dot(T20, bv0) + _dot(T21, bv1) + _dot(T22, bv2), HV, V, BVF, 0)
    _store_block(u, token0, valid, 48, hv,
                 _dot(T30, bv0) + _dot(T31, bv1) + _dot(T32, bv2) + _dot(T33, bv3), HV, V, BVF, 0)



@triton.jit
def _chunk_inter_kernel(
    w, u, qg, kd, p, gamma, o, h0, ht, cu_seqlens, chunk_offsets,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_seq_head = tl.program_id(0)
    i_v = tl.program_id(1)
    i_seq = i_seq_head // HV
    hv = i_seq_head % HV
    bos = tl.load(cu_seqlens + i_seq).to(tl.int64)
    eos = tl.load(cu_seqlens + i_seq + 1).to(tl.int64)
    first_chunk = tl.load(chunk_offsets + i_seq).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, 64)

    cols_k = tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    rows = tl.arange(0, 64)
    k_ok = cols_k < K
    v_ok = cols_v < V
    state_offset = ((i_seq * HV + hv) * K + cols_k[:, None]).to(tl.int64) * V + cols_v[None, :]
    state_mask = k_ok[:, None] & v_ok[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_S = tl.load(h0 + state_offset, mask=state_mask, other=0.0)

    for i_c in range(n_chunks):
        token = bos + i_c * 64 + rows
        row_ok = token < eos
        base = token * HV + hv
        mask_k = row_ok[:, None] & k_ok[None, :]
        mask_v = row_ok[:, None] & v_ok[None, :]
        b_w = tl.load(w + base[:, None] * K + cols_k[None, :], mask=mask_k, other=0.0)
        b_qg = tl.load(qg + base[:, None] * K + cols_k[None, :], mask=mask_k, other=0.0)
        b_kd = tl.load(kd + base[:, None] * K + cols_k[None, :], mask=mask_k, other=0.0)
        b_u = tl.load(u + base[:, None] * V + cols_v[None, :], mask=mask_v, other=0.0)
        b_p = tl.load(p + base[:, None] * 64 + rows[None, :], mask=row_ok[:, None], other=0.0)
        if PER_CHANNEL:
            b_gamma = tl.load(gamma + ((first_chunk + i_c) * HV + hv) * K + cols_k, mask=k_ok, other=0.0)
        else:
            b_gamma = tl.load(gamma + (first_chunk + i_c) * HV + hv)
        # fp32 operands: tf32 tensor-core products for 16-bit inputs, fp32-accurate (tf32x3) for fp32 inputs.
        b_new = b_u - tl.dot(b_w, b_S, input_precision=DOT_PRECISION)
        b_o = tl.dot(b_qg, b_S, input_precision=DOT_PRECISION)
        b_o += tl.dot(b_p, b_new, input_precision=DOT_PRECISION)
        if PER_CHANNEL:
            b_S = b_S * b_gamma[:, None]
        else:
            b_S = b_S * b_gamma
        b_S += tl.dot(tl.trans(b_kd), b_new, input_precision=DOT_PRECISION)
        tl.store(o + base[:, None] * V + cols_v[None, :], b_o.to(o.dtype.element_ty), mask=mask_v)

    if STORE_FINAL_STATE:
        tl.store(ht + state_offset, b_S, mask=state_mask)


def chunk_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool,
    cu_seqlens: torch.Tensor | None,
    per_channel: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the two chunk kernels; inputs were validated by the public op."""
    batch, length, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    total = batch * length
    device = q.device
    # Flatten the batch into one token axis: an equal-length batch is a variable-length batch of B sequences.
    q, k, v, beta = (x.reshape(1, total, *x.shape[2:]).contiguous() for x in (q, k, v, beta))
    g = g.reshape(1, total, *g.shape[2:]).contiguous()
    if cu_seqlens is None:
        lengths = torch.full((batch,), length, dtype=torch.int64)
        cu = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * length
    else:
        cu_cpu = cu_seqlens.to("cpu", torch.int64)
        lengths = cu_cpu[1:] - cu_cpu[:-1]
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
    sequences = lengths.numel()
    chunk_counts = (lengths + CHUNK_SIZE - 1) // CHUNK_SIZE
    chunk_offsets = torch.zeros(sequences + 1, dtype=torch.int64)
    chunk_offsets[1:] = torch.cumsum(chunk_counts, 0)
    n_chunks = int(chunk_offsets[-1])
    chunk_seq = torch.repeat_interleave(torch.arange(sequences), chunk_counts)
    chunk_in_seq = torch.arange(n_chunks) - torch.repeat_interleave(chunk_offsets[:-1], chunk_counts)
    chunk_indices = torch.stack([chunk_seq, chunk_in_seq], 1).to(device=device, dtype=torch.int32)
    chunk_offsets = chunk_offsets.to(device=device, dtype=torch.int32)

    # Intermediates are fp32 whatever the input dtype: rounding them to 16 bits costs ~0.5% relative error.
    block_k = max(16, triton.next_power_of_2(key_dim))
    block_v_full = max(16, triton.next_power_of_2(value_dim))
    w = torch.empty(total, value_heads, key_dim, dtype=torch.float32, device=device)
    qg = torch.empty_like(w)
    kd = torch.empty_like(w)
    u = torch.empty(total, value_heads, value_dim, dtype=torch.float32, device=device)
    p = torch.empty(total, value_heads, CHUNK_SIZE, dtype=torch.float32, device=device)
    gamma = torch.empty(max(n_chunks, 1), value_heads, key_dim if per_channel else 1, dtype=torch.float32,
                        device=device)
    out = torch.empty(1, total, value_heads, value_dim, dtype=q.dtype, device=device)
    final_state = (
        torch.empty(sequences, value_heads, key_dim, value_dim, dtype=torch.float32, device=device)
        if output_final_state else None
    )
    if n_chunks > 0:
        _chunk_intra_kernel[(n_chunks, value_heads)](
            q, k, v, g, beta, w, u, qg, kd, p, gamma, cu, chunk_indices, scale,
            H=heads, HV=value_heads, K=key_dim, V=value_dim, BK=block_k, BVF=block_v_full,
            PER_CHANNEL=per_channel, L2NORM=use_qk_l2norm_in_kernel,
            num_warps=4, num_stages=1,
        )
    # Value blocks of 32 channels: 128 programs for one sequence of 32 heads (an H100 has 132 SMs); fp32 tiles
    # leave no room for a second pipeline stage in shared memory.
    _chunk_inter_kernel[(sequences * value_heads, triton.cdiv(value_dim, INTER_BLOCK_V))](
        w, u, qg, kd, p, gamma, out, initial_state, final_state, cu, chunk_offsets,
        HV=value_heads, K=key_dim, V=value_dim, BK=block_k, BV=INTER_BLOCK_V,
        PER_CHANNEL=per_channel, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state,
        DOT_PRECISION="tf32" if q.dtype in (torch.bfloat16, torch.float16) else "tf32x3",
        num_warps=4, num_stages=1,
    )
    return out.reshape(batch, length, value_heads, value_dim), final_state

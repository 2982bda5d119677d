"""Chunked prefill for gated delta-rule attention (KDA: per-channel gate; GDN: per-head gate), forward only.

Chunks of 64 tokens, in two or three stages:

1. Intra-chunk, all chunks in parallel. Per chunk and value head, with G the in-chunk cumulative gate (log2
   space), the scores step forms the 64 x 64 matrices
       A[s, r] = beta_s sum_i k_s,i k_r,i 2^(G_s,i - G_r,i)   (s > r)
       P[s, r] = scale sum_i q_s,i k_r,i 2^(G_s,i - G_r,i)    (s >= r)
   with tensor-core products, stores P and inverts (I + A) (the UT transform); the apply step writes
       W = (I + A)^-1 Diag(beta) (2^G * K),  U = (I + A)^-1 Diag(beta) V,  gamma = 2^G_end,
   and for a per-channel gate Qg = scale q 2^G and Kd = k 2^(G_end - G). A per-head gate needs no Qg and Kd: they
   are q and k with one scale per row (scale q_norm 2^G and k_norm 2^(G_end - G), ``row_scale``), which kernel 2
   applies around its products with q and k themselves. KDA runs the two steps as two kernels
   (``_chunk_scores_kernel`` storing (I + A)^-1, then ``_chunk_apply_kernel``, one program per block of key or
   value channels, so the register-heavy scores step does not hold the SM through the memory-heavy apply step);
   GDN, whose scores step is light, runs both in one program (``_chunk_intra_kernel``), which measured faster.
2. ``_chunk_state_kernel``, one program per sequence, value head and block of value channels, walks the chunks
   in order with the float32 state S in registers:
       V' = U - W S,  S = Diag(gamma) S + Kd^T V',
   and the outputs O = Qg S + P V' (S the chunk's starting state), in one of two variants (PREFILL_VARIANTS):
   "sequential_outputs" computes O inside this pass; "parallel_outputs" stores each chunk's starting state and V'
   instead, and
3. ``_chunk_output_kernel``, one program per chunk, value head and block of value channels, all in parallel,
   computes O from them. Both variants run the same products on the same operands (equal results); the second
   shortens the sequential step per chunk at the cost of writing and reading the states and V'.
   Everything stage 2 reads per chunk was prepared by stage 1, so the loads of the next chunk are independent of S
   and are software-pipelined (``num_stages``) behind the current chunk's products.

Precision (relative error against the naive fp32 recurrence, bf16 inputs, 1024 tokens, 32 heads of 128 x 128,
H100, docs/linear_attention_prefill_h100.log: output 0.0017 for both, which is mostly the bf16 rounding of the
output itself; final state KDA 0.0017, GDN 0.0004): fp32 state and accumulators; for 16-bit inputs W, Qg and Kd
are stored in the input dtype (outputs move by < 1e-4; KDA's Kd rounding is most of its state's error, which GDN,
reading k itself, does not have) while U and P, whose rounding would cost ~0.2% of the output, stay fp32; products
run on tf32 tensor cores with operands rounded to nearest (``tf32x3``, fp32-accurate, for fp32 inputs), products
of two 16-bit operands (GDN's k k^T and q k^T) run in 16 bits, which is exact, the state update Kd^T V' (128 key
channels) runs as two 16-bit products, of V''s 16-bit rounding and of the remainder (16 mantissa bits, more than
tf32's: on the H200 at 1,000 tokens GDN's final-state error was 0.00028 with V' first rounded to tf32, 0.00035
with one tf32 product, 0.00165 with the rounding alone; KDA's stays 0.0017; V' is now rounded to tf32 only for
the P V' output product), and S enters its products with W and Qg in the storage dtype (the
parallel-outputs variant stores each chunk's starting state in that dtype, the operand its output product reads,
and V' in fp32 like U).

Variable-length batches: every sequence is cut into its own chunks (``cu_seqlens``); rows past a sequence's end
are masked on load and store, so chunks never mix sequences.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from .common import CHUNK_SIZE, interpreting

LOG2_E = tl.constexpr(1.4426950408889634)
# Kernel 1 factors a decay 2^(G_s - G_r) as 2^(G_s - G_mid) * 2^(G_mid - G_r) around the chunk's middle row so
# that the 64 x 64 products run on tensor cores. Each factor stays within 2^(+-96) when the gate sums up to 32
# tokens away from the middle stay within this many powers of two (so neither overflows fp32 nor loses a key
# entry above 2^-30 to underflow); chunks with stronger gates take an exact column-by-column path.
MAX_FACTORED_EXPONENT = tl.constexpr(96.0)
# Launch shapes. Every kernel has a small tuning space whose first config is the launch measured best on an H100
# for 32 heads of 128 x 128 (docs/linear_attention_prefill_h100.log: the scores step uncapped took ~255 registers,
# two programs per multiprocessor, 3% slower, and 8 warps 1.2-1.4x slower; 64 apply channels with 8 warps ran 1.14x
# faster than 32 with 4; the state pass with 3 stages was 3% faster for GDN, no faster for KDA). Constants tuned on
# one card did not hold on the next (the H200 left KDA at 0.87x and GDN at 0.70x of fla), so a prefill of at least
# TUNE_FROM_CHUNKS chunks times every config of the space once per shape (head counts and dims, flags, dtypes and
# the power-of-two buckets of the chunk and sequence counts, ``_tuning_key``) and keeps the fastest. Shorter
# prefills, where timing would cost more than it saves, and the interpreter, which ignores warps and stages, take
# the first config. Which stage-1 layout runs stays fixed per gate kind: KDA's register-heavy scores step as its
# own kernel (1.29x faster at 64k tokens than one kernel), GDN's light one inside the apply program (the split
# launch was 1.18x slower).
TUNE_FROM_CHUNKS = 64
SCORES_CONFIGS = [  # KDA scores step: KB key channels per step of A and P
    triton.Config({"KB": 32}, num_warps=4, num_stages=1, maxnreg=168),
    triton.Config({"KB": 32}, num_warps=4, num_stages=1),
    triton.Config({"KB": 16}, num_warps=4, num_stages=1, maxnreg=168),
    triton.Config({"KB": 64}, num_warps=4, num_stages=1),
    triton.Config({"KB": 64}, num_warps=8, num_stages=1),
]
APPLY_CONFIGS = [  # KDA apply step: KB key / VB value channels per program (no loop: stages stay at the default)
    triton.Config({"KB": 64, "VB": 64}, num_warps=8),
    triton.Config({"KB": 32, "VB": 32}, num_warps=4),
    triton.Config({"KB": 64, "VB": 64}, num_warps=4),
    triton.Config({"KB": 128, "VB": 128}, num_warps=8),
    triton.Config({"KB": 32, "VB": 32}, num_warps=2),
]
INTRA_CONFIGS = [  # GDN scores and apply steps in one program: KB key channels per step, VB value channels per block
    triton.Config({"KB": 32, "VB": 32}, num_warps=4, num_stages=1, maxnreg=168),
    triton.Config({"KB": 32, "VB": 32}, num_warps=4, num_stages=1),
    triton.Config({"KB": 32, "VB": 64}, num_warps=4, num_stages=1, maxnreg=168),
    triton.Config({"KB": 64, "VB": 64}, num_warps=4, num_stages=1),
    triton.Config({"KB": 64, "VB": 64}, num_warps=8, num_stages=1),
]
# State pass: BV value channels per program (32: 128 programs for 32 heads on 132 multiprocessors; 16 doubles the
# programs of a short batch, 64 halves the re-reads of W, Qg, Kd and P). Stages only pipeline 16-bit tiles of up
# to 128 key channels (``_fit_state``); a third stage hides the loads of the chunk after next (H200, 64k tokens:
# 1.1-1.2x faster than two). The sequential-outputs pass has no room for 4 stages, or 3 at 64 channels (its Qg and
# P tiles: more than the 227 KB of shared memory); the state-only pass has.
_STATE_LAUNCHES = [(32, 4, 2), (32, 4, 3), (16, 4, 2), (16, 4, 3), (16, 2, 2), (16, 2, 3), (64, 4, 2), (32, 8, 2)]
STATE_CONFIGS = {  # by gate kind, each starting from its measured default (BV, warps, stages)
    per_channel: [triton.Config({"BV": block}, num_warps=warps, num_stages=stages)
                  for block, warps, stages in sorted(_STATE_LAUNCHES, key=lambda launch: launch != default)]
    for per_channel, default in ((True, (32, 4, 2)), (False, (32, 4, 3)))
}
# The state-only pass (parallel outputs) holds no output tile, so two programs of 16 value channels may share a
# multiprocessor, one's products hiding the other's latency (tuning on the H200 at 16k and 64k tokens picked 16
# channels with 3 stages for both gate kinds); the first config is the sequential pass's default.
STATE_ONLY_CONFIGS = [triton.Config({"BV": block}, num_warps=warps, num_stages=stages) for block, warps, stages in
                      [(32, 4, 2), (16, 4, 2), (16, 2, 2), (16, 2, 3), (32, 2, 2), (16, 4, 3), (32, 4, 3), (32, 4, 4),
                       (64, 4, 2), (64, 4, 3)]]
OUTPUT_CONFIGS = [  # parallel output kernel: BV value channels per program (no loop: stages stay at the default)
    triton.Config({"BV": 64}, num_warps=4),
    triton.Config({"BV": 32}, num_warps=4),
    triton.Config({"BV": 128}, num_warps=4),
    triton.Config({"BV": 64}, num_warps=8),
    triton.Config({"BV": 128}, num_warps=8),
]
# Stage 2 comes in two variants. "sequential_outputs": the pass over the chunks also writes every chunk's outputs.
# "parallel_outputs": the pass only carries the state (storing each chunk's starting state and V'), and a fully
# parallel kernel over (chunk, value head, value block) writes the outputs: a shorter sequential step per chunk
# for more memory traffic. Which is faster depends on the card (KDA 0.87x and GDN 0.70x of fla on the H200 with
# the sequential one), so long prefills time both once per shape (``_chosen_variant``); shorter ones take
# DEFAULT_VARIANT, the one measured on the H100.
PREFILL_VARIANTS = ("sequential_outputs", "parallel_outputs")
DEFAULT_VARIANT = "sequential_outputs"


def _tuned_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The space to tune over: all of it when compiling, the first config under the interpreter."""
    return configs[:1] if interpreting() else configs


def _with(config: triton.Config, **changes) -> triton.Config:
    """A copy of ``config`` with some meta-parameters (or ``num_stages``) changed."""
    stages = changes.pop("num_stages", config.num_stages)
    return triton.Config({**config.kwargs, **changes}, num_warps=config.num_warps, num_stages=stages,
                         maxnreg=config.maxnreg)


def _padded(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _fitted_space(fit):
    """An ``early_config_prune`` for a space: each config fitted to the launch (``fit(config, args)``), duplicates
    dropped; below TUNE_FROM_CHUNKS chunks only the first config."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        if args["chunk_bucket"] < TUNE_FROM_CHUNKS:
            configs = configs[:1]
        fitted = {}
        for config in configs:
            config = fit(config, args)
            launch = (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages, config.maxnreg)
            fitted.setdefault(launch, config)
        return list(fitted.values())

    return prune


def _fit_blocks(config, args):
    """Channel blocks no wider than the padded head dims: a wider block only adds masked lanes."""
    caps = {"KB": "K", "VB": "V", "BV": "V"}  # tuned block -> the head dim it walks
    return _with(config, **{name: min(value, _padded(args[caps[name]])) for name, value in config.kwargs.items()})


def _fit_state(config, args):
    """16-bit W/Qg/Kd tiles of up to 128 key channels leave room in shared memory (227 KB) for more than one stage:
    the next chunk's tiles load during this chunk's products; other launches run unpipelined."""
    config = _fit_blocks(config, args)
    pipelined = args["SIXTEEN_BIT_PRODUCTS"] and args["BK"] <= 128
    return config if pipelined else _with(config, num_stages=1)


def _tuning_key(*names: str) -> list[str]:
    """Autotune key: the kernel's shape and flag arguments plus the chunk-count bucket (tensor dtypes are added by
    Triton). The buckets (``chunk_bucket``, ``sequence_bucket``) are kernel arguments only for the key: unused in the
    kernels and not specialised on, so a new bucket re-times the space without compiling anything."""
    return [*names, "chunk_bucket"]


def _autotuned(configs, key, fit):
    """Decorator: a kernel tuned over ``configs`` (see ``_tuned_configs``), keyed on ``key``."""
    return triton.autotune(configs=_tuned_configs(configs), key=key,
                           prune_configs_by={"early_config_prune": _fitted_space(fit)})


@triton.jit
def _chunk_bounds(i_chunk, cu_seqlens, chunk_indices, T, IS_VARLEN: tl.constexpr):
    """First token of chunk ``i_chunk`` and the token past the end of its sequence."""
    if IS_VARLEN:
        i_seq = tl.load(chunk_indices + 2 * i_chunk)
        i_in_seq = tl.load(chunk_indices + 2 * i_chunk + 1)
        bos = tl.load(cu_seqlens + i_seq).to(tl.int64)
        eos = tl.load(cu_seqlens + i_seq + 1).to(tl.int64)
    else:
        chunks_per_sequence = tl.cdiv(T, 64)
        i_seq = i_chunk // chunks_per_sequence
        i_in_seq = i_chunk % chunks_per_sequence
        bos = i_seq.to(tl.int64) * T
        eos = bos + T
    return bos + i_in_seq.to(tl.int64) * 64, eos


@triton.jit
def _chunk_rows(cu_seqlens, chunk_indices, T, H: tl.constexpr, HV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """A stage-1 program's chunk, value head and query/key head (from its grid position), and its 64 rows' tokens
    with the mask of those inside the sequence."""
    i_chunk = tl.program_id(0)
    hv = tl.program_id(1)
    token0, eos = _chunk_bounds(i_chunk, cu_seqlens, chunk_indices, T, IS_VARLEN)
    token = token0 + tl.arange(0, 64)
    return i_chunk, hv, hv // (HV // H), token, token < eos


@triton.jit
def _round_to_tf32(x):
    """Round fp32 to the nearest tf32 value. Tensor cores truncate the 13 low mantissa bits of fp32 operands; the
    bias adds up over the 64-term sums (relative output error 0.0025 instead of 0.0017 against the recurrence)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _head_gates(g, token, row_ok, hv, HV: tl.constexpr):
    """Per-head gate: cumulative log2 gate G of every row and its value at the chunk's end."""
    b_G = tl.cumsum(tl.load(g + token * HV + hv, mask=row_ok, other=0.0).to(tl.float32) * LOG2_E, 0)
    G_end = tl.sum(tl.where(tl.arange(0, 64) == 63, b_G, 0.0), 0)  # masked rows add 0: the last valid row's value
    return b_G, G_end


@triton.jit
def _gated_scores(b_q, b_k, b_G, b_A, b_P, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    """Add one block of key channels to A = sum_i k_s,i k_r,i 2^(G_s,i - G_r,i) and P (same with q_s), s >= r.

    Entries above the diagonal are garbage (possibly inf): the caller masks them.
    """
    rows = tl.arange(0, 64)
    G_mid = tl.sum(tl.where((rows == 32)[:, None], b_G, 0.0), 0)
    relative = b_G - G_mid[None, :]
    if tl.max(tl.abs(relative)) <= MAX_FACTORED_EXPONENT:
        left = tl.exp2(relative)
        left_k = b_k * left
        left_q = b_q * left
        right = b_k * tl.exp2(-relative)
        if ROUND_TF32:
            left_k = _round_to_tf32(left_k)
            left_q = _round_to_tf32(left_q)
            right = _round_to_tf32(right)
        b_A += tl.dot(left_k, tl.trans(right), input_precision=DOT_PRECISION)
        b_P += tl.dot(left_q, tl.trans(right), input_precision=DOT_PRECISION)
    else:
        # Strong gates: every pair's exponent is formed exactly, one key row r at a time.
        for r in range(64):
            pick = (rows == r)[:, None]
            k_r = tl.sum(tl.where(pick, b_k, 0.0), 0)
            G_r = tl.sum(tl.where(pick, b_G, 0.0), 0)
            decayed = k_r[None, :] * tl.exp2(tl.where((rows >= r)[:, None], b_G - G_r[None, :], float("-inf")))
            column = (rows == r)[None, :]
            b_A = tl.where(column, b_A + tl.sum(b_k * decayed, 1)[:, None], b_A)
            b_P = tl.where(column, b_P + tl.sum(b_q * decayed, 1)[:, None], b_P)
    return b_A, b_P


@triton.jit
def _unit_lower_inverse_16(b_A, DOT_PRECISION: tl.constexpr):
    """(I + A)^-1 for four strictly lower triangular 16 x 16 matrices A ([4, 16, 16]), from their 4 x 4 diagonal
    blocks: those inverted by forward substitution (3 rows), then the block series."""
    o16 = tl.arange(0, 16)
    o4 = tl.arange(0, 4)
    same = o4[:, None, None, None] == o4[None, None, :, None]  # [4, 1, 4, 1]: diagonal block pairs
    diagonal = tl.reshape(tl.sum(tl.where(same[None], tl.reshape(b_A, [4, 4, 4, 4, 4]), 0.0), 3), [16, 4, 4])
    eye = tl.where(o4[:, None] == o4[None, :], 1.0, 0.0)
    b_T = tl.zeros([16, 4, 4], dtype=tl.float32) + eye[None, :, :]
    for r in range(1, 4):
        pick = (o4 == r)[None, :, None]
        a_r = tl.sum(tl.where(pick, diagonal, 0.0), 1)  # row r of every block's A
        b_T = tl.where(pick, b_T - tl.sum(a_r[:, :, None] * b_T, 1)[:, None, :], b_T)
    b_Binv = tl.reshape(tl.where(same[None], tl.reshape(b_T, [4, 4, 4, 1, 4]), 0.0), [4, 16, 16])
    below = (o16 // 4)[:, None] > (o16 // 4)[None, :]
    return _block_series(b_Binv, tl.where(below[None], b_A, 0.0), tl.where(o16[:, None] == o16[None, :], 1.0, 0.0),
                         DOT_PRECISION)


@triton.jit
def _block_series(b_Binv, b_below, identity, DOT_PRECISION: tl.constexpr):
    """(I + A)^-1 = (I - M + M^2 - M^3) B^-1 for I + A = B (I + M): ``b_Binv`` is B^-1, the inverse of A's 4
    diagonal blocks; ``b_below`` the part of A below them; ``identity`` the identity of the tiles' shape;
    M = B^-1 below, and M^4 = 0 (strictly block-lower, 4 blocks). Horner form, (I - M (I - M (I - M))) B^-1, keeps
    three tiles live instead of five."""
    b_M = tl.dot(b_Binv, b_below, input_precision=DOT_PRECISION)
    b_series = identity - b_M
    b_series = identity - tl.dot(b_M, b_series, input_precision=DOT_PRECISION)
    b_series = identity - tl.dot(b_M, b_series, input_precision=DOT_PRECISION)
    return tl.dot(b_series, b_Binv, input_precision=DOT_PRECISION)


@triton.jit
def _unit_lower_inverse(b_A, DOT_PRECISION: tl.constexpr):
    """(I + A)^-1 for a strictly lower triangular 64 x 64 A, in two levels of the block series: the four 16 x 16
    diagonal blocks are inverted from their own 4 x 4 diagonal blocks (batched 16 x 16 products), then the 64 x 64
    series. Forward substitution touches only 4 x 4 blocks: run over the 16 rows of each 16 x 16 block it took a
    quarter of the GDN stage-1 kernel (H200, 16k tokens: the two levels made that kernel 1.29x faster and KDA's
    scores step 1.39x, with the same errors)."""
    rows = tl.arange(0, 64)
    blocks = tl.arange(0, 4)
    same = blocks[:, None, None, None] == blocks[None, None, :, None]  # [4, 1, 4, 1]: diagonal block pairs
    diagonal = tl.sum(tl.where(same, tl.reshape(b_A, [4, 16, 4, 16]), 0.0), 2)  # [4, 16, 16]
    b_T = _unit_lower_inverse_16(diagonal, DOT_PRECISION)
    b_Binv = tl.reshape(tl.where(same, b_T[:, :, None, :], 0.0), [64, 64])
    block = rows // 16
    return _block_series(b_Binv, tl.where(block[:, None] > block[None, :], b_A, 0.0),
                         tl.where(rows[:, None] == rows[None, :], 1.0, 0.0), DOT_PRECISION)


@triton.jit
def _chunk_scores(
    q, k, g, beta, p, gamma, row_scale, token, row_ok, i_chunk, h, hv, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr,
    PER_CHANNEL: tl.constexpr, L2NORM: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    """Form A and P over blocks of key channels, store P, and return T = (I + A)^-1 and the rows' beta and q and
    k l2 norms (ones without the norm). Per-head gate: also stores gamma and the rows' scales for kernel 2,
    scale q_norm 2^G (q's) and k_norm 2^(G_end - G) (k's)."""
    rows = tl.arange(0, 64)
    qk_rows = (token * H + h) * K
    gate_rows = (token * HV + hv) * K
    b_beta = tl.load(beta + token * HV + hv, mask=row_ok, other=0.0).to(tl.float32)
    # A and P on raw q and k; the l2 norms are row/column scalings applied afterwards.
    b_A = tl.zeros([64, 64], dtype=tl.float32)
    b_P = tl.zeros([64, 64], dtype=tl.float32)
    k_square = tl.zeros([64], dtype=tl.float32)
    q_square = tl.zeros([64], dtype=tl.float32)
    for k0 in tl.static_range(0, BK, KB):
        cols = k0 + tl.arange(0, KB)
        mask = row_ok[:, None] & (cols < K)[None, :]
        b_k = tl.load(k + qk_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        b_q = tl.load(q + qk_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        if L2NORM:
            k_square += tl.sum(b_k.to(tl.float32) * b_k.to(tl.float32), 1)
            q_square += tl.sum(b_q.to(tl.float32) * b_q.to(tl.float32), 1)
        if PER_CHANNEL:
            b_g = tl.load(g + gate_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            b_A, b_P = _gated_scores(b_q.to(tl.float32), b_k.to(tl.float32), tl.cumsum(b_g * LOG2_E, 0), b_A, b_P,
                                     DOT_PRECISION, ROUND_TF32)
        elif NATIVE_DOT:
            # 16-bit operands: their products are exact in the fp32 accumulator, at twice tf32's rate.
            b_A += tl.dot(b_k, tl.trans(b_k))
            b_P += tl.dot(b_q, tl.trans(b_k))
        else:
            b_A += tl.dot(b_k.to(tl.float32), tl.trans(b_k.to(tl.float32)), input_precision=DOT_PRECISION)
            b_P += tl.dot(b_q.to(tl.float32), tl.trans(b_k.to(tl.float32)), input_precision=DOT_PRECISION)

    lower = rows[:, None] >= rows[None, :]
    if L2NORM:
        k_norm = tl.rsqrt(k_square + 1e-6)
        q_norm = tl.rsqrt(q_square + 1e-6)
        b_A = b_A * k_norm[:, None] * k_norm[None, :]
        b_P = b_P * q_norm[:, None] * k_norm[None, :]
    else:
        k_norm = tl.full([64], 1.0, dtype=tl.float32)
        q_norm = k_norm
    if PER_CHANNEL:
        b_G = tl.zeros([64], dtype=tl.float32)  # per-channel gates: the apply step's key blocks form them
    else:
        b_G, G_end = _head_gates(g, token, row_ok, hv, HV)
        decay = tl.exp2(tl.where(lower, b_G[:, None] - b_G[None, :], float("-inf")))
        b_A = b_A * decay
        b_P = b_P * decay
        tl.store(gamma + i_chunk * HV + hv, tl.exp2(G_end))
        scale_rows = (token * HV + hv) * 2
        tl.store(row_scale + scale_rows, scale * q_norm * tl.exp2(b_G), mask=row_ok)
        tl.store(row_scale + scale_rows + 1, k_norm * tl.exp2(G_end - b_G), mask=row_ok)
    b_P = tl.where(lower, b_P, 0.0) * scale
    if ROUND_TF32:
        b_P = _round_to_tf32(b_P)  # a product operand in kernel 2
    tl.store(p + (token * HV + hv)[:, None] * 64 + rows[None, :], b_P, mask=row_ok[:, None])
    b_T = _unit_lower_inverse(tl.where(rows[:, None] > rows[None, :], b_A, 0.0) * b_beta[:, None], DOT_PRECISION)
    if ROUND_TF32:
        b_T = _round_to_tf32(b_T)
    return b_T, b_beta, q_norm, k_norm, b_G


@triton.jit
def _apply_to_keys(
    q, k, g, w, qg, kd, gamma, b_T, b_beta, q_norm, k_norm, b_G, token, row_ok, i_chunk, h, hv, k0, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, KB: tl.constexpr,
    PER_CHANNEL: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """One block of key channels: W = T Diag(beta) (2^G * K); per-channel gate also Qg, Kd and gamma (b_G: the per-head
    gate's cumulative log2 gate, unused for per-channel gates)."""
    cols = k0 + tl.arange(0, KB)
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    qk_offsets = ((token * H + h) * K)[:, None] + cols[None, :]
    offsets = (token * HV + hv)[:, None] * K + cols[None, :]
    b_k = tl.load(k + qk_offsets, mask=mask, other=0.0).to(tl.float32) * k_norm[:, None]
    if PER_CHANNEL:
        b_q = tl.load(q + qk_offsets, mask=mask, other=0.0).to(tl.float32) * q_norm[:, None]
        b_g = tl.load(g + offsets, mask=mask, other=0.0).to(tl.float32) * LOG2_E
        G_block = tl.cumsum(b_g, 0)
        G_block_end = tl.sum(b_g, 0)
        into = tl.exp2(G_block)  # decay from the chunk start to each row
        tl.store(qg + offsets, (b_q * into * scale).to(qg.dtype.element_ty), mask=mask)
        tl.store(kd + offsets, (b_k * tl.exp2(G_block_end[None, :] - G_block)).to(kd.dtype.element_ty), mask=mask)
        tl.store(gamma + (i_chunk * HV + hv) * K + cols, tl.exp2(G_block_end), mask=col_ok)
    else:
        into = tl.exp2(b_G)[:, None]
    b_decayed = b_k * into * b_beta[:, None]
    if ROUND_TF32:
        b_decayed = _round_to_tf32(b_decayed)
    b_w = tl.dot(b_T, b_decayed, input_precision=DOT_PRECISION)
    tl.store(w + offsets, b_w.to(w.dtype.element_ty), mask=mask)


@triton.jit
def _apply_to_values(v, u, b_T, b_beta, token, row_ok, hv, v0, HV: tl.constexpr, V: tl.constexpr, VB: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    """One block of value channels: U = T Diag(beta) V."""
    cols = v0 + tl.arange(0, VB)
    mask = row_ok[:, None] & (cols < V)[None, :]
    offsets = (token * HV + hv)[:, None] * V + cols[None, :]
    b_v = tl.load(v + offsets, mask=mask, other=0.0).to(tl.float32) * b_beta[:, None]
    if ROUND_TF32:
        b_v = _round_to_tf32(b_v)
    tl.store(u + offsets, tl.dot(b_T, b_v, input_precision=DOT_PRECISION), mask=mask)


@triton.jit(do_not_specialize=["chunk_bucket"])
def _chunk_intra_kernel(
    q, k, v, g, beta, w, u, qg, kd, p, gamma, row_scale, cu_seqlens, chunk_indices, scale, T, chunk_bucket,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
    PER_CHANNEL: tl.constexpr, L2NORM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    """Stage 1, scores and apply steps in one program per chunk and value head."""
    i_chunk, hv, h, token, row_ok = _chunk_rows(cu_seqlens, chunk_indices, T, H, HV, IS_VARLEN)
    b_T, b_beta, q_norm, k_norm, b_G = _chunk_scores(
        q, k, g, beta, p, gamma, row_scale, token, row_ok, i_chunk, h, hv, scale, H, HV, K, BK, KB,
        PER_CHANNEL, L2NORM, DOT_PRECISION, ROUND_TF32, NATIVE_DOT)
    for k0 in tl.static_range(0, BK, KB):
        _apply_to_keys(q, k, g, w, qg, kd, gamma, b_T, b_beta, q_norm, k_norm, b_G, token, row_ok, i_chunk, h, hv,
                       k0, scale, H, HV, K, KB, PER_CHANNEL, DOT_PRECISION, ROUND_TF32)
    for v0 in tl.static_range(0, BV, VB):
        _apply_to_values(v, u, b_T, b_beta, token, row_ok, hv, v0, HV, V, VB, DOT_PRECISION, ROUND_TF32)


@triton.jit(do_not_specialize=["chunk_bucket"])
def _chunk_scores_kernel(
    q, k, g, beta, p, gamma, row_scale, t_matrix, norms, cu_seqlens, chunk_indices, scale, T, chunk_bucket,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr,
    PER_CHANNEL: tl.constexpr, L2NORM: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    """Stage 1, scores step: A, P and T per chunk and value head; stores T and the rows' l2 norms for the apply step."""
    i_chunk, hv, h, token, row_ok = _chunk_rows(cu_seqlens, chunk_indices, T, H, HV, IS_VARLEN)
    rows = tl.arange(0, 64)
    b_T, _, q_norm, k_norm, _ = _chunk_scores(
        q, k, g, beta, p, gamma, row_scale, token, row_ok, i_chunk, h, hv, scale, H, HV, K, BK, KB,
        PER_CHANNEL, L2NORM, DOT_PRECISION, ROUND_TF32, NATIVE_DOT)
    base = token * HV + hv
    tl.store(t_matrix + base[:, None] * 64 + rows[None, :], b_T, mask=row_ok[:, None])
    tl.store(norms + base * 2, q_norm, mask=row_ok)
    tl.store(norms + base * 2 + 1, k_norm, mask=row_ok)


@triton.jit(do_not_specialize=["chunk_bucket"])
def _chunk_apply_kernel(
    q, k, v, g, beta, w, u, qg, kd, gamma, t_matrix, norms, cu_seqlens, chunk_indices, scale, T, chunk_bucket,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
    PER_CHANNEL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """Stage 1, apply step: one block of key channels (W, Qg, Kd, gamma) or of value channels (U) per program."""
    i_chunk, hv, h, token, row_ok = _chunk_rows(cu_seqlens, chunk_indices, T, H, HV, IS_VARLEN)
    i_block = tl.program_id(2)
    rows = tl.arange(0, 64)
    base = token * HV + hv
    b_T = tl.load(t_matrix + base[:, None] * 64 + rows[None, :], mask=row_ok[:, None], other=0.0)
    b_beta = tl.load(beta + base, mask=row_ok, other=0.0).to(tl.float32)
    key_blocks = tl.cdiv(K, KB)
    if i_block < key_blocks:
        q_norm = tl.load(norms + base * 2, mask=row_ok, other=0.0)
        k_norm = tl.load(norms + base * 2 + 1, mask=row_ok, other=0.0)
        if PER_CHANNEL:
            b_G = tl.zeros([64], dtype=tl.float32)
        else:
            b_G, _ = _head_gates(g, token, row_ok, hv, HV)
        _apply_to_keys(q, k, g, w, qg, kd, gamma, b_T, b_beta, q_norm, k_norm, b_G, token, row_ok, i_chunk, h, hv,
                       i_block * KB, scale, H, HV, K, KB, PER_CHANNEL, DOT_PRECISION, ROUND_TF32)
    else:
        _apply_to_values(v, u, b_T, b_beta, token, row_ok, hv, (i_block - key_blocks) * VB, HV, V, VB,
                         DOT_PRECISION, ROUND_TF32)


@triton.jit
def _chunk_output(
    q, qg, p, q_scale, b_S_in, b_new, chunk_start, row_ok, h, hv, cols_k, k_ok,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, PER_CHANNEL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SIXTEEN_BIT_PRODUCTS: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """One chunk's outputs from its starting state and new values: O = Qg S + P V' (fp32, [64, value block]).
    ``chunk_start``: the chunk's first token (int64); offsets within the chunk stay int32 (see the state kernel).
    V' is rounded to tf32 here, for this product only (P is tf32-exact from kernel 1), off the state's chain.
    ``q_scale``: with a per-head gate, the rows' q scales ([64]; unused with a per-channel gate)."""
    rows = tl.arange(0, 64)
    row0 = chunk_start * HV + hv
    mask_k = row_ok[:, None] & k_ok[None, :]
    if PER_CHANNEL:
        b_qg = tl.load(qg + row0 * K + rows[:, None] * (HV * K) + cols_k[None, :], mask=mask_k, other=0.0)
    else:
        # Per-head gate: Qg is q with one scale per row, applied after the product.
        b_qg = tl.load(q + (chunk_start * H + h) * K + rows[:, None] * (H * K) + cols_k[None, :], mask=mask_k,
                       other=0.0)
    if not SIXTEEN_BIT_PRODUCTS:
        b_qg = b_qg.to(tl.float32)
    b_o = tl.dot(b_qg, b_S_in, input_precision=DOT_PRECISION)
    if not PER_CHANNEL:
        b_o = b_o * q_scale[:, None]
    b_p = tl.load(p + row0 * 64 + rows[:, None] * (HV * 64) + rows[None, :], mask=row_ok[:, None], other=0.0)
    if ROUND_TF32:
        b_new = _round_to_tf32(b_new)
    return b_o + tl.dot(b_p, b_new, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=["chunk_bucket", "sequence_bucket"])
def _chunk_state_kernel(
    q, k, w, u, qg, kd, p, gamma, row_scale, o, new_values, chunk_states, h0, ht, cu_seqlens, chunk_offsets, T,
    chunk_bucket, sequence_bucket,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr, IS_VARLEN: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr, SIXTEEN_BIT_PRODUCTS: tl.constexpr,
    ROUND_TF32: tl.constexpr, SEQUENTIAL_OUTPUTS: tl.constexpr,
):
    """Stage 2: the chunks of one sequence in order, for one value head and block of value channels.

    With SEQUENTIAL_OUTPUTS it writes each chunk's outputs as it goes; without, it stores each chunk's starting state
    (in the dtype the output product reads it in) and new values V' for ``_chunk_output_kernel``."""
    # The value blocks of a head are neighbours in launch order, so that they read each chunk's W and Kd tiles at
    # about the same time, from L2 (H200, GDN 64k tokens: the state-only pass 1.07-1.2x faster than head-major).
    value_blocks: tl.constexpr = (V + BV - 1) // BV
    i_seq_head = tl.program_id(0) // value_blocks
    i_v = tl.program_id(0) % value_blocks
    i_seq = i_seq_head // HV
    hv = i_seq_head % HV
    h = hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_seq).to(tl.int64)
        eos = tl.load(cu_seqlens + i_seq + 1).to(tl.int64)
        first_chunk = tl.load(chunk_offsets + i_seq).to(tl.int64)
    else:
        bos = i_seq.to(tl.int64) * T
        eos = bos + T
        first_chunk = i_seq.to(tl.int64) * tl.cdiv(T, 64)
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

    # Each chunk's decay is loaded one chunk ahead: a tiny load the software pipeline does not take, which would
    # otherwise wait on every chunk's chain.
    # (Nothing is loaded for an empty sequence; the vector mask is written as a comparison of vectors because
    # Triton's interpreter rejects a vector mask and-ed with a scalar condition.)
    if PER_CHANNEL:
        next_gamma = tl.load(gamma + (first_chunk * HV + hv) * K + cols_k, mask=k_ok & (cols_k < K * n_chunks),
                             other=0.0)
    else:
        next_gamma = tl.load(gamma + first_chunk * HV + hv, mask=n_chunks > 0, other=0.0)
    pair = tl.arange(0, 2)
    # 64-bit arithmetic once per chunk (a scalar pointer to its first row), int32 offsets within the chunk's tiles:
    # int64 offsets per element spilled registers (sm_90 compile, Triton 3.9, 4 warps, 32 value channels, 16-bit:
    # stack 496 bytes instead of 64 for the sequential-outputs pass, 240 instead of 24 for the state-only one).
    for i_c in range(n_chunks):
        chunk_start = bos + i_c * 64
        next_chunk = tl.minimum(i_c + 1, n_chunks - 1)  # the last chunk loads its own decay again (unused)
        row_ok = rows < eos - chunk_start
        row0 = chunk_start * HV + hv
        mask_k = row_ok[:, None] & k_ok[None, :]
        mask_v = row_ok[:, None] & v_ok[None, :]
        key_tile = rows[:, None] * (HV * K) + cols_k[None, :]
        value_tile = rows[:, None] * (HV * V) + cols_v[None, :]
        b_w = tl.load(w + row0 * K + key_tile, mask=mask_k, other=0.0)
        # Kd is loaded transposed ([key channel, row]), the layout its product takes, rather than transposed in
        # registers.
        if PER_CHANNEL:
            b_kd_t = tl.load(kd + row0 * K + cols_k[:, None] + rows[None, :] * (HV * K),
                             mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            b_gamma = next_gamma[:, None]
            next_gamma = tl.load(gamma + ((first_chunk + next_chunk) * HV + hv) * K + cols_k, mask=k_ok, other=0.0)
            q_scale = 0.0
        else:
            # Per-head gate: Kd is k with one scale per row, applied to V' before the product.
            b_kd_t = tl.load(k + (chunk_start * H + h) * K + cols_k[:, None] + rows[None, :] * (H * K),
                             mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            # q and k scales of a row are adjacent: one [64, 2] load (pipelined) rather than two strided ones.
            q_scale, k_scale = tl.split(tl.load(row_scale + row0 * 2 + rows[:, None] * (HV * 2) + pair[None, :],
                                                mask=row_ok[:, None], other=0.0))
            b_gamma = next_gamma
            next_gamma = tl.load(gamma + (first_chunk + next_chunk) * HV + hv)
        b_u = tl.load(u + row0 * V + value_tile, mask=mask_v, other=0.0)
        if SIXTEEN_BIT_PRODUCTS:
            # S meets W and Qg in their 16-bit storage dtype: as accurate as the stored W, twice tf32's speed.
            b_S_in = b_S.to(b_w.dtype)
        else:
            b_w = b_w.to(tl.float32)
            b_S_in = b_S
        b_new = b_u - tl.dot(b_w, b_S_in, input_precision=DOT_PRECISION)
        if SEQUENTIAL_OUTPUTS:
            b_o = _chunk_output(q, qg, p, q_scale, b_S_in, b_new, chunk_start, row_ok, h, hv, cols_k, k_ok, H, HV,
                                K, PER_CHANNEL, DOT_PRECISION, SIXTEEN_BIT_PRODUCTS, ROUND_TF32)
            tl.store(o + row0 * V + value_tile, b_o.to(o.dtype.element_ty), mask=mask_v)
        else:
            chunk_state = chunk_states + ((first_chunk + i_c) * HV + hv) * K * V
            tl.store(chunk_state + cols_k[:, None] * V + cols_v[None, :], b_S_in.to(chunk_states.dtype.element_ty),
                     mask=state_mask)
            tl.store(new_values + row0 * V + value_tile, b_new, mask=mask_v)
        b_update = b_new if PER_CHANNEL else b_new * k_scale[:, None]
        if SIXTEEN_BIT_PRODUCTS and BK == 128:
            # Kd is 16-bit: the update enters as its 16-bit rounding plus the rounding's remainder, two 16-bit
            # products that keep 16 mantissa bits of it (tf32 keeps 11) on Kd as stored, where one tf32 product
            # needed an fp32 copy of Kd (H200, 16k tokens: this pass 1.2-1.3x faster). Only for 128 key channels:
            # with 64 or 256, Triton 3.6 on the H200 compiled it, for some launch shapes, into a kernel that
            # faulted (illegal memory access) or wrote wrong outputs. At 128 the GPU tests run every launch shape of
            # both gate kinds' sequential and state-only passes (test_launch_configs.py).
            b_high = b_update.to(b_kd_t.dtype)
            b_low = (b_update - b_high.to(tl.float32)).to(b_kd_t.dtype)
            b_S = b_S * b_gamma + tl.dot(b_kd_t, b_high) + tl.dot(b_kd_t, b_low)
        else:
            if ROUND_TF32:
                b_update = _round_to_tf32(b_update)  # Kd (16-bit) is tf32-exact already
            b_S = b_S * b_gamma + tl.dot(b_kd_t.to(tl.float32), b_update, input_precision=DOT_PRECISION)

    if STORE_FINAL_STATE:
        tl.store(ht + state_offset, b_S, mask=state_mask)


@triton.jit(do_not_specialize=["chunk_bucket"])
def _chunk_output_kernel(
    q, qg, p, row_scale, new_values, chunk_states, o, cu_seqlens, chunk_indices, T, chunk_bucket,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SIXTEEN_BIT_PRODUCTS: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """Stage 3 (parallel outputs): one chunk, value head and block of value channels per program."""
    i_chunk = tl.program_id(0)
    hv = tl.program_id(1)
    h = hv // (HV // H)
    chunk_start, eos = _chunk_bounds(i_chunk, cu_seqlens, chunk_indices, T, IS_VARLEN)
    rows = tl.arange(0, 64)
    row_ok = rows < eos - chunk_start
    cols_k = tl.arange(0, BK)
    cols_v = tl.program_id(2) * BV + tl.arange(0, BV)
    k_ok = cols_k < K
    v_ok = cols_v < V
    mask_v = row_ok[:, None] & v_ok[None, :]
    chunk_state = chunk_states + (i_chunk.to(tl.int64) * HV + hv) * K * V
    b_S_in = tl.load(chunk_state + cols_k[:, None] * V + cols_v[None, :], mask=k_ok[:, None] & v_ok[None, :],
                     other=0.0)
    row0 = chunk_start * HV + hv
    value_tile = rows[:, None] * (HV * V) + cols_v[None, :]
    b_new = tl.load(new_values + row0 * V + value_tile, mask=mask_v, other=0.0)
    q_scale = 0.0
    if not PER_CHANNEL:
        q_scale = tl.load(row_scale + row0 * 2 + rows * (HV * 2), mask=row_ok, other=0.0)
    b_o = _chunk_output(q, qg, p, q_scale, b_S_in, b_new, chunk_start, row_ok, h, hv, cols_k, k_ok, H, HV, K,
                        PER_CHANNEL, DOT_PRECISION, SIXTEEN_BIT_PRODUCTS, ROUND_TF32)
    tl.store(o + row0 * V + value_tile, b_o.to(o.dtype.element_ty), mask=mask_v)


# The kernels as launched: each tuned over its space (see TUNE_FROM_CHUNKS); the sequential-outputs state pass once
# per gate kind, whose spaces start from different measured defaults.
_state_key = _tuning_key("H", "HV", "K", "V", "PER_CHANNEL", "IS_VARLEN", "USE_INITIAL_STATE", "STORE_FINAL_STATE",
                         "SIXTEEN_BIT_PRODUCTS", "SEQUENTIAL_OUTPUTS", "sequence_bucket")
_scores_launch = _autotuned(
    SCORES_CONFIGS, _tuning_key("H", "HV", "K", "PER_CHANNEL", "L2NORM", "IS_VARLEN", "NATIVE_DOT"), _fit_blocks,
)(_chunk_scores_kernel)
_apply_launch = _autotuned(
    APPLY_CONFIGS, _tuning_key("H", "HV", "K", "V", "PER_CHANNEL", "IS_VARLEN"), _fit_blocks,
)(_chunk_apply_kernel)
_intra_launch = _autotuned(
    INTRA_CONFIGS, _tuning_key("H", "HV", "K", "V", "PER_CHANNEL", "L2NORM", "IS_VARLEN", "NATIVE_DOT"), _fit_blocks,
)(_chunk_intra_kernel)
_state_launch = {
    per_channel: _autotuned(STATE_CONFIGS[per_channel], _state_key, _fit_state)(_chunk_state_kernel)
    for per_channel in (True, False)
}
_state_only_launch = _autotuned(STATE_ONLY_CONFIGS, _state_key, _fit_state)(_chunk_state_kernel)
_output_launch = _autotuned(
    OUTPUT_CONFIGS, _tuning_key("H", "HV", "K", "V", "PER_CHANNEL", "IS_VARLEN", "SIXTEEN_BIT_PRODUCTS"), _fit_blocks,
)(_chunk_output_kernel)

# Chosen stage-2 variant per tuning key (see ``_chosen_variant``).
_variant_choices: dict[tuple, str] = {}


def tuned_launches() -> dict[str, dict[str, str]]:
    """The config each launcher chose and the variant chosen, per tuning key seen in this process (for benchmark
    logs)."""
    launchers = {"kda_scores": _scores_launch, "kda_apply": _apply_launch, "gdn_intra": _intra_launch,
                 "kda_state": _state_launch[True], "gdn_state": _state_launch[False],
                 "state_only": _state_only_launch, "output": _output_launch}
    launches = {name: {str(key): str(config) for key, config in launcher.cache.items()}
                for name, launcher in launchers.items()}
    launches["variant"] = {str(key): variant for key, variant in _variant_choices.items()}
    return launches


def _chosen_variant(key: tuple, chunk_bucket: int, finish: Callable[[str], None]) -> str:
    """The stage-2 variant for a launch: for a prefill of at least TUNE_FROM_CHUNKS chunks on a GPU, the faster of
    the two on the first launch of its ``key`` (each timed over the same stage-1 results, its own launch shapes tuned
    first); DEFAULT_VARIANT for shorter prefills and under the interpreter, which cannot time."""
    if interpreting() or chunk_bucket < TUNE_FROM_CHUNKS:
        return DEFAULT_VARIANT
    if key not in _variant_choices:
        milliseconds = {variant: do_bench(lambda: finish(variant)) for variant in PREFILL_VARIANTS}
        _variant_choices[key] = min(milliseconds, key=milliseconds.get)
    return _variant_choices[key]


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
    variant: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the chunk kernels; inputs were validated by the public op. ``variant`` forces one of PREFILL_VARIANTS
    (benchmarks and tests); None takes the one chosen for the launch's shape (``_chosen_variant``)."""
    if variant is not None and variant not in PREFILL_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(PREFILL_VARIANTS)} or None (chosen per shape), "
                         f"got {variant!r}")
    batch, length, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    total = batch * length
    device = q.device
    # Flatten the batch into one token axis: an equal-length batch is B sequences of ``length`` tokens.
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    if cu_seqlens is None:
        sequences = batch
        n_chunks = batch * triton.cdiv(length, CHUNK_SIZE)
        cu = chunk_indices = chunk_offsets = None
    else:
        cu_cpu = cu_seqlens.to("cpu", torch.int64)
        lengths = cu_cpu[1:] - cu_cpu[:-1]
        sequences = lengths.numel()
        chunk_counts = (lengths + CHUNK_SIZE - 1) // CHUNK_SIZE
        offsets = torch.zeros(sequences + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(chunk_counts, 0)
        n_chunks = int(offsets[-1])
        chunk_seq = torch.repeat_interleave(torch.arange(sequences), chunk_counts)
        chunk_in_seq = torch.arange(n_chunks) - torch.repeat_interleave(offsets[:-1], chunk_counts)
        chunk_indices = torch.stack([chunk_seq, chunk_in_seq], 1).to(device=device, dtype=torch.int32)
        chunk_offsets = offsets.to(device=device, dtype=torch.int32)
        cu = cu_seqlens.to(device=device, dtype=torch.int32)

    sixteen_bit = q.dtype in (torch.bfloat16, torch.float16)
    # W, Qg, Kd in the input dtype for 16-bit inputs (see the module docstring); U and P always fp32.
    store_dtype = q.dtype if sixteen_bit else torch.float32
    dot_precision = "tf32" if sixteen_bit else "tf32x3"
    # The Triton CPU interpreter mis-multiplies 16-bit dot operands: under it every product runs in fp32.
    sixteen_bit_products = sixteen_bit and not interpreting()
    block_k = max(16, triton.next_power_of_2(key_dim))
    block_v = max(16, triton.next_power_of_2(value_dim))
    float32 = {"dtype": torch.float32, "device": device}
    w = torch.empty(total, value_heads, key_dim, dtype=store_dtype, device=device)
    # Per-head gate: kernel 2 reads q and k with one scale per row (row_scale) instead of Qg and Kd.
    qg = torch.empty_like(w) if per_channel else w
    kd = torch.empty_like(w) if per_channel else w
    row_scale = w if per_channel else torch.empty(total, value_heads, 2, **float32)
    u = torch.empty(total, value_heads, value_dim, **float32)
    p = torch.empty(total, value_heads, CHUNK_SIZE, **float32)
    gamma = torch.empty(max(n_chunks, 1), value_heads, key_dim if per_channel else 1, **float32)
    out = torch.empty(batch, length, value_heads, value_dim, dtype=q.dtype, device=device)
    final_state = (
        torch.empty(sequences, value_heads, key_dim, value_dim, **float32) if output_final_state else None
    )
    is_varlen = cu_seqlens is not None
    buckets = {"chunk_bucket": triton.next_power_of_2(max(n_chunks, 1))}
    if n_chunks > 0:
        shapes = {"H": heads, "HV": value_heads, "K": key_dim}
        flags = {"PER_CHANNEL": per_channel, "IS_VARLEN": is_varlen, "DOT_PRECISION": dot_precision,
                 "ROUND_TF32": sixteen_bit}
        scores = {"BK": block_k, "L2NORM": use_qk_l2norm_in_kernel, "NATIVE_DOT": sixteen_bit_products}
        if per_channel:
            t_matrix = torch.empty(total, value_heads, CHUNK_SIZE, **float32)
            norms = torch.empty(total, value_heads, 2, **float32)
            _scores_launch[(n_chunks, value_heads)](
                q, k, g, beta, p, gamma, row_scale, t_matrix, norms, cu, chunk_indices, scale, length,
                **buckets, **shapes, **flags, **scores)
            _apply_launch[lambda meta: (n_chunks, value_heads,
                                        triton.cdiv(key_dim, meta["KB"]) + triton.cdiv(value_dim, meta["VB"]))](
                q, k, v, g, beta, w, u, qg, kd, gamma, t_matrix, norms, cu, chunk_indices, scale, length,
                **buckets, **shapes, V=value_dim, **flags)
        else:
            _intra_launch[(n_chunks, value_heads)](
                q, k, v, g, beta, w, u, qg, kd, p, gamma, row_scale, cu, chunk_indices, scale, length,
                **buckets, **shapes, V=value_dim, BV=block_v, **flags, **scores)

    state_shapes = {"H": heads, "HV": value_heads, "K": key_dim, "V": value_dim, "BK": block_k}
    products = {"PER_CHANNEL": per_channel, "IS_VARLEN": is_varlen, "DOT_PRECISION": dot_precision,
                "SIXTEEN_BIT_PRODUCTS": sixteen_bit_products}
    state_flags = {**products, "USE_INITIAL_STATE": initial_state is not None,
                   "STORE_FINAL_STATE": output_final_state, "ROUND_TF32": sixteen_bit}
    sequence_bucket = triton.next_power_of_2(sequences)

    def finish(chosen: str) -> None:
        """Stage 2 (and 3) of ``chosen`` over stage 1's results: writes ``out`` and ``final_state``."""

        def state_grid(meta: dict) -> tuple[int]:
            return (sequences * value_heads * triton.cdiv(value_dim, meta["BV"]),)

        if chosen == "sequential_outputs":
            _state_launch[per_channel][state_grid](
                q, k, w, u, qg, kd, p, gamma, row_scale, out, None, None, initial_state, final_state, cu,
                chunk_offsets, length, **buckets, sequence_bucket=sequence_bucket, **state_shapes, **state_flags,
                SEQUENTIAL_OUTPUTS=True)
            return
        # Each chunk's starting state in the dtype the output product reads it in (16-bit when the products are):
        # the same operand the sequential pass multiplies, at half the bytes of fp32. V' stays fp32, like U.
        states_dtype = store_dtype if sixteen_bit_products else torch.float32
        chunk_states = torch.empty(max(n_chunks, 1), value_heads, key_dim, value_dim, dtype=states_dtype,
                                   device=device)
        new_values = torch.empty_like(u)
        _state_only_launch[state_grid](
            q, k, w, u, qg, kd, p, gamma, row_scale, out, new_values, chunk_states, initial_state, final_state, cu,
            chunk_offsets, length, **buckets, sequence_bucket=sequence_bucket, **state_shapes, **state_flags,
            SEQUENTIAL_OUTPUTS=False)
        if n_chunks > 0:
            _output_launch[lambda meta: (n_chunks, value_heads, triton.cdiv(value_dim, meta["BV"]))](
                q, qg, p, row_scale, new_values, chunk_states, out, cu, chunk_indices, length, **buckets,
                **state_shapes, **products, ROUND_TF32=sixteen_bit)

    if variant is None:
        key = (*state_shapes.values(), q.dtype, *state_flags.values(), buckets["chunk_bucket"], sequence_bucket)
        variant = _chosen_variant(key, buckets["chunk_bucket"], finish)
    finish(variant)
    return out, final_state

"""Triton attention-score kernel against the torch reference."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="needs triton installed (pip install 'dynts[triton]')")

from kernel_cases import pick  # noqa: E402

from dynts.kernels import REDUCTIONS, attention_scores, kernels_in_mode, use_triton  # noqa: E402
from dynts.kernels.attention_score_kernel import attention_scores_triton  # noqa: E402
from dynts.kernels.reference import attention_scores_reference  # noqa: E402


def make_inputs(device, *, batch, kv_heads, group, window, slots, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, kv_heads * group, window, dim, generator=generator).to(device=device, dtype=dtype)
    keys = torch.randn(batch, kv_heads, slots, dim, generator=generator).to(device=device, dtype=dtype)
    return queries, keys


def check(queries, keys, key_len, query_count, **options):
    """Kernel vs reference on the same inputs; the kernel's output buffer is poisoned first (allocator reuse)."""
    batch, kv_heads, slots = keys.shape[0], keys.shape[1], keys.shape[2]
    poison = torch.full((batch * kv_heads * 4 * slots,), float("nan"), device=keys.device)
    del poison
    scale = 1 / math.sqrt(queries.shape[-1])
    got = attention_scores_triton(queries, keys, key_len, scale=scale, query_count=query_count, **options)
    for knob in ("key_chunk", "block_keys", "num_warps"):  # tuning knobs of the kernel only
        options.pop(knob, None)
    want = attention_scores_reference(queries, keys, key_len, scale=scale, query_count=query_count, **options)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    past_end = torch.arange(slots, device=keys.device).view(1, 1, -1) >= key_len.view(-1, 1, 1)
    assert torch.all(got.masked_select(past_end) == 0)
    return got


def lengths(device, window, key_len):
    """key_len per row and a ragged query_count (second row: fewer real queries than the window)."""
    key_len = torch.tensor(key_len, device=device)
    query_count = torch.tensor([window, max(1, min(window - 3, int(key_len[1])))], device=device)
    return key_len, query_count


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("window", [1, 7, 64])
def test_scores_match_reference(device, group, dim, window):
    batch, kv_heads, slots, key_len = pick(device, (2, 2, 70, [70, 45]), (2, 8, 5000, [5000, 3001]))
    queries, keys = make_inputs(device, batch=batch, kv_heads=kv_heads, group=group, window=window, slots=slots,
                                dim=dim, dtype=torch.bfloat16)
    check(queries, keys, *lengths(device, window, key_len))


@pytest.mark.parametrize("reduce_queries", REDUCTIONS)
@pytest.mark.parametrize("reduce_group", REDUCTIONS)
@pytest.mark.parametrize("window", [5, 32])  # 8 heads x 32 queries: two row tiles per group
def test_scores_reductions(device, reduce_queries, reduce_group, window):
    slots, key_len = pick(device, (67, [67, 40]), (4099, [4099, 2222]))
    queries, keys = make_inputs(device, batch=2, kv_heads=1, group=8, window=window, slots=slots, dim=64,
                                dtype=torch.float32, seed=1)
    check(queries, keys, *lengths(device, window, key_len), reduce_queries=reduce_queries, reduce_group=reduce_group)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_scores_dtypes_and_causality(device, dtype, causal):
    slots, key_len = pick(device, (100, [90, 100]), (3000, [2900, 3000]))
    queries, keys = make_inputs(device, batch=2, kv_heads=2, group=4, window=16, slots=slots, dim=128, dtype=dtype,
                                seed=2)
    check(queries, keys, *lengths(device, 16, key_len), causal=causal, reduce_queries="mean")


@pytest.mark.parametrize("dim", [80, 96])
def test_scores_head_dim_not_power_of_two(device, dim):
    queries, keys = make_inputs(device, batch=2, kv_heads=2, group=4, window=8, slots=pick(device, 75, 2050), dim=dim,
                                dtype=torch.float16, seed=3)
    check(queries, keys, *lengths(device, 8, pick(device, [75, 64], [2050, 1000])))


def test_scores_tuning_knobs_give_the_same_result(device):
    """One program per 64 keys, one program for all keys, the automatic choice, and other key-block sizes and
    warp counts agree."""
    slots = pick(device, 200, 4000)
    # 4 heads x 32 queries: one full 128-row tile, the shape whose warp count matters
    queries, keys = make_inputs(device, batch=2, kv_heads=2, group=4, window=32, slots=slots, dim=64,
                                dtype=torch.bfloat16, seed=4)
    key_len, query_count = lengths(device, 32, [slots, slots - 77])
    knobs = [dict(key_chunk=64), dict(key_chunk=64 * 100), dict(), dict(block_keys=32, num_warps=8),
             dict(block_keys=128, key_chunk=256), dict(block_keys=128, num_warps=4)]
    results = [check(queries, keys, key_len, query_count, **knob) for knob in knobs]
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=1e-5, atol=1e-7)


def test_scores_edge_rows(device):
    """Rows with no keys, with fewer tokens than the window, with no real query; slots past key_len are 0."""
    window, slots = 6, pick(device, 65, 1025)
    queries, keys = make_inputs(device, batch=4, kv_heads=2, group=4, window=window, slots=slots, dim=64,
                                dtype=torch.float32, seed=5)
    key_len = torch.tensor([0, 3, slots, 10], device=device)
    query_count = torch.tensor([0, 3, window, 0], device=device)
    for reduce_queries in REDUCTIONS:
        got = check(queries, keys, key_len, query_count, reduce_queries=reduce_queries)
        assert torch.all(got[0] == 0) and torch.all(got[3] == 0) and torch.all(got[1, :, 3:] == 0)
        assert torch.all(got[2] > 0)


def test_scores_left_padding(device):
    """key_start: slots before it are left padding of a prefill, invisible to every query (whole blocks of it
    are skipped)."""
    window, slots = 9, pick(device, 150, 3000)
    queries, keys = make_inputs(device, batch=3, kv_heads=2, group=4, window=window, slots=slots, dim=64,
                                dtype=torch.bfloat16, seed=7)
    key_len = torch.tensor([slots, slots - 20, 40], device=device)
    key_start = torch.tensor([0, 70, 35], device=device)
    query_count = torch.tensor([window, window, 5], device=device)
    for reduce_queries, reduce_group in (("sum", "sum"), ("max", "mean")):
        got = check(queries, keys, key_len, query_count, key_start=key_start, reduce_queries=reduce_queries,
                    reduce_group=reduce_group)
        assert torch.all(got[1, :, :70] == 0) and torch.all(got[1, :, 70 : slots - 20] > 0)


def test_scores_reject_bad_arguments():
    queries = torch.randn(1, 4, 65, 64)
    keys = torch.randn(1, 2, 10, 64)
    key_len = torch.tensor([10])
    with pytest.raises(ValueError, match="window"):
        attention_scores_triton(queries, keys, key_len, scale=1.0)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        attention_scores_triton(torch.randn(1, 3, 4, 64), keys, key_len, scale=1.0)
    with pytest.raises(ValueError, match="dtype"):
        attention_scores_triton(torch.randn(1, 4, 4, 64).half(), keys, key_len, scale=1.0)
    with pytest.raises(ValueError, match="reduce_group"):
        attention_scores_triton(torch.randn(1, 4, 4, 64), keys, key_len, scale=1.0, reduce_group="median")
    with pytest.raises(ValueError, match="key_chunk"):
        attention_scores_triton(torch.randn(1, 4, 4, 64), keys, key_len, scale=1.0, key_chunk=100)
    with pytest.raises(ValueError, match="block_keys"):
        attention_scores_triton(torch.randn(1, 4, 4, 64), keys, key_len, scale=1.0, block_keys=48)


def test_public_attention_scores_long_window(device):
    """The dispatcher: CUDA tensors take the Triton kernel (CPU ones the reference); a window of 100 runs as
    causal chunks of 64 and still equals the reference over the whole window."""
    window, slots = 100, pick(device, 130, 3000)
    queries, keys = make_inputs(device, batch=2, kv_heads=2, group=4, window=window, slots=slots, dim=64,
                                dtype=torch.bfloat16, seed=6)
    key_len = torch.tensor([slots, 120], device=device)
    query_count = torch.tensor([window, 90], device=device)
    key_start = torch.tensor([0, 30], device=device)
    with kernels_in_mode("auto"):
        assert use_triton(queries) == (device == "cuda")
    for reduce_queries, reduce_group in (("mean", "sum"), ("max", "max"), ("sum", "mean")):
        options = dict(scale=0.125, query_count=query_count, key_start=key_start, reduce_queries=reduce_queries,
                       reduce_group=reduce_group)
        got = attention_scores(queries, keys, key_len, **options)
        want = attention_scores_reference(queries, keys, key_len, **options)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

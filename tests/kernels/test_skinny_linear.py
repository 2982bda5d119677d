"""Skinny projection kernels (a decode step's linear layers: few rows, weights read in place) against their torch
references on awkward shapes: rows not a power of two, output sizes not a multiple of a block, K not a multiple of
a tile or a split, weights that are views of a larger storage, biases, every split count."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="needs triton installed (pip install 'dynts[triton]')")

from kernel_cases import pick  # noqa: E402

from dynts import kernels  # noqa: E402
from dynts.kernels.reference import concat_linear_reference, silu_gated_linear_reference  # noqa: E402
from dynts.kernels.skinny_linear import concat_linear, silu_gated_linear  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One unit in the last place (relative) of each dtype.
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def randn(*shape: int, dtype: torch.dtype, device: str, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor, depth: int) -> None:
    """Equal up to the order of the fp32 sums and one rounding: a couple of units in the last place of the output,
    plus the fp32 error of a K-term sum (fp32 inputs) relative to the output's scale."""
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.float().abs().max().item()
    ulp = ULP[want.dtype] if want.dtype != torch.float32 else 2.0**-23 * depth**0.5 * 8
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=2 * ulp * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("split_k", [None, 1, 2, 3, 4])
def test_concat_linear_matches_reference(device, dtype, with_bias, split_k):
    generator = torch.Generator().manual_seed((split_k or 0) * 10 + with_bias)
    rows = pick(device, 5, 20)
    depth = pick(device, 300, 4096 + 320)  # not a multiple of a tile or of a split
    sizes = pick(device, (70, 16, 33), (4096, 1024, 1000))  # the last block of each weight is partial
    # The three weights are row ranges of one storage (as a checkpoint may hold them) and a separate tensor.
    storage = randn(sum(sizes[:2]) + 3, depth, dtype=dtype, device=device, generator=generator, scale=0.05)
    weights = [storage[: sizes[0]], storage[sizes[0] : sizes[0] + sizes[1]],
               randn(sizes[2], depth, dtype=dtype, device=device, generator=generator, scale=0.05)]
    biases = [randn(size, dtype=dtype, device=device, generator=generator) for size in sizes] if with_bias else None
    x = randn(rows, depth + 8, dtype=dtype, device=device, generator=generator)[:, :depth]  # strided rows
    got = concat_linear(x, weights, biases, split_k=split_k)
    assert_close_to_reference(got, concat_linear_reference(x, weights, biases), depth)
    # One weight alone (o_proj, down_proj)
    got = concat_linear(x, weights[2:], biases[2:] if with_bias else None, split_k=split_k)
    assert_close_to_reference(got, concat_linear_reference(x, weights[2:], biases[2:] if with_bias else None), depth)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_silu_gated_linear_matches_reference(device, dtype, with_bias):
    generator = torch.Generator().manual_seed(7 + with_bias)
    rows, depth, size = pick(device, 3, 17), pick(device, 200, 3584), pick(device, 90, 18944 + 40)
    gate = randn(size, depth, dtype=dtype, device=device, generator=generator, scale=0.05)
    up = randn(size, depth, dtype=dtype, device=device, generator=generator, scale=0.05)
    gate_bias, up_bias = ((randn(size, dtype=dtype, device=device, generator=generator),
                           randn(size, dtype=dtype, device=device, generator=generator)) if with_bias else (None, None))
    x = randn(rows, depth, dtype=dtype, device=device, generator=generator)
    got = silu_gated_linear(x, gate, up, gate_bias, up_bias)
    want = silu_gated_linear_reference(x, gate, up, gate_bias, up_bias)
    # Three roundings after the sums (gate, SiLU, product): a few units in the last place.
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.float().abs().max().item()
    ulp = ULP[dtype] if dtype != torch.float32 else 2.0**-23 * depth**0.5 * 8
    torch.testing.assert_close(got.float(), want.float(), rtol=4 * ulp, atol=4 * ulp * scale)


def test_dispatch_takes_the_reference_for_many_rows_and_strided_weights(device):
    """More rows than a skinny kernel takes, or a weight not stored row by row: the torch reference, same result."""
    generator = torch.Generator().manual_seed(1)
    depth = 64
    weight = randn(48, depth, dtype=torch.float32, device=device, generator=generator)
    many = randn(kernels.SKINNY_MAX_ROWS + 1, depth, dtype=torch.float32, device=device, generator=generator)
    torch.testing.assert_close(kernels.concat_linear(many, [weight]), many @ weight.T)
    transposed = randn(depth, 48, dtype=torch.float32, device=device, generator=generator).T  # [48, depth], strided
    few = many[:4]
    torch.testing.assert_close(kernels.concat_linear(few, [transposed]), few @ transposed.T)


@pytest.mark.parametrize("call, message", [
    (lambda x, w: kernels.concat_linear(x, []), "weights must be a list of 1 to 3 weight tensors"),
    (lambda x, w: kernels.concat_linear(x, [w, w, w, w]), "weights must be a list of 1 to 3 weight tensors"),
    (lambda x, w: kernels.concat_linear(x, [w[:, :5]]), r"weights\[0\] must be \[out_features, 8\]"),
    (lambda x, w: kernels.concat_linear(x, [w], [None]), r"biases\[0\] is None"),
    (lambda x, w: kernels.concat_linear(x, [w], [torch.zeros(3)]), r"biases\[0\] must be \[6\]"),
    (lambda x, w: kernels.concat_linear(x[0], [w]), "x must be \\[rows, in_features\\]"),
    (lambda x, w: kernels.concat_linear(x, [w.half()]), r"weights\[0\] must have x's dtype"),
    (lambda x, w: kernels.silu_gated_linear(x, w, w[:5]), "up_weight must have gate_weight's shape"),
    (lambda x, w: kernels.silu_gated_linear(x, w, w, torch.zeros(6), None), "gate_bias and up_bias must both"),
])
def test_projection_arguments_are_checked(call, message):
    x, weight = torch.randn(2, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match=message):
        call(x, weight)


def test_a_split_count_outside_the_tuned_ones_is_refused(device):
    x, weight = torch.randn(2, 8, device=device), torch.randn(6, 8, device=device)
    with pytest.raises(ValueError, match=r"split_k must be one of \(1, 2, 3, 4\) or None, got 5"):
        concat_linear(x, [weight], split_k=5)


def test_the_tuning_keeps_every_useful_split_count(monkeypatch):
    """The split count is tuned with the tile: the pruning keeps each split count while fewer splits would leave
    multiprocessors without a program, and fitting the pipelines to shared memory must not fold a tile's split
    counts into one (it did: every shape was tuned among one split only). Compiled configs only on a GPU."""
    from dynts.kernels import skinny_linear

    monkeypatch.setattr(skinny_linear, "multiprocessors", lambda device, otherwise: 132)
    x = torch.zeros(20, 4096, dtype=torch.bfloat16)
    tuned = skinny_linear._concat_linear_tuned
    kept = tuned.early_config_prune(tuned.configs, {"x_ptr": x, "N_TOTAL": 4096, "M_PAD": 32})
    shapes = {(config.kwargs["BLOCK_N"], config.kwargs["SPLIT_K"]) for config in kept}
    if skinny_linear.interpreting():
        assert shapes == {(64, 1)}  # the interpreter runs the first config only
    else:
        # 64 blocks of 64 columns: 2 and 3 splits still leave programs short of 132 processors, 4 do not.
        assert shapes == {(64, 1), (64, 2), (64, 3), (128, 1), (128, 2), (128, 3), (128, 4)}
    assert len({(tuple(sorted(c.kwargs.items())), c.num_stages) for c in kept}) == len(kept)

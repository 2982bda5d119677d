"""Launch shapes of the chunked prefill: every config of every tuning space computes the recurrence, the tuning key
names real kernel arguments, short prefills take the measured default, and a long prefill on a GPU tunes."""

from __future__ import annotations

import pytest
import torch
from linear_attention_cases import TOLERANCE, make_inputs, naive_fp32, relative_rmse

pytest.importorskip("triton", reason="needs triton installed (pip install 'dynts[triton]')")

from dynts.kernels.linear_attention import chunk as chunk_module  # noqa: E402
from dynts.kernels.linear_attention import chunk_gated_delta_rule, chunk_kda  # noqa: E402

CHUNK_OPS = {"kda": chunk_kda, "gdn": chunk_gated_delta_rule}
# launcher name -> (the op whose prefill launches it, its tuning space)
SPACES = {
    "scores": ("kda", chunk_module.SCORES_CONFIGS),
    "apply": ("kda", chunk_module.APPLY_CONFIGS),
    "intra": ("gdn", chunk_module.INTRA_CONFIGS),
    "kda_state": ("kda", chunk_module.STATE_CONFIGS[True]),
    "gdn_state": ("gdn", chunk_module.STATE_CONFIGS[False]),
}
LAUNCHERS = {
    "scores": chunk_module._scores_launch, "apply": chunk_module._apply_launch, "intra": chunk_module._intra_launch,
    "kda_state": chunk_module._state_launch[True], "gdn_state": chunk_module._state_launch[False],
}


def distinct_configs(configs, device: str):
    """The configs to run: all of them compiled; under the interpreter, which ignores warps, stages and register caps,
    one per set of block sizes."""
    if device == "cuda":
        return configs
    return list({tuple(sorted(config.kwargs.items())): config for config in configs}.values())


def run_prefill(op: str, inputs: dict):
    return CHUNK_OPS[op](**inputs, output_final_state=True, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("launcher", list(SPACES))
def test_every_config_computes_the_recurrence(device, monkeypatch, launcher):
    """Each config forced in turn (the others at their defaults), two value heads per q/k head: under the interpreter
    130 tokens (a partial last chunk) of 64 x 48 heads; compiled, 16-bit 128 x 128 heads in the long-prefill test's
    specialisation (so both share the compiled kernels)."""
    op, space = SPACES[launcher]
    tuner = LAUNCHERS[launcher]
    if device == "cuda":
        inputs = make_inputs(op, 1, 320, 1, 2, 128, 128, dtype=torch.bfloat16, device=device, seed=7)
    else:
        inputs = make_inputs(op, 1, 130, 1, 2, 64, 48, device=device, seed=7)
    reference_output, reference_state = naive_fp32(op, inputs)
    for config in distinct_configs(space, device):
        monkeypatch.setattr(tuner, "configs", [config])  # one config: the autotuner launches it as is
        output, final_state = run_prefill(op, inputs)
        assert tuner.best_config is config  # the launch this prefill made
        assert relative_rmse(output, reference_output) <= TOLERANCE, f"{launcher} {config} output"
        assert relative_rmse(final_state, reference_state) <= TOLERANCE, f"{launcher} {config} final state"


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_tuning_key_names_kernel_arguments(launcher):
    """A name that is not an argument would silently drop out of the key (Triton 3.6 does not check)."""
    tuner = LAUNCHERS[launcher]
    assert "chunk_bucket" in tuner.keys
    assert set(tuner.keys) <= set(tuner.arg_names), set(tuner.keys) - set(tuner.arg_names)


def state_args(**change) -> dict:
    return dict(dict(chunk_bucket=1024, K=128, V=128, BK=128, SIXTEEN_BIT_PRODUCTS=True), **change)


def test_short_prefills_take_the_first_config_fitted():
    prune = chunk_module._fitted_space(chunk_module._fit_state)
    space = chunk_module.STATE_CONFIGS[False]
    short = prune(space, {}, **state_args(chunk_bucket=chunk_module.TUNE_FROM_CHUNKS // 2))
    assert [str(config) for config in short] == [str(space[0])]
    # fp32 inputs cannot pipeline: the same first config with one stage
    short_fp32 = prune(space, {}, **state_args(chunk_bucket=1, SIXTEEN_BIT_PRODUCTS=False))
    assert len(short_fp32) == 1 and short_fp32[0].num_stages == 1 and short_fp32[0].kwargs == space[0].kwargs


def test_long_prefills_tune_over_the_fitted_space():
    prune = chunk_module._fitted_space(chunk_module._fit_state)
    space = chunk_module.STATE_CONFIGS[True]
    assert len(prune(space, {}, **state_args())) == len(space)  # 16-bit, 128 key channels: every config
    unpipelined = prune(space, {}, **state_args(SIXTEEN_BIT_PRODUCTS=False))
    assert {config.num_stages for config in unpipelined} == {1}
    assert len(unpipelined) == len({(c.kwargs["BV"], c.num_warps) for c in space})  # duplicates dropped
    narrow = prune(space, {}, **state_args(V=12))  # no block wider than the padded value dim (16)
    assert {config.kwargs["BV"] for config in narrow} == {16}
    blocks = chunk_module._fitted_space(chunk_module._fit_blocks)(
        chunk_module.APPLY_CONFIGS, {}, chunk_bucket=1024, K=64, V=40)
    assert {(config.kwargs["KB"], config.kwargs["VB"]) for config in blocks} == {(32, 32), (64, 64)}


@pytest.mark.parametrize("op", ["kda", "gdn"])
def test_long_prefill_tunes_and_computes_the_recurrence(device, op):
    """A prefill of TUNE_FROM_CHUNKS chunks times the whole space once (GPU only: the interpreter cannot time) and
    the chosen launch computes the recurrence."""
    if device != "cuda":
        pytest.skip("timing configs needs a CUDA GPU: runs on the GPU machine (device tool)")
    chunks = chunk_module.TUNE_FROM_CHUNKS
    inputs = make_inputs(op, 1, chunks * 64, 1, 2, 128, 128, dtype=torch.bfloat16, device=device, seed=3)
    state = LAUNCHERS["kda_state" if op == "kda" else "gdn_state"]
    state.cache.clear()
    output, final_state = run_prefill(op, inputs)
    reference_output, reference_state = naive_fp32(op, inputs)
    assert relative_rmse(output, reference_output) <= TOLERANCE
    assert relative_rmse(final_state, reference_state) <= TOLERANCE
    bucket_at = state.keys.index("chunk_bucket")  # the key holds the named arguments in order, then dtypes
    assert [key[bucket_at] for key in state.cache] == [chunks]

"""Launch shapes of the chunked prefill: every config of every tuning space computes the recurrence, the tuning key
names real kernel arguments, short prefills take the measured default, and a long prefill on a GPU tunes the launch
shapes and chooses the stage-2 variant."""

from __future__ import annotations

import pytest
import torch
from linear_attention_cases import OPS, TOLERANCE, make_inputs, naive_fp32, relative_rmse

pytest.importorskip("triton", reason="needs triton installed (pip install 'dynts[triton]')")

from dynts.kernels.linear_attention import chunk as chunk_module  # noqa: E402

# launcher name -> (the op whose prefill launches it, the stage-2 variant that launches it (None: both), its space)
SPACES = {
    "scores": ("kda", None, chunk_module.SCORES_CONFIGS),
    "apply": ("kda", None, chunk_module.APPLY_CONFIGS),
    "intra": ("gdn", None, chunk_module.INTRA_CONFIGS),
    "kda_state": ("kda", "sequential_outputs", chunk_module.STATE_CONFIGS[True]),
    "gdn_state": ("gdn", "sequential_outputs", chunk_module.STATE_CONFIGS[False]),
    # both gate kinds: the state update's products differ by kind (see the kernel)
    "kda_state_only": ("kda", "parallel_outputs", chunk_module.STATE_ONLY_CONFIGS),
    "gdn_state_only": ("gdn", "parallel_outputs", chunk_module.STATE_ONLY_CONFIGS),
    # one op: the output kernel's block sizes do not meet the gate kind (the kernel tests cover both at the default)
    "gdn_output": ("gdn", "parallel_outputs", chunk_module.OUTPUT_CONFIGS),
}
LAUNCHERS = {
    "scores": chunk_module._scores_launch, "apply": chunk_module._apply_launch, "intra": chunk_module._intra_launch,
    "kda_state": chunk_module._state_launch[True], "gdn_state": chunk_module._state_launch[False],
    "kda_state_only": chunk_module._state_only_launch, "gdn_state_only": chunk_module._state_only_launch,
    "gdn_output": chunk_module._output_launch,
}


def distinct_configs(configs, device: str):
    """The configs to run: all of them compiled; under the interpreter, which ignores warps, stages and register caps,
    one per set of block sizes."""
    if device == "cuda":
        return configs
    return list({tuple(sorted(config.kwargs.items())): config for config in configs}.values())


def run_prefill(op: str, inputs: dict, variant: str | None = None):
    """The prefill kernels, ``variant`` forced, or chosen per shape when None."""
    return chunk_module.chunk_delta_rule_triton(
        inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], scale=inputs["q"].shape[-1] ** -0.5,
        initial_state=inputs["initial_state"], output_final_state=True, use_qk_l2norm_in_kernel=True,
        cu_seqlens=None, per_channel=OPS[op][3], variant=variant)


@pytest.mark.parametrize("launcher", list(SPACES))
def test_every_config_computes_the_recurrence(device, monkeypatch, launcher):
    """Each config forced in turn (the others at their defaults), two value heads per q/k head: under the interpreter
    130 tokens (a partial last chunk) of 64 x 48 heads; compiled, 16-bit 128 x 128 heads in the long-prefill test's
    specialisation (so both share the compiled kernels)."""
    op, variant, space = SPACES[launcher]
    tuner = LAUNCHERS[launcher]
    if device == "cuda":
        inputs = make_inputs(op, 1, 320, 1, 2, 128, 128, dtype=torch.bfloat16, device=device, seed=7)
    else:
        inputs = make_inputs(op, 1, 130, 1, 2, 64, 48, device=device, seed=7)
    reference_output, reference_state = naive_fp32(op, inputs)
    for config in distinct_configs(space, device):
        monkeypatch.setattr(tuner, "configs", [config])  # one config: the autotuner launches it as is
        output, final_state = run_prefill(op, inputs, variant)
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


def test_short_prefills_and_the_interpreter_take_the_default_variant(monkeypatch):
    """Only a prefill of TUNE_FROM_CHUNKS chunks or more, compiled, times the variants."""

    def no_timing(fn):
        raise AssertionError("timed a variant")

    monkeypatch.setattr(chunk_module, "do_bench", no_timing)
    monkeypatch.setattr(chunk_module, "interpreting", lambda: False)
    short = chunk_module._chosen_variant(("short",), chunk_module.TUNE_FROM_CHUNKS // 2, lambda variant: None)
    assert short == chunk_module.DEFAULT_VARIANT
    monkeypatch.setattr(chunk_module, "interpreting", lambda: True)
    assert chunk_module._chosen_variant(("long",), 1024, lambda variant: None) == chunk_module.DEFAULT_VARIANT


def test_long_prefills_keep_the_faster_variant(monkeypatch):
    """Each variant timed once per key (here by a stand-in for do_bench that reports fixed times); the faster kept."""
    runs = []
    fake_ms = {"sequential_outputs": 2.0, "parallel_outputs": 1.0}

    def fake_bench(fn):
        fn()
        return fake_ms[runs[-1]]

    monkeypatch.setattr(chunk_module, "do_bench", fake_bench)
    monkeypatch.setattr(chunk_module, "interpreting", lambda: False)
    monkeypatch.setattr(chunk_module, "_variant_choices", {})
    assert chunk_module._chosen_variant(("a",), 1024, runs.append) == "parallel_outputs"
    assert sorted(runs) == sorted(chunk_module.PREFILL_VARIANTS)
    fake_ms = {"sequential_outputs": 1.0, "parallel_outputs": 2.0}
    assert chunk_module._chosen_variant(("a",), 1024, runs.append) == "parallel_outputs"  # kept, not re-timed
    assert len(runs) == 2
    assert chunk_module._chosen_variant(("b",), 1024, runs.append) == "sequential_outputs"


@pytest.mark.parametrize("op", ["kda", "gdn"])
def test_long_prefill_tunes_and_computes_the_recurrence(device, monkeypatch, op):
    """A prefill of TUNE_FROM_CHUNKS chunks times the whole space of every launcher of both variants once and keeps
    the faster variant (GPU only: the interpreter cannot time); the result computes the recurrence."""
    if device != "cuda":
        pytest.skip("timing launches needs a CUDA GPU (the interpreter cannot time)")
    chunks = chunk_module.TUNE_FROM_CHUNKS
    inputs = make_inputs(op, 1, chunks * 64, 1, 2, 128, 128, dtype=torch.bfloat16, device=device, seed=3)
    monkeypatch.setattr(chunk_module, "_variant_choices", {})
    stage_two_launchers = [LAUNCHERS[f"{op}_state"], chunk_module._state_only_launch, chunk_module._output_launch]
    for launcher in stage_two_launchers:
        launcher.cache.clear()
    output, final_state = run_prefill(op, inputs)
    reference_output, reference_state = naive_fp32(op, inputs)
    assert relative_rmse(output, reference_output) <= TOLERANCE
    assert relative_rmse(final_state, reference_state) <= TOLERANCE
    assert list(chunk_module._variant_choices.values()) in [[variant] for variant in chunk_module.PREFILL_VARIANTS]
    for launcher in stage_two_launchers:
        bucket_at = launcher.keys.index("chunk_bucket")  # the key holds the named arguments in order, then dtypes
        assert [key[bucket_at] for key in launcher.cache] == [chunks]

"""The dynts flag's settings and the engine features it refuses: clear errors, named, at engine start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_support import build_engine, require_vllm, save_random_predictor, save_tiny_model

require_vllm()

from dynts.integrations.vllm import unsupported_vllm  # noqa: E402
from dynts.integrations.vllm.settings import DynTSSettings  # noqa: E402

VALID = {"budget": 64, "window": 16, "keep_ratio": 0.5, "scorer": "window"}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def test_no_flag_means_no_settings() -> None:
    assert DynTSSettings.from_additional_config({}) is None
    assert DynTSSettings.from_additional_config({"other_plugin": {"x": 1}}) is None


def test_valid_settings_parse() -> None:
    settings = DynTSSettings.from_additional_config({"dynts": dict(VALID, think_end=[7, 8], protect_prompt=False)})
    assert settings.compression.budget == 64 and settings.compression.think_end == (7, 8)
    assert settings.compression.protect_prompt is False and settings.scorer == "window"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"budget": 16}, "budget"),
        ({"window": -1}, "window"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"granularity": "per_layer"}, "granularity"),
        ({"scorer": "h2o"}, "needs attention queries"),
        ({"scorer": "magic"}, "scorer"),
        ({"scorer": "predictor"}, "predictor"),
        ({"scorer": "predictor", "predictor": "/nonexistent/head"}, "predictor"),
        ({"predictor": "/tmp"}, "predictor"),
        ({"scorer": "streamingllm", "scorer_kwargs": {"sinks": -1}}, "sinks"),
        ({"scorer_kwargs": {"unknown": 1}}, "scorer_kwargs"),
        ({"think_end": [5, 6, 7], "window": 2, "budget": 64}, "window"),
        ({"think_end": [-3]}, "think_end"),
        ({"record_positions": "yes"}, "record_positions"),
        ({"bugdet": 64}, "bugdet"),
    ],
)
def test_bad_settings_name_the_field(change: dict, named: str) -> None:
    with pytest.raises((ValueError, TypeError), match=named):
        DynTSSettings.from_additional_config({"dynts": dict(VALID, **change)})


def test_settings_must_be_an_object() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        DynTSSettings.from_additional_config({"dynts": [64, 16]})


@pytest.mark.parametrize(
    ("version", "supported"),
    [("0.32.0", True), ("0.32.0+cpu", True), ("0.32.3", True), ("0.31.9", False), ("0.33.0", False), ("1.0.0", False)],
)
def test_supported_vllm_versions(version: str, supported: bool) -> None:
    reason = unsupported_vllm(version)
    assert (reason is None) == supported
    if not supported:
        assert version in reason and "0.32" in reason


# ---------------------------------------------------------------------- engine config (front end, no process started)
def test_flag_installs_the_scheduler_and_turns_off_what_eviction_cannot_run_with(llama_dir: Path) -> None:
    from vllm.engine.arg_utils import EngineArgs

    from dynts.integrations.vllm.settings import SCHEDULER_CLASS

    common = dict(model=str(llama_dir), dtype="float32", skip_tokenizer_init=True, max_model_len=512, block_size=32)
    plain = EngineArgs(**common).create_engine_config()
    assert plain.scheduler_config.scheduler_cls is None
    assert "dynts" not in plain.additional_config
    config = EngineArgs(**common, additional_config={"dynts": VALID}).create_engine_config()
    assert config.scheduler_config.scheduler_cls == SCHEDULER_CLASS
    assert config.cache_config.enable_prefix_caching is False  # left unset by the user: off
    assert config.scheduler_config.async_scheduling is False


# ---------------------------------------------------------------------- through LLM(...): refused before any process starts
@pytest.mark.parametrize(
    ("dynts", "engine_overrides", "named"),
    [
        (dict(VALID, budget=8), {}, "budget"),
        (dict(VALID, keep_ratio=2), {}, "keep_ratio"),
        (dict(VALID, think_end=[100_000]), {}, "think_end"),
        (VALID, {"enable_prefix_caching": True}, "prefix caching"),
        (VALID, {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}},
         "speculative decoding"),
        (VALID, {"kv_cache_dtype": "fp8"}, "quantized KV cache"),
        (VALID, {"scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler"}, "scheduler_cls"),
    ],
    ids=["budget", "keep_ratio", "think_end", "prefix_caching", "speculative", "kv_cache_dtype", "scheduler_cls"],
)
def test_engine_start_refuses(llama_dir: Path, dynts: dict, engine_overrides: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        build_engine(llama_dir, dynts, **engine_overrides)


def test_engine_start_refuses_sliding_window_models(llama_dir: Path, tmp_path: Path) -> None:
    config = json.loads((llama_dir / "config.json").read_text())
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True, sliding_window=64,
                  max_window_layers=0)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sliding-window"):
        build_engine(tmp_path, VALID)


# ---------------------------------------------------------------------- the predictor head must belong to the served model
def test_engine_start_refuses_a_predictor_of_another_size(llama_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dynts.predictor import ImportancePredictor, ModelIdentity

    other = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=32))
    head = ImportancePredictor.for_model(other).save(tmp_path / "head", ModelIdentity.of(other))
    with pytest.raises(ValueError, match="predictor: the head was trained on a model with hidden_size 64"):
        build_engine(llama_dir, dict(VALID, scorer="predictor", predictor=str(head)))


def test_worker_checks_predictor_weights_through_the_vllm_model_view(llama_dir: Path, tmp_path: Path) -> None:
    """The worker checks the head against vLLM's weights through ``_HFModelView`` (model.embed_tokens, model.norm),
    which HF decoders also have: the same weights pass, other weights of the same sizes fail."""
    from transformers import AutoModelForCausalLM

    from dynts.integrations.vllm.worker import _HFModelView
    from dynts.predictor import ImportancePredictor

    _, identity = ImportancePredictor.load_with_identity(save_random_predictor(llama_dir, tmp_path / "head"))
    same = AutoModelForCausalLM.from_pretrained(llama_dir)
    identity.check_compatible(_HFModelView(same, same.config))
    other = AutoModelForCausalLM.from_pretrained(save_tiny_model("llama", tmp_path / "other", seed=5))
    with pytest.raises(ValueError, match="different weights"):
        identity.check_compatible(_HFModelView(other, other.config))

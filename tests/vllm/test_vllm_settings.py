"""The dynts flag's settings and the engine features it refuses: clear errors, named, at engine start."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from vllm_support import build_engine, require_vllm, save_random_predictor, save_tiny_model

require_vllm()

from dynts.integrations.vllm import unsupported_vllm  # noqa: E402
from dynts.integrations.vllm.patches import PatchPoint, check_patch_points  # noqa: E402
from dynts.integrations.vllm.settings import DynTSSettings, describe_json_type  # noqa: E402
from dynts.scorers import SCORERS  # noqa: E402

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
        ({"scorer": "external"}, "Python callable"),
        ({"scorer": "snapkv"}, "observation_window"),  # its default window of 32 queries > the window of 16 tokens
        ({"suspend_memory_gib": -1}, "suspend_memory_gib"),
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


# Wrong JSON types: each message names the field (nested ones by their full path) and the expected type, before any
# constructor sees the value (Python would iterate a string into characters, or compare "4" < 0 without a name).
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"think_end": 7}, r"\['think_end'\] must be a list of ints or null .*resolve_think_end.*got int 7"),
        ({"think_end": "</think>"}, r"\['think_end'\] must be a list of ints or null .*got str '</think>'"),
        ({"think_end": [7, "8"]}, r"\['think_end'\] must be a list of ints or null .*got list \[7, '8'\]"),
        ({"think_end": [True]}, r"\['think_end'\] must be a list of ints"),
        ({"budget": 64.0}, r"\['budget'\] must be an int, got float 64.0"),
        ({"budget": "64"}, r"\['budget'\] must be an int, got str '64'"),
        ({"window": None}, r"\['window'\] must be an int, got NoneType None"),
        ({"keep_ratio": "0.5"}, r"\['keep_ratio'\] must be a number, got str '0.5'"),
        ({"protect_prompt": "false"}, r"\['protect_prompt'\] must be true or false, got str 'false'"),
        ({"record_positions": 1}, r"\['record_positions'\] must be true or false, got int 1"),
        ({"granularity": 1}, r"\['granularity'\] must be one of \['shared', 'per_layer', 'per_kv_head'\], got int 1"),
        ({"scorer": 5}, r"\['scorer'\] must be a string, got int 5"),
        ({"scorer": ["window"]}, r"\['scorer'\] must be a string, got list"),
        ({"predictor": 5}, r"\['predictor'\] must be a string or null, got int 5"),
        ({"scorer_kwargs": [4]}, r"\['scorer_kwargs'\] must be an object, got list \[4\]"),
        ({"scorer": "streamingllm", "scorer_kwargs": {"sinks": "4"}},
         r"\['scorer_kwargs'\]\['sinks'\] must be an int, got str '4'"),
        ({"scorer": "streamingllm", "scorer_kwargs": {"sinks": 4.0}},
         r"\['scorer_kwargs'\]\['sinks'\] must be an int, got float 4.0"),
        ({"scorer": "sepllm", "scorer_kwargs": {"separator_ids": "12"}},
         r"\['scorer_kwargs'\]\['separator_ids'\] must be a list of ints, got str '12'"),
        ({"scorer": "sepllm", "scorer_kwargs": {"separator_ids": 12}},
         r"\['scorer_kwargs'\]\['separator_ids'\] must be a list of ints, got int 12"),
        ({"scorer": "sepllm", "scorer_kwargs": {"separator_ids": [12, None]}},
         r"\['scorer_kwargs'\]\['separator_ids'\] must be a list of ints"),
        ({"scorer": "random", "scorer_kwargs": {"seed": "0"}}, r"\['scorer_kwargs'\]\['seed'\] must be an int, got str"),
        ({"scorer": "rkv", "scorer_kwargs": {"lam": "0.1"}}, r"\['scorer_kwargs'\]\['lam'\] must be a number, got str"),
        ({"suspend_memory_gib": "4"}, r"\['suspend_memory_gib'\] must be a number, got str '4'"),
    ],
)
def test_wrong_types_name_the_field_and_the_type(change: dict, message: str) -> None:
    with pytest.raises(TypeError, match=r"additional_config\['dynts'\]" + message):
        DynTSSettings.from_additional_config({"dynts": dict(VALID, **change)})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scorer": "magic"}, r"\['scorer'\]: 'magic' is not supported in vLLM; allowed: \['predictor', 'h2o'"),
        ({"scorer": "streamingllm", "scorer_kwargs": {"sink": 4}},
         r"\['scorer_kwargs'\]: unknown argument\(s\) \['sink'\] for scorer 'streamingllm'; allowed: \['sinks'\]"),
        ({"scorer": "sepllm", "scorer_kwargs": {"sinks": 2}},
         r"\['scorer_kwargs'\]\['separator_ids'\] is required by scorer 'sepllm' \(expected a list of ints\)"),
    ],
)
def test_unknown_and_missing_names_are_listed(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=r"additional_config\['dynts'\]" + message):
        DynTSSettings.from_additional_config({"dynts": dict(VALID, **change)})


def test_json_numbers_and_lists_are_accepted_as_their_python_types() -> None:
    settings = DynTSSettings.from_additional_config({"dynts": dict(
        VALID, keep_ratio=1, think_end=(7,), scorer="sepllm", scorer_kwargs={"separator_ids": (3, 5), "sinks": 0},
    )})
    assert settings.compression.keep_ratio == 1 and settings.compression.think_end == (7,)
    assert settings.build_scorer().separator_ids == [3, 5]


@pytest.mark.parametrize("name", sorted(set(SCORERS) - {"external", "predictor"}))
def test_every_scorer_argument_has_a_json_type(name: str) -> None:
    """The type check reads each constructor's annotations: every scorer vLLM can run must have arguments
    expressible in JSON, or its settings could not be checked."""
    import inspect
    import typing

    constructor = SCORERS[name].__init__
    hints = typing.get_type_hints(constructor)
    for parameter in list(inspect.signature(constructor).parameters.values())[1:]:
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        describe_json_type(hints[parameter.name])  # raises TypeError for an annotation without a JSON form


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
    # The workers' RPCs come through vLLM's worker extension, only with the flag; a user's own extension stays.
    assert plain.parallel_config.worker_extension_cls == ""
    assert config.parallel_config.worker_extension_cls == "dynts.integrations.vllm.DynTSWorkerExtension"
    own = EngineArgs(**common, additional_config={"dynts": VALID}, worker_extension_cls="my.Extension").create_engine_config()
    assert own.parallel_config.worker_extension_cls == "my.Extension"


def test_model_runner_v2_is_refused_by_name(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooks patch the V1 runner. Whatever makes vLLM pick V2 (the environment, HiSparse attention, watermarking)
    refuses the flag. vLLM on CPU refuses V2 itself ("requires Triton"), so the pick is simulated on a built config."""
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    from dynts.integrations.vllm.settings import check_engine

    common = dict(model=str(llama_dir), dtype="float32", skip_tokenizer_init=True, max_model_len=512, block_size=32)
    config = EngineArgs(**common, additional_config={"dynts": VALID}).create_engine_config()
    settings = DynTSSettings.from_additional_config(config.additional_config)
    check_engine(config, settings)  # as built: V1
    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: True))
    with pytest.raises(ValueError, match=r"cannot run with: Model Runner V2 \(selected by VLLM_USE_V2_MODEL_RUNNER=1"):
        check_engine(config, settings)


@pytest.mark.parametrize("mode", ["FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"])
def test_scorers_that_read_queries_refuse_full_cuda_graphs_by_name(llama_dir: Path, mode: str) -> None:
    """A replayed full CUDA graph runs attention without the Python hook that captures the queries: asked for
    explicitly (refused before the config is built), or resolved so by vLLM (refused when the config is checked)."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    from dynts.integrations.vllm.settings import check_engine

    common = dict(model=str(llama_dir), dtype="float32", skip_tokenizer_init=True, max_model_len=512, block_size=32)
    h2o = dict(VALID, scorer="h2o")
    with pytest.raises(ValueError, match=rf"full CUDA graphs with scorer 'h2o' \(cudagraph_mode={mode}\).*PIECEWISE"):
        EngineArgs(**common, additional_config={"dynts": h2o}, compilation_config={"cudagraph_mode": mode}).create_engine_config()
    config = EngineArgs(**common, additional_config={"dynts": h2o}).create_engine_config()
    config.compilation_config.cudagraph_mode = CUDAGraphMode[mode]
    with pytest.raises(ValueError, match=rf"cannot run with: full CUDA graphs with scorer 'h2o' \(cudagraph_mode={mode}\)"):
        check_engine(config, DynTSSettings.from_additional_config({"dynts": h2o}))
    check_engine(config, DynTSSettings.from_additional_config({"dynts": VALID}))  # no queries read: full graphs are fine


def test_scorers_that_read_queries_get_piecewise_cuda_graphs_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's CUDA default replays decode attention inside full graphs; the flag picks piecewise graphs when the scorer
    reads queries and the user chose no mode (on CPU, where there are no CUDA graphs, nothing changes)."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from dynts.integrations.vllm import prepare_engine_args

    def chosen_mode(settings: dict[str, Any], cuda: bool) -> Any:
        monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self: cuda)
        engine_args = EngineArgs(model="unused")
        prepare_engine_args(engine_args, DynTSSettings.from_additional_config({"dynts": settings}))
        return engine_args.compilation_config.cudagraph_mode

    assert chosen_mode(dict(VALID, scorer="snapkv", window=32), cuda=True) == CUDAGraphMode.PIECEWISE
    assert chosen_mode(dict(VALID, scorer="snapkv", window=32), cuda=False) is None
    assert chosen_mode(VALID, cuda=True) is None  # the window scorer reads no queries: vLLM's own default


# ---------------------------------------------------------------------- private vLLM internals: checked at load
def test_every_patch_point_matches_the_installed_vllm() -> None:
    assert check_patch_points() == []


def _prepare_inputs_of_another_version(self: Any, batch: Any, num_scheduled_tokens: Any) -> Any:
    raise AssertionError("never called: the check reads the signature only")


def _allocate_new_blocks_of_another_version(
    self: Any, request_id: str, num_tokens: int, num_tokens_main_model: int, lookahead: int = 0
) -> Any:
    raise AssertionError("never called: the check reads the signature only")


@pytest.mark.parametrize(
    ("owner", "name", "replacement", "message"),
    [
        ("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_prepare_inputs", _prepare_inputs_of_another_version,
         r"GPUModelRunner\._prepare_inputs takes \(self, batch, num_scheduled_tokens\); dynts expects parameters "
         r"starting with \(self, scheduler_output\)"),
        ("vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager", "allocate_new_blocks",
         _allocate_new_blocks_of_another_version,
         r"FullAttentionManager\.allocate_new_blocks takes \(self, request_id, num_tokens, num_tokens_main_model, "
         r"lookahead\); dynts expects parameters exactly"),
        ("vllm.v1.core.sched.scheduler:Scheduler", "_free_request_blocks", None,
         r"Scheduler\._free_request_blocks is missing"),
    ],
    ids=["runner-signature", "override-gained-a-parameter", "method-removed"],
)
def test_patch_check_fails_closed_on_a_changed_vllm(
    monkeypatch: pytest.MonkeyPatch, owner: str, name: str, replacement: Any, message: str
) -> None:
    import importlib

    module_name, _, class_name = owner.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if replacement is None:
        monkeypatch.delattr(cls, name)
    else:
        monkeypatch.setattr(cls, name, replacement)
    problems = check_patch_points()
    assert len(problems) == 1 and re.search(message, problems[0]), problems


def test_patch_check_reads_instance_attributes() -> None:
    """Attributes a class sets on ``self`` in its methods count; a name nothing assigns does not."""
    runner = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
    assert check_patch_points((PatchPoint(runner, "read", ("input_batch", "seq_lens"), "attributes", "test"),)) == []
    problems = check_patch_points((PatchPoint(runner, "read", ("seq_lens", "slot_table"), "attributes", "test"),))
    assert problems == [f"{runner} has no attribute(s) ['slot_table']"]


def test_a_changed_vllm_refuses_the_flag_by_patch_point_and_stays_unpatched(
    monkeypatch: pytest.MonkeyPatch, llama_dir: Path
) -> None:
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import dynts.integrations.vllm as plugin

    load_general_plugins()  # the normal registration first: the test's second one is undone afterwards
    hooked = [(EngineArgs, "create_engine_config"), (VllmConfig, "_get_v2_model_runner_unsupported_features"),
              (GPUModelRunner, "initialize_kv_cache"), (GPUModelRunner, "execute_model")]
    for owner, name in hooked:
        monkeypatch.setattr(owner, name, getattr(owner, name))
    monkeypatch.setattr(GPUModelRunner, "_prepare_inputs", _prepare_inputs_of_another_version)
    monkeypatch.setattr(plugin, "_registered", False)
    execute_model = GPUModelRunner.execute_model
    plugin.register()
    assert GPUModelRunner.execute_model is execute_model, "runner hooks were installed on a vLLM that does not match"
    common = dict(model=str(llama_dir), dtype="float32", skip_tokenizer_init=True, max_model_len=512, block_size=32)
    with pytest.raises(ValueError, match=r"additional_config\['dynts'\]: this vLLM .* differs .*"
                                         r"GPUModelRunner\._prepare_inputs takes \(self, batch, num_scheduled_tokens\)"):
        EngineArgs(**common, additional_config={"dynts": VALID}).create_engine_config()
    assert EngineArgs(**common).create_engine_config().scheduler_config.scheduler_cls is None  # plain vLLM still runs


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

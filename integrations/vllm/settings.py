"""What ``additional_config={"dynts": {...}}`` asks for, and the engine features eviction cannot work with.

Everything here runs when the engine config is built (front-end process), so a bad value or an unsupported
feature stops ``LLM(...)`` / ``vllm serve`` with an error that names it, before any engine process starts.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from ...config import CompressionConfig
from ...scorers import SCORERS, Scorer, get_scorer

CONFIG_KEY = "dynts"
# The scheduler the config hook installs; the worker checks for it (a config built without the hook fails closed).
SCHEDULER_CLASS = "dynts.integrations.vllm.scheduler.DynTSScheduler"
# Scorers that run inside vLLM: every one but "external" (a Python callable, which a JSON config cannot carry).
# "predictor" is the learned DynTS head; h2o, snapkv, tova and rkv read the queries the worker captures.
VLLM_SCORERS = ("predictor", "h2o", "snapkv", "tova", "rkv", "window", "streamingllm", "sepllm", "random")


@dataclass(frozen=True)
class DynTSSettings:
    """The parsed ``additional_config["dynts"]`` object.

    compression:      the ``CompressionConfig`` fields (budget, window, keep_ratio, protect_prompt, protect_answer,
                      think_end, granularity) given at the top level of the object.
    scorer:           one of ``VLLM_SCORERS``.
    scorer_kwargs:    constructor arguments of the scorer (e.g. ``{"sinks": 4}``, ``{"separator_ids": [...]}``).
    predictor:        path of a saved DynTS importance predictor (required by, and only allowed with, "predictor").
    suspend_memory_gib: host memory (GiB, per worker) that may hold the K/V of preempted requests, so that they
                      resume with exactly their resident set; a preemption that would exceed it makes the request
                      recompute its tokens when it resumes (within the block bound, but its output may change).
    record_positions: keep each finished request's resident logical positions in the worker (tests, debugging).
    """

    compression: CompressionConfig
    scorer: str = "predictor"
    scorer_kwargs: dict[str, Any] = field(default_factory=dict)
    predictor: str | None = None
    suspend_memory_gib: float = 4.0
    record_positions: bool = False

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "DynTSSettings | None":
        """None when the engine was not asked for dynts (the plugin then changes nothing)."""
        if not isinstance(additional_config, dict) or CONFIG_KEY not in additional_config:
            return None
        values = additional_config[CONFIG_KEY]
        if not isinstance(values, dict):
            raise ValueError(
                f"additional_config['{CONFIG_KEY}'] must be a JSON object of settings, got {type(values).__name__}"
            )
        own = {f.name for f in fields(cls)} - {"compression"}
        compression_fields = set(CompressionConfig.__dataclass_fields__)
        unknown = sorted(set(values) - own - compression_fields)
        if unknown:
            raise ValueError(
                f"additional_config['{CONFIG_KEY}']: unknown field(s) {unknown}; allowed: "
                f"{sorted(own | compression_fields)}"
            )
        field_types = {**typing.get_type_hints(CompressionConfig), **typing.get_type_hints(cls)}
        for name, value in values.items():
            check_json_type(f"additional_config['{CONFIG_KEY}']['{name}']", value, field_types[name], _HINTS.get(name))
        try:
            compression = CompressionConfig.from_dict({k: v for k, v in values.items() if k in compression_fields})
        except (TypeError, ValueError) as error:
            raise ValueError(f"additional_config['{CONFIG_KEY}']: {error}") from error
        settings = cls(compression=compression, **{k: v for k, v in values.items() if k in own})
        settings._validate()
        return settings

    def _validate(self) -> None:
        prefix = f"additional_config['{CONFIG_KEY}']"
        if self.scorer not in VLLM_SCORERS:
            reason = " (it takes a Python callable, which a JSON config cannot carry)" if self.scorer == "external" else ""
            raise ValueError(
                f"{prefix}['scorer']: {self.scorer!r} is not supported in vLLM{reason}; allowed: {list(VLLM_SCORERS)}"
            )
        if not math.isfinite(self.suspend_memory_gib) or self.suspend_memory_gib < 0:
            raise ValueError(
                f"{prefix}['suspend_memory_gib'] must be a finite number >= 0 (GiB), got {self.suspend_memory_gib}"
            )
        if self.scorer == "predictor":
            if not self.predictor:
                raise ValueError(f"{prefix}['predictor']: scorer 'predictor' needs the path of a saved predictor")
            if self.scorer_kwargs:
                raise ValueError(f"{prefix}['scorer_kwargs'] is not used by scorer 'predictor'")
            try:
                self.load_predictor()
            except (OSError, ValueError, KeyError, RuntimeError) as error:
                raise ValueError(
                    f"{prefix}['predictor']: cannot load a predictor head from {self.predictor!r}: {error}"
                ) from error
        elif self.predictor is not None:
            raise ValueError(f"{prefix}['predictor'] is only used with scorer 'predictor' (scorer is {self.scorer!r})")
        else:
            self._check_scorer_kwargs(prefix)
            try:
                # The values' ranges and their fit with the compression settings, checked now with the scorer's own
                # messages (the worker would only find them when its first request binds a scorer).
                self.build_scorer().validate(self.compression)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{prefix}['scorer_kwargs'] for scorer {self.scorer!r}: {error}") from error
        if self.compression.granularity != "shared":
            raise ValueError(
                f"{prefix}['granularity']: only 'shared' is supported in vLLM (the vLLM scorers give one score per "
                f"token), got {self.compression.granularity!r}"
            )
        think_end = self.compression.think_end
        if self.compression.protect_answer and think_end and self.compression.window < len(think_end):
            # A marker split across steps must stay resident until it completes and becomes protected.
            raise ValueError(
                f"{prefix}['window'] must be >= len(think_end) = {len(think_end)} in vLLM, got {self.compression.window}"
            )

    def _check_scorer_kwargs(self, prefix: str) -> None:
        """Names and JSON types of ``scorer_kwargs``, from the scorer constructor's signature and type hints."""
        constructor = SCORERS[self.scorer].__init__
        parameters = {
            name: parameter for name, parameter in list(inspect.signature(constructor).parameters.items())[1:]
            if parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        }
        unknown = sorted(set(self.scorer_kwargs) - set(parameters))
        if unknown:
            raise ValueError(
                f"{prefix}['scorer_kwargs']: unknown argument(s) {unknown} for scorer {self.scorer!r}; allowed: "
                f"{sorted(parameters)}"
            )
        hints = typing.get_type_hints(constructor)
        for name, parameter in parameters.items():
            if name in self.scorer_kwargs:
                check_json_type(f"{prefix}['scorer_kwargs']['{name}']", self.scorer_kwargs[name], hints[name])
            elif parameter.default is inspect.Parameter.empty:
                raise ValueError(
                    f"{prefix}['scorer_kwargs']['{name}'] is required by scorer {self.scorer!r} (expected "
                    f"{describe_json_type(hints[name])})"
                )

    def build_scorer(self, **extra: Any) -> Scorer:
        """A fresh scorer for one request (``extra``: e.g. the loaded predictor head, shared by all requests)."""
        return get_scorer(self.scorer, **self.scorer_kwargs, **extra)

    @property
    def needs_queries(self) -> bool:
        """Whether the scorer reads attention queries (the worker then captures them in every attention layer)."""
        return SCORERS[self.scorer].needs_queries

    @property
    def suspend_memory_bytes(self) -> int:
        return int(self.suspend_memory_gib * 2**30)

    def load_predictor(self) -> tuple[Any, Any]:
        """The predictor head and the identity of the model it was trained on (``dynts.predictor``)."""
        from ...predictor import ImportancePredictor

        return ImportancePredictor.load_with_identity(self.predictor)


# Said after a type error, where the expected JSON type alone does not tell what to give.
_HINTS = {"think_end": "the token ids of the end-of-thinking marker, e.g. dynts.resolve_think_end(tokenizer)"}


def check_json_type(where: str, value: Any, annotation: Any, hint: str | None = None) -> None:
    """Raise TypeError naming ``where`` and the expected type unless ``value`` (parsed JSON) fits ``annotation``.

    Checked before any constructor sees the value, because Python would take some wrong types silently: a string
    where token ids are expected iterates into characters, ``"4" < 0`` fails without naming the field.
    """
    if not _fits(value, annotation):
        note = f" ({hint})" if hint else ""
        raise TypeError(
            f"{where} must be {describe_json_type(annotation)}{note}, got {type(value).__name__} {value!r}"
        )


def _fits(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # JSON numbers: 1 and 1.0 both fit
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin in _ARRAY_ORIGINS:
        return isinstance(value, (list, tuple)) and all(_fits(item, _item_type(annotation)) for item in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict) and all(
            isinstance(key, str) and _fits(item, args[1] if args else Any) for key, item in value.items()
        )
    raise TypeError(f"dynts: no JSON form for the type {annotation!r} (extend settings.check_json_type)")


def describe_json_type(annotation: Any) -> str:
    """How the expected type reads in an error message."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    names = {bool: "true or false", int: "an int", float: "a number", str: "a string", type(None): "null", Any: "any value"}
    if annotation in names:
        return names[annotation]
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_json_type(arg) for arg in args)
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if origin in _ARRAY_ORIGINS:
        item = _item_type(annotation)
        return f"a list of {_PLURALS[item]}" if item in _PLURALS else "a list"
    if origin is dict or annotation is dict:
        return "an object"
    raise TypeError(f"dynts: no JSON form for the type {annotation!r} (extend settings.check_json_type)")


# Annotations that a JSON array satisfies (a string is never one, though Python would iterate it).
_ARRAY_ORIGINS = (list, tuple, collections.abc.Iterable, collections.abc.Sequence)
_PLURALS = {bool: "booleans", int: "ints", float: "numbers", str: "strings"}


def _item_type(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    return args[0] if args else Any


def check_engine(vllm_config: Any, settings: DynTSSettings) -> None:
    """Refuse, by name, the engine features that eviction does not support (yet)."""
    problems: list[str] = []
    cache, scheduler, parallel = vllm_config.cache_config, vllm_config.scheduler_config, vllm_config.parallel_config
    model = vllm_config.model_config
    if cache.enable_prefix_caching:
        problems.append("prefix caching (pass enable_prefix_caching=False / --no-enable-prefix-caching)")
    if scheduler.async_scheduling:
        problems.append("async scheduling (pass async_scheduling=False / --no-async-scheduling)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding (remove speculative_config)")
    if parallel.pipeline_parallel_size > 1:
        problems.append(f"pipeline parallel (pipeline_parallel_size={parallel.pipeline_parallel_size}; use 1)")
    if getattr(parallel, "decode_context_parallel_size", 1) > 1 or getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        problems.append("context parallel (decode/prefill_context_parallel_size must be 1)")
    if vllm_config.kv_transfer_config is not None or getattr(vllm_config, "ec_transfer_config", None) is not None:
        problems.append("KV connectors / KV offloading (remove kv_transfer_config, ec_transfer_config, kv_offloading_size)")
    if cache.cache_dtype != "auto":
        problems.append(f"quantized KV cache (kv_cache_dtype={cache.cache_dtype!r}; use 'auto')")
    if scheduler.scheduler_cls not in (None, SCHEDULER_CLASS):
        problems.append(f"a custom scheduler_cls ({scheduler.scheduler_cls!r}); dynts installs its own scheduler")
    cudagraph_mode = vllm_config.compilation_config.cudagraph_mode
    if settings.needs_queries and cudagraph_mode is not None and cudagraph_mode.has_full_cudagraphs():
        problems.append(full_cudagraph_problem(settings, cudagraph_mode.name))
    if vllm_config.use_v2_model_runner:  # the plugin makes vLLM pick V1 unless something forces V2
        problems.append(
            "Model Runner V2 (selected by VLLM_USE_V2_MODEL_RUNNER=1, HiSparse attention or watermarking; unset "
            "VLLM_USE_V2_MODEL_RUNNER or set it to 0)"
        )
    if model is not None:
        if getattr(model, "runner_type", "generate") != "generate":
            problems.append(f"runner {model.runner_type!r} (only text generation models)")
        if model.get_sliding_window() is not None or _has_non_full_attention_layers(model.hf_text_config):
            problems.append("sliding-window or hybrid attention models (every layer must be full attention)")
        for feature in ("is_hybrid", "is_attention_free", "use_mla", "is_encoder_decoder", "uses_mrope"):
            if getattr(model, feature, False):
                problems.append(f"models with {feature.removeprefix('is_').removeprefix('use_').removeprefix('uses_')}")
        try:
            settings.compression.validate_vocab(model.get_vocab_size())
        except ValueError as error:
            problems.append(f"think_end: {error}")
        if settings.scorer == "predictor":
            problems.extend(_predictor_mismatches(settings, model))
    if problems:
        raise ValueError(
            f"additional_config['{CONFIG_KEY}'] (KV eviction) cannot run with: " + "; ".join(problems)
        )


def full_cudagraph_problem(settings: DynTSSettings, mode: str) -> str:
    return (
        f"full CUDA graphs with scorer {settings.scorer!r} (cudagraph_mode={mode}): attention inside a replayed graph "
        "skips the hook that captures the queries this scorer reads; use cudagraph_mode PIECEWISE (the default the "
        "plugin picks for it) or NONE"
    )


def _predictor_mismatches(settings: DynTSSettings, model: Any) -> list[str]:
    """Size checks of the predictor head against the served model (its weights are checked by the worker)."""
    _, identity = settings.load_predictor()
    text_config = model.hf_text_config
    found = {
        "hidden_size": model.get_hidden_size(), "num_layers": getattr(text_config, "num_hidden_layers", None),
        "vocab_size": model.get_vocab_size(), "model_type": getattr(text_config, "model_type", None),
    }
    return [
        f"predictor: the head was trained on a model with {name} {getattr(identity, name)!r}; this model has {value!r}"
        for name, value in found.items() if value != getattr(identity, name)
    ]


def _has_non_full_attention_layers(hf_text_config: Any) -> bool:
    layer_types = getattr(hf_text_config, "layer_types", None)
    return bool(layer_types) and any(layer_type != "full_attention" for layer_type in layer_types)

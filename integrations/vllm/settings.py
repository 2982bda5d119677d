"""What ``additional_config={"dynts": {...}}`` asks for, and the engine features eviction cannot work with.

Everything here runs when the engine config is built (front-end process), so a bad value or an unsupported
feature stops ``LLM(...)`` / ``vllm serve`` with an error that names it, before any engine process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ...config import CompressionConfig
from ...scorers import SCORERS, Scorer, get_scorer

CONFIG_KEY = "dynts"
# The scheduler the config hook installs; the worker checks for it (a config built without the hook fails closed).
SCHEDULER_CLASS = "dynts.integrations.vllm.scheduler.DynTSScheduler"
# Scorers that run inside vLLM: they need no attention queries. "predictor" is the learned DynTS head.
VLLM_SCORERS = ("predictor", "window", "streamingllm", "sepllm", "random")


@dataclass(frozen=True)
class DynTSSettings:
    """The parsed ``additional_config["dynts"]`` object.

    compression:      the ``CompressionConfig`` fields (budget, window, keep_ratio, protect_prompt, protect_answer,
                      think_end, granularity) given at the top level of the object.
    scorer:           one of ``VLLM_SCORERS``.
    scorer_kwargs:    constructor arguments of the scorer (e.g. ``{"sinks": 4}``, ``{"separator_ids": [...]}``).
    predictor:        path of a saved DynTS importance predictor (required by, and only allowed with, "predictor").
    record_positions: keep each finished request's resident logical positions in the worker (tests, debugging).
    """

    compression: CompressionConfig
    scorer: str = "predictor"
    scorer_kwargs: dict[str, Any] = field(default_factory=dict)
    predictor: str | None = None
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
            needs_queries = self.scorer in SCORERS and SCORERS[self.scorer].needs_queries
            reason = " (it needs attention queries, which the vLLM plugin does not capture yet)" if needs_queries else ""
            raise ValueError(
                f"{prefix}['scorer']: {self.scorer!r} is not supported in vLLM{reason}; allowed: {list(VLLM_SCORERS)}"
            )
        if not isinstance(self.scorer_kwargs, dict):
            raise ValueError(f"{prefix}['scorer_kwargs'] must be an object, got {type(self.scorer_kwargs).__name__}")
        if self.scorer == "predictor":
            if not isinstance(self.predictor, str) or not self.predictor:
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
            try:
                self.build_scorer()  # constructor arguments checked now, with the scorer's own messages
            except (TypeError, ValueError) as error:
                raise ValueError(f"{prefix}['scorer_kwargs'] for scorer {self.scorer!r}: {error}") from error
        if not isinstance(self.record_positions, bool):
            raise ValueError(f"{prefix}['record_positions'] must be true or false, got {self.record_positions!r}")
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

    def build_scorer(self, **extra: Any) -> Scorer:
        """A fresh scorer for one request (``extra``: e.g. the loaded predictor head, shared by all requests)."""
        return get_scorer(self.scorer, **self.scorer_kwargs, **extra)

    def load_predictor(self) -> tuple[Any, Any]:
        """The predictor head and the identity of the model it was trained on (``dynts.predictor``)."""
        from ...predictor import ImportancePredictor

        return ImportancePredictor.load_with_identity(self.predictor)


def check_engine(vllm_config: Any, settings: DynTSSettings) -> None:
    """Refuse, by name, the engine features that eviction does not support (yet)."""
    import vllm.envs as envs

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
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        problems.append("Model Runner V2 (unset VLLM_USE_V2_MODEL_RUNNER or set it to 0)")
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

"""dynts inside vLLM: token eviction with KV block reclamation, enabled per engine by a flag.

    LLM(model, additional_config={"dynts": {"budget": 5000, "window": 2000, "keep_ratio": 0.3,
                                            "scorer": "predictor", "predictor": "/path/to/ip-head"}})
    python -m vllm.entrypoints.openai.api_server --model MODEL --additional-config '{"dynts": {...}}'

``register`` is the ``vllm.general_plugins`` entry point; vLLM runs it in every process (front end, engine core,
workers). It installs hooks that do nothing unless the engine's ``additional_config`` has a ``"dynts"`` object:
without it vLLM behaves exactly as without the plugin.

* config hook (front end): validates the settings and the engine features, turns off prefix caching and async
  scheduling unless they were asked for (then it refuses them), picks piecewise CUDA graphs for scorers that read
  attention queries (refusing full ones by name), installs ``DynTSScheduler``;
* ``DynTSScheduler`` (engine core, ``scheduler.py``): decides compactions, frees tail blocks, allocates by
  physical length;
* model-runner hooks (workers, ``worker.py``): compaction inside the request's blocks, physical slots and lengths,
  scoring of new tokens, attention queries of every layer for the scorers that read them, suspension of preempted
  requests to host memory and their restoration;
* ``DynTSWorkerExtension`` (workers): RPCs for tests and debugging, installed as vLLM's ``worker_extension_cls``.

Every private piece of vLLM these rely on is listed in ``patches.py`` and checked when the plugin loads: a vLLM whose
internals differ refuses the flag, naming what differs, and runs unpatched.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from .patches import check_patch_points
from .settings import CONFIG_KEY, SCHEDULER_CLASS, DynTSSettings, check_engine, full_cudagraph_problem

__all__ = ["SUPPORTED_VLLM", "DynTSWorkerExtension", "register", "unsupported_vllm"]

# The vLLM releases whose internals the hooks were written against (scheduler, block manager, V1 model runner).
SUPPORTED_VLLM = ">=0.32.0,<0.33"
# vLLM mixes this class into every worker of an engine with the flag: ``LLM.collective_rpc("dynts_stats")``.
WORKER_EXTENSION_CLASS = "dynts.integrations.vllm.DynTSWorkerExtension"

logger = logging.getLogger(__name__)
_registered = False


def register() -> None:
    """Entry point: install the hooks (idempotent). On an unsupported vLLM only a hook that refuses the flag."""
    global _registered
    if _registered:
        return
    _registered = True
    import vllm

    reason = unsupported_vllm(vllm.__version__)
    if reason is None:
        problems = check_patch_points()
        if problems:
            reason = (
                f"this vLLM {vllm.__version__} differs from the internals the dynts hooks rely on "
                "(dynts.integrations.vllm.patches): " + "; ".join(problems)
            )
    if reason is not None:
        _install_config_hook(refuse=reason)
        logger.warning("%s; the dynts flag is disabled", reason)
        return
    _install_config_hook(refuse=None)
    _install_runner_hooks()


def unsupported_vllm(version: str) -> str | None:
    """Why this vLLM version cannot run the hooks, or None if it can (local version labels such as +cpu ignored)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if Version(Version(version).base_version) in SpecifierSet(SUPPORTED_VLLM):
        return None
    return f"dynts supports vLLM {SUPPORTED_VLLM}; this is vLLM {version}"


def requested(additional_config: Any) -> bool:
    return isinstance(additional_config, dict) and CONFIG_KEY in additional_config


def prepare_engine_args(engine_args: Any, settings: DynTSSettings) -> None:
    """Defaults that must be chosen before vLLM resolves the engine config."""
    # Features eviction cannot run with are turned off unless the user asked for them (then: a clear error).
    for feature in ("enable_prefix_caching", "async_scheduling"):
        if getattr(engine_args, feature) is None:
            setattr(engine_args, feature, False)
    if not settings.needs_queries:
        return
    from vllm.config.compilation import CUDAGraphMode
    from vllm.platforms import current_platform

    # The query hook runs in Python around each layer's attention: piecewise CUDA graphs leave attention outside the
    # graphs (vLLM's default on CUDA, FULL_AND_PIECEWISE, replays decode attention inside one).
    compilation = engine_args.compilation_config
    mode = compilation.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        raise ValueError(f"additional_config['{CONFIG_KEY}'] (KV eviction) cannot run with: "
                         + full_cudagraph_problem(settings, mode.name))
    if mode is None and current_platform.is_cuda_alike():
        compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE


def prepare_engine_config(vllm_config: Any) -> None:
    """Validate the dynts settings against the engine config and install the dynts scheduler (no-op without them)."""
    settings = DynTSSettings.from_additional_config(vllm_config.additional_config)
    if settings is None:
        return
    check_engine(vllm_config, settings)
    vllm_config.scheduler_config.scheduler_cls = SCHEDULER_CLASS
    parallel = vllm_config.parallel_config
    if not parallel.worker_extension_cls:  # a user's own extension stays (it can subclass DynTSWorkerExtension)
        parallel.worker_extension_cls = WORKER_EXTENSION_CLASS


class DynTSWorkerExtension:
    """Per-worker RPCs of an engine with the flag, for tests and debugging (``collective_rpc``: one result per rank).

    ``dynts_stats``: compactions, evicted tokens, the most blocks one request held, the most requests running at
    once, the pool's free blocks, the preemptions so far and what became of the preempted requests (suspended to
    host memory, restored, recomputed; host bytes held); ``dynts_reset_stats`` zeroes the counters and maxima;
    ``dynts_take_finished_positions``: with ``record_positions``, the resident logical positions of each request
    finished since the last call, by vLLM's request id.
    """

    def dynts_stats(self) -> dict[str, Any]:
        return self._dynts_worker().stats_dict()

    def dynts_reset_stats(self) -> None:
        self._dynts_worker().reset_counters()

    def dynts_take_finished_positions(self) -> dict[str, list[int]]:
        worker = self._dynts_worker()
        positions = dict(worker.finished_positions)
        worker.finished_positions.clear()
        return positions

    def _dynts_worker(self) -> Any:
        dynts = getattr(self.model_runner, "_dynts", None)  # type: ignore[attr-defined]  # set by vLLM's Worker
        if dynts is None:
            raise RuntimeError("dynts: this worker's model runner has no dynts state (the engine runs without the flag)")
        return dynts


def _install_config_hook(refuse: str | None) -> None:
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(create_engine_config)
    def create_engine_config_with_dynts(self: Any, *args: Any, **kwargs: Any) -> Any:
        if refuse is None and requested(self.additional_config):
            prepare_engine_args(self, DynTSSettings.from_additional_config(self.additional_config))
        vllm_config = create_engine_config(self, *args, **kwargs)
        if refuse is not None and requested(vllm_config.additional_config):
            raise ValueError(f"additional_config['{CONFIG_KEY}']: {refuse}")
        prepare_engine_config(vllm_config)
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config_with_dynts
    if refuse is not None:
        return

    # Eviction is implemented for the V1 model runner: make vLLM pick it whenever the flag is on.
    v2_unsupported = VllmConfig._get_v2_model_runner_unsupported_features

    @functools.wraps(v2_unsupported)
    def v2_unsupported_with_dynts(self: Any) -> list[str]:
        features = v2_unsupported(self)
        if requested(self.additional_config):
            features.append("dynts KV eviction")
        return features

    VllmConfig._get_v2_model_runner_unsupported_features = v2_unsupported_with_dynts


def _install_runner_hooks() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .worker import DynTSWorker

    initialize_kv_cache = GPUModelRunner.initialize_kv_cache
    execute_model = GPUModelRunner.execute_model
    prepare_inputs = GPUModelRunner._prepare_inputs

    @functools.wraps(initialize_kv_cache)
    def initialize_kv_cache_with_dynts(
        self: Any, kv_cache_config: Any, is_profiling: bool = False, *args: Any, **kwargs: Any
    ) -> None:
        initialize_kv_cache(self, kv_cache_config, is_profiling, *args, **kwargs)
        self._dynts = None
        settings = DynTSSettings.from_additional_config(self.vllm_config.additional_config)
        if settings is None or is_profiling:
            return
        if self.vllm_config.scheduler_config.scheduler_cls != SCHEDULER_CLASS:
            raise ValueError(
                f"additional_config['{CONFIG_KEY}'] is set but the engine config was not prepared by the dynts plugin "
                f"(scheduler_cls is {self.vllm_config.scheduler_config.scheduler_cls!r}, expected {SCHEDULER_CLASS!r}); "
                "build engines through LLM(...), EngineArgs or vllm serve"
            )
        self._dynts = DynTSWorker(self, settings)

    @functools.wraps(execute_model)
    def execute_model_with_dynts(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        dynts = getattr(self, "_dynts", None)
        if dynts is None:
            return execute_model(self, scheduler_output, *args, **kwargs)
        dynts.before_step(self, scheduler_output)
        output = execute_model(self, scheduler_output, *args, **kwargs)
        dynts.after_forward(self, scheduler_output)
        return output

    @functools.wraps(prepare_inputs)
    def prepare_inputs_with_dynts(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        result = prepare_inputs(self, scheduler_output, *args, **kwargs)
        dynts = getattr(self, "_dynts", None)
        if dynts is not None:
            dynts.before_forward(self, scheduler_output)
        return result

    GPUModelRunner.initialize_kv_cache = initialize_kv_cache_with_dynts
    GPUModelRunner.execute_model = execute_model_with_dynts
    GPUModelRunner._prepare_inputs = prepare_inputs_with_dynts

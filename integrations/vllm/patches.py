"""Every private vLLM function, class and attribute the dynts plugin patches or relies on, in one place.

vLLM's sanctioned extension points carry what they can: the ``vllm.general_plugins`` entry point loads the plugin
in every process, ``scheduler_cls`` installs ``DynTSScheduler``, ``worker_extension_cls`` adds the workers' test and
debugging RPCs (``DynTSWorkerExtension``). What they cannot carry is listed in ``PATCH_POINTS``, each with the reason,
and checked against the installed vLLM when the plugin loads (``check_patch_points``): the object exists and has the
parameters, fields or attributes the plugin's code uses. A mismatch refuses the flag, naming the patch point, and
leaves vLLM untouched, so that a vLLM whose internals moved fails closed instead of evicting the wrong tokens.

Paths and line numbers are those of vLLM 0.32.0. A port of the worker or the scheduler updates this list with it.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Literal

Match = Literal["leading", "exact", "attributes"]


@dataclass(frozen=True)
class PatchPoint:
    """One private piece of vLLM the plugin touches.

    target: ``module:Qualified.name`` of a class or function.
    use:    what the plugin does with it (wrapped, overridden, class swapped, called, read).
    names:  what the plugin's code relies on; checked according to ``match``:
            ``leading``: the callable's first parameters, in this order (the hook passes them positionally);
            ``exact``: the callable's whole parameter list (an override passes every argument on);
            ``attributes``: attributes of the class: class-level (methods, properties, dataclass or NamedTuple
            fields) or assigned as ``self.<name>`` in a method of the class or a base class.
    reason: why a private piece is needed (why no sanctioned extension point suffices).
    """

    target: str
    use: str
    names: tuple[str, ...]
    match: Match
    reason: str

    def problem(self) -> str | None:
        """What differs in the installed vLLM, or None when it matches."""
        try:
            found = _resolve(self.target)
        except (ImportError, AttributeError) as error:
            return f"{self.target} is missing ({error})"
        if self.match == "attributes":
            missing = [name for name in self.names if not _has_attribute(found, name)]
            return f"{self.target} has no attribute(s) {missing}" if missing else None
        try:
            parameters = tuple(inspect.signature(found).parameters)
        except (TypeError, ValueError) as error:
            return f"{self.target} has no readable signature ({error})"
        expected = parameters[: len(self.names)] if self.match == "leading" else parameters
        if expected != self.names:
            wanted = "starting with" if self.match == "leading" else "exactly"
            return f"{self.target} takes ({', '.join(parameters)}); dynts expects parameters {wanted} ({', '.join(self.names)})"
        return None


_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_SCHEDULER = "vllm.v1.core.sched.scheduler:Scheduler"
_MANAGER = "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager"

PATCH_POINTS: tuple[PatchPoint, ...] = (
    # ------------------------------------------------------------------ front end: the engine config (__init__.py)
    PatchPoint(
        "vllm.engine.arg_utils:EngineArgs.create_engine_config", "wrapped", ("self",), "leading",
        "arg_utils.py:2205. The flag lives in additional_config; turning prefix caching and async scheduling off "
        "(None = not asked for) must happen before vLLM resolves them, and scheduler_cls / worker_extension_cls must "
        "be set on the built config. No plugin hook runs between argument parsing and config creation.",
    ),
    PatchPoint(
        "vllm.engine.arg_utils:EngineArgs", "read",
        ("additional_config", "enable_prefix_caching", "async_scheduling"), "attributes",
        "the engine arguments the config hook reads and defaults (see create_engine_config).",
    ),
    PatchPoint(
        "vllm.config.compilation:CompilationConfig", "read and set", ("cudagraph_mode",), "attributes",
        "config/compilation.py:610. Scorers that read attention queries need attention outside CUDA graphs: the config "
        "hook sets PIECEWISE when the user chose no mode (vLLM's CUDA default, FULL_AND_PIECEWISE, replays decode "
        "attention inside a full graph) and refuses a mode with full graphs by name.",
    ),
    PatchPoint(
        "vllm.config.compilation:CUDAGraphMode", "read", ("PIECEWISE", "has_full_cudagraphs"), "attributes",
        "config/compilation.py:53. The modes the config hook picks or refuses.",
    ),
    PatchPoint(
        "vllm.platforms.interface:Platform.is_cuda_alike", "called", ("self",), "exact",
        "platforms/interface.py. CUDA graphs (and so the piecewise default) exist on CUDA-like platforms only.",
    ),
    PatchPoint(
        "vllm.config:VllmConfig._get_v2_model_runner_unsupported_features", "wrapped", ("self",), "exact",
        "config/vllm.py:2914, read by VllmConfig.use_v2_model_runner (config/vllm.py:703). The hooks are written for "
        "the V1 runner; this is how vLLM picks V1 per engine (VLLM_USE_V2_MODEL_RUNNER would be process-wide).",
    ),
    # ------------------------------------------------------------------ worker: the V1 model runner (worker.py)
    PatchPoint(
        f"{_RUNNER}.initialize_kv_cache", "wrapped", ("self", "kv_cache_config", "is_profiling"), "leading",
        "gpu_model_runner.py:7055. The KV tensors exist from here on: the dynts worker state is built on them. "
        "worker_extension_cls only adds methods to the Worker; it cannot run code on the runner's own calls.",
    ),
    PatchPoint(
        f"{_RUNNER}.execute_model", "wrapped", ("self", "scheduler_output"), "leading",
        "gpu_model_runner.py:3939. Compactions run before vLLM's _update_states reuses the blocks the scheduler "
        "freed; new tokens are scored after the forward, from execute_model_state.hidden_states.",
    ),
    PatchPoint(
        f"{_RUNNER}._prepare_inputs", "wrapped", ("self", "scheduler_output"), "leading",
        "gpu_model_runner.py:1920. Write slots and attention lengths become physical after vLLM computed the logical "
        "ones; positions stay logical (RoPE). Restored K/V go into the blocks vLLM's _update_states gave a resumed "
        "request (after any zeroing of new blocks). No hook exists between input preparation and the forward.",
    ),
    PatchPoint(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward", "wrapped per instance",
        ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"), "leading",
        "cpu_attn.py:344. Scorers that read queries (h2o, snapkv, tova, rkv) need each layer's post-RoPE queries after "
        "the layer stored its keys: vLLM calls impl.forward from the body of its opaque attention custom op, with the "
        "step's queries first. The wrapper is an attribute of each impl instance of an engine with such a scorer "
        "(the class stays untouched). No attention hook or query output exists in vLLM.",
    ),
    PatchPoint(
        "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl.forward", "wrapped per instance",
        ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"), "leading",
        "flash_attn.py:1177. As CPUAttentionBackendImpl.forward, for the CUDA path.",
    ),
    PatchPoint(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl", "read", ("scale",), "attributes",
        "the attention scale the scorers use (HF: the attention module's scaling).",
    ),
    PatchPoint(
        "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl", "read", ("scale",), "attributes",
        "as CPUAttentionBackendImpl.scale.",
    ),
    PatchPoint(
        "vllm.model_executor.layers.attention.attention:Attention", "read", ("impl", "kv_cache"), "attributes",
        "the attention layers of static_forward_context: their backend impl (wrapped, its scale read) and their KV "
        "cache tensor (scorers read a request's keys from it).",
    ),
    PatchPoint(
        "vllm.model_executor.models.utils:extract_layer_index", "called", ("layer_name",), "leading",
        "models/utils.py. Orders the attention layers by their index in the model (scorers keep per-layer state).",
    ),
    PatchPoint(
        "vllm.distributed:tensor_model_parallel_all_gather", "called", ("input_", "dim"), "leading",
        "distributed/communication_op.py. Attention scores are partial on each tensor-parallel rank (its share of the "
        "heads): ranks gather them before choosing, so that every rank keeps the same tokens.",
    ),
    PatchPoint(
        _RUNNER, "read",
        ("requests", "input_batch", "positions", "query_start_loc", "seq_lens", "optimistic_seq_lens_cpu",
         "req_indices", "kv_caches", "execute_model_state", "compilation_config", "kv_cache_config", "model_config",
         "parallel_config", "vllm_config", "device", "get_model"),
        "attributes",
        "the runner state the worker hooks read and rewrite (seq_lens, slot mapping), compact, save and restore "
        "(kv_caches).",
    ),
    PatchPoint(
        "vllm.v1.worker.gpu_model_runner:ExecuteModelState", "read", ("hidden_states",), "attributes",
        "final-norm hidden states of the step's tokens (the predictor scores them).",
    ),
    PatchPoint(
        "vllm.v1.worker.gpu_input_batch:InputBatch", "read",
        ("req_id_to_index", "req_ids", "num_reqs", "num_computed_tokens_cpu", "token_ids_cpu", "block_table"),
        "attributes",
        "the persistent batch: row of each request, its computed length and token ids, its block-table row.",
    ),
    PatchPoint(
        "vllm.v1.worker.gpu_input_batch:CachedRequestState", "read", ("block_ids",), "attributes",
        "a request's block list on the worker, cut after a compaction to the blocks the scheduler kept. A preempted "
        "request keeps its old list until it resumes (gpu_model_runner.py:1212-1232): its resident blocks are saved "
        "from it; a resumed one gets its new list in _update_states, where the saved blocks are restored.",
    ),
    PatchPoint(
        "vllm.v1.worker.block_table:MultiGroupBlockTable.compute_slot_mapping", "called",
        ("self", "num_reqs", "query_start_loc", "positions"), "leading",
        "block_table.py:283. Recomputes the write slots from physical positions.",
    ),
    PatchPoint(
        "vllm.v1.worker.block_table:BlockTable", "read", ("block_table", "num_blocks_per_row"), "attributes",
        "the block-table row of a compacted request is truncated in place.",
    ),
    PatchPoint(
        "vllm.v1.utils:CpuGpuBuffer", "read", ("gpu", "np"), "attributes",
        "the runner's req_indices / query_start_loc and the block table are such buffers.",
    ),
    PatchPoint(
        "vllm._custom_ops:cpu_attn_reshape_and_cache", "called",
        ("key", "value", "key_cache", "value_cache", "slot_mapping", "isa", "k_scale", "v_scale", "kv_cache_dtype"),
        "exact",
        "_custom_ops.py:3883. The CPU backend's own KV write op, used to probe its block layout (cpu_layout.py).",
    ),
    # ------------------------------------------------------------------ engine core: the scheduler (scheduler.py)
    PatchPoint(
        f"{_SCHEDULER}.__init__", "overridden", ("self", "vllm_config", "kv_cache_config"), "leading",
        "scheduler.py:85. DynTSScheduler is installed through scheduler_cls (sanctioned); it subclasses Scheduler.",
    ),
    PatchPoint(
        f"{_SCHEDULER}._preempt_request", "overridden", ("self", "request"), "leading",
        "scheduler.py:1571. Preemption is where a request is suspended (its logical and physical length read before "
        "vLLM sets num_computed_tokens to 0; a Suspend command for the workers); no connector or public event fires "
        "on it (KVConnectorBase_V1.request_finished does not).",
    ),
    PatchPoint(
        f"{_SCHEDULER}._free_request_blocks", "overridden", ("self", "request"), "exact",
        "scheduler.py:2766. The one place where preemption and finishing (abort included) free a request's blocks: "
        "the eviction state of a finished request (or one preempted past the host-memory cap) is dropped there, a "
        "suspended one's kept.",
    ),
    PatchPoint(
        f"{_SCHEDULER}._get_local_prefix_cache_hit", "overridden", ("self", "request"), "exact",
        "scheduler.py:558, returns (blocks, computed tokens, shared-prefix boundary, diverged). Called when a waiting "
        "request with no computed tokens is admitted (scheduler.py:960-967): for a suspended one it reports the "
        "saved logical length as computed with KVCacheManager.empty_kv_cache_blocks, so vLLM allocates blocks for "
        "its physical length plus the new tokens only (kv_cache_manager.py:371-583) and schedules just those. "
        "vLLM's KV connectors would do this through an asynchronous-load path keyed by prefix-cache hashes, which "
        "compacted blocks do not have, and would exclude users' own connectors.",
    ),
    PatchPoint(
        f"{_SCHEDULER}._reserve_prefill_lookahead", "overridden",
        ("self", "request", "num_computed_tokens", "num_new_tokens"), "exact",
        "scheduler.py:570, called on every request's token count of a step just before its blocks are allocated "
        "(running and waiting loops). A request recomputing its tokens past the host-memory cap stops each chunk at "
        "its compaction trigger, so that it never holds more than the block bound. No per-request chunk limit "
        "exists otherwise (long_prefill_token_threshold is global).",
    ),
    PatchPoint(
        _SCHEDULER, "read", ("running", "kv_cache_manager", "schedule", "block_size"), "attributes",
        "the running requests are compacted before each schedule(); the manager gives blocks back.",
    ),
    PatchPoint(
        "vllm.v1.core.kv_cache_manager:KVCacheManager", "read", ("coordinator", "block_pool", "empty_kv_cache_blocks"),
        "attributes",
        "the full-attention manager is reached through the coordinator; the pool's free count goes to the workers; "
        "a resumed suspended request adopts no cached block (empty_kv_cache_blocks).",
    ),
    PatchPoint(
        "vllm.v1.kv_cache_interface:KVCacheConfig", "read", ("kv_cache_groups",), "attributes",
        "the KV cache groups: one full-attention group is required (scheduler and worker).",
    ),
    PatchPoint(
        "vllm.v1.kv_cache_interface:KVCacheGroupSpec", "read", ("kv_cache_spec", "layer_names"), "attributes",
        "a group's spec and layers: the host bytes a suspended request's blocks take (page size x layers).",
    ),
    PatchPoint(
        "vllm.v1.kv_cache_interface:FullAttentionSpec", "read", ("block_size", "page_size_bytes"), "attributes",
        "block size and bytes of one block of one layer.",
    ),
    PatchPoint(
        "vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator", "read", ("single_type_managers",), "attributes",
        "the managers whose class is swapped (below).",
    ),
    PatchPoint(
        f"{_MANAGER}.get_num_blocks_to_allocate", "class swapped",
        ("self", "request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens",
         "num_local_computed_tokens", "num_tokens_main_model", "apply_admission_cap", "prefill_end"),
        "exact",
        "single_type_kv_cache_manager.py:175. The manager instance's class becomes a subclass that allocates by "
        "physical length. KVCacheSpecRegistry (kv_cache_spec_registry.py) picks managers by spec type for the whole "
        "process, so registering one there would change engines without the flag, and a dynts spec type would need "
        "another runner patch (the worker reports the specs).",
    ),
    PatchPoint(
        f"{_MANAGER}.allocate_new_blocks", "class swapped", ("self", "request_id", "num_tokens", "num_tokens_main_model"),
        "exact", "single_type_kv_cache_manager.py:369. As get_num_blocks_to_allocate.",
    ),
    PatchPoint(
        _MANAGER, "read", ("req_to_blocks", "block_size", "block_pool"), "attributes",
        "the blocks past a compacted request's kept slots go back to the pool at once.",
    ),
    PatchPoint(
        "vllm.v1.core.block_pool:BlockPool.free_blocks", "called", ("self", "ordered_blocks"), "exact",
        "block_pool.py:774. Frees the tail blocks of a compacted request.",
    ),
    PatchPoint(
        "vllm.v1.request:Request", "read", ("request_id", "num_computed_tokens", "num_prompt_tokens", "all_token_ids"),
        "attributes",
        "the logical length and tokens of a request (compaction timing, end-of-thinking detection).",
    ),
    PatchPoint(
        "vllm.v1.core.sched.output:SchedulerOutput", "read",
        ("scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens", "total_num_scheduled_tokens",
         "finished_req_ids", "preempted_req_ids"),
        "attributes",
        "what the worker hooks read of a step; the scheduler attaches its compaction plan as an extra attribute.",
    ),
    PatchPoint(
        "vllm.v1.core.sched.output:CachedRequestData", "read", ("resumed_req_ids",), "attributes",
        "a resumed request takes back its suspended state, or starts fresh when it recomputes.",
    ),
)


def check_patch_points(points: tuple[PatchPoint, ...] = PATCH_POINTS) -> list[str]:
    """The problems of the installed vLLM against ``points`` (empty: every patch point matches)."""
    return [problem for point in points if (problem := point.problem()) is not None]


def _resolve(target: str) -> Any:
    module_name, _, qualified_name = target.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in qualified_name.split("."):
        found = getattr(found, part)
    return found


def _has_attribute(cls: type, name: str) -> bool:
    if hasattr(cls, name) or name in getattr(cls, "__dataclass_fields__", {}):
        return True
    return any(name in _assigned_on_self(klass) for klass in cls.__mro__ if klass is not object)


@functools.lru_cache(maxsize=None)
def _assigned_on_self(cls: type) -> frozenset[str]:
    """Names assigned as ``self.<name>`` anywhere in the class body (instance attributes set in its methods)."""
    try:
        tree = _module_tree(inspect.getsourcefile(cls))
    except (OSError, TypeError):  # built-in, or source not shipped
        return frozenset()
    names = set()
    for class_node in ast.walk(tree):
        if not isinstance(class_node, ast.ClassDef) or class_node.name != cls.__name__:
            continue
        for node in ast.walk(class_node):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            else:
                continue
            for target in targets:
                for part in ast.walk(target):
                    if isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name) and part.value.id == "self":
                        names.add(part.attr)
    return frozenset(names)


@functools.lru_cache(maxsize=None)
def _module_tree(path: str | None) -> ast.Module:
    """One parse per source file (inspect.getsource would re-parse the module for every class)."""
    if path is None:
        raise OSError("no source file")
    with open(path, encoding="utf-8") as source:
        return ast.parse(source.read())

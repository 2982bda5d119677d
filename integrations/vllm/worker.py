"""Worker side: compaction inside each request's own blocks, physical slots and lengths, scoring of new tokens,
suspension of preempted requests.

Hooks on vLLM's V1 model runner (``GPUModelRunner``, which ``CPUModelRunner`` subclasses), installed by the plugin
and active only on engines with ``additional_config["dynts"]``:

* before a step (ahead of vLLM's own state update, and ahead of the forward pass that may write into blocks the
  scheduler freed): drop finished requests, run the step's ``Compaction`` commands (the scorer scores the request's
  slots, ``dynts.policy`` picks the kept ones, the K/V move inside the request's blocks, its block list is cut to the
  blocks the scheduler kept), save the K/V of suspended requests to host memory and park their slot tables, start
  fresh state for new requests and for resumed ones that recompute, take back the parked state of restored ones;
* after the inputs are prepared (vLLM has given resumed requests their new blocks): copy restored K/V into them;
  positions stay logical (RoPE), while the write slots and the attention lengths become physical
  (``logical - evicted``); each request's new slots are claimed;
* inside the forward pass, for scorers that read queries (h2o, snapkv, tova, rkv): each attention layer's
  ``impl.forward`` is wrapped (an instance attribute, on this engine only) to hand the layer's post-RoPE queries of
  each request to its scorer right after the layer wrote its keys;
* after the forward: each request's new tokens get their logical positions recorded, and the scorer sees them (the
  predictor reads their final-norm hidden states).

Per-request bookkeeping is the core's ``SlotTable`` with one row: the logical position of every physical slot and
the scorer's per-slot state, compacted with the same kernels as HF; the keep-set comes from ``dynts.policy``'s
``plan_compaction``, as in HF. Scorers read a request's keys from the paged cache (``CacheView.keys``). With tensor
parallelism each rank holds a share of the heads, so attention scores are partial: every rank averages them over
all ranks before choosing, and so keeps the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ... import kernels
from ...device import to_device
from ...policy import OverflowNotice, plan_compaction, request_spans, to_granularity
from ...scorers import CacheView, ModelGeometry, Scorer, Step
from ...slots import SlotTable
from ...stats import CacheStats
from .cpu_layout import CPUBlockLayout
from .protocol import ATTRIBUTE, Compaction, StepPlan, Suspend
from .settings import SCHEDULER_CLASS, DynTSSettings


class _RequestSlots:
    """One request's slots on the worker: the logical position per physical slot, and its scorer's state."""

    def __init__(
        self, settings: DynTSSettings, scorer: Scorer, geometry: ModelGeometry, device: torch.device,
        dtype: torch.dtype, keys: Callable[[int], torch.Tensor],
    ) -> None:
        config = settings.compression
        self.config = config
        self.table = SlotTable(rows=1, capacity=config.trigger, layers_g=1, heads_g=1, num_layers=geometry.num_layers,
                               kv_heads=geometry.kv_heads, device=device)
        self.row_index = torch.zeros(1, dtype=torch.long, device=device)  # the table's one row, as kernels take it
        self.scorer = scorer
        # dtype: the model's, as the K/V of an HF DynTSCache (scorers such as the predictor run in it).
        scorer.bind(CacheView(self.table, geometry, config, dtype, keys=keys))
        self.logical_len = 0
        self.step: Step | None = None  # the forward pass in progress (its slots are claimed)

    @property
    def physical_len(self) -> int:
        return self.table.physical_len_host[0]

    @property
    def evicted(self) -> int:
        return self.logical_len - self.physical_len

    @property
    def attended_len(self) -> int:
        """Slots the current forward pass attends to: those held plus its new tokens' (written before attention)."""
        return self.physical_len + (0 if self.step is None else self.step.slots.shape[1])

    def begin(self, num_new: int) -> None:
        """Before a forward pass writes ``num_new`` tokens: claim their slots (next physical ones, whose state is
        reset there) so that scorers may read their keys and accumulate into them during the pass."""
        table = self.table
        table.ensure_capacity(self.physical_len + num_new)
        device = table.device
        slots = table.write_slots(num_new)
        table.claim(slots)
        self.step = Step(
            input_ids=None, hidden_states=None, slots=slots,
            positions=self.logical_len + torch.arange(num_new, device=device).view(1, -1),
            stored=torch.ones(1, num_new, dtype=torch.bool, device=device), key_len=table.physical_len + num_new,
            query_count=to_device([num_new], device), key_start=torch.zeros(1, dtype=torch.long, device=device),
        )

    def commit(self, token_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """After the pass: record its tokens at their slots and logical positions, then let the scorer see them."""
        step, self.step = self.step, None
        if step is None or step.slots.shape[1] != token_ids.shape[-1]:
            raise RuntimeError("dynts: a request's forward pass ended without the matching begin")
        table = self.table
        step.input_ids = token_ids.view(1, -1).to(table.device)
        step.hidden_states = hidden_states.unsqueeze(0)
        table.set_positions(step.slots, step.positions)
        table.grow_lengths([step.slots.shape[1]])
        self.logical_len += step.slots.shape[1]
        with torch.no_grad():
            self.scorer.on_step(step)

    def observe_queries(self, layer: int, queries: torch.Tensor) -> None:
        """``queries`` [new, q_heads, head_dim] (post-RoPE) of ``layer`` in the current pass; its keys are stored."""
        with torch.no_grad():
            self.scorer.on_layer(layer, queries.transpose(0, 1).unsqueeze(0), self.step)

    def plan(
        self, command: Compaction, combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Keep indices ([1, 1, 1, K]), keep count ([1], on the device) and overflow flag of a compaction, by
        ``dynts.policy``.

        combine: maps the scorer's [layers_x, 1, heads_x, slots] scores to what every tensor-parallel rank agrees on.
        """
        if (self.logical_len, self.physical_len) != (command.logical_len, command.physical_len):
            raise RuntimeError(
                f"dynts: request {command.req_id!r} is out of step between scheduler and worker: the scheduler "
                f"compacts it at logical/physical length {command.logical_len}/{command.physical_len}, the worker "
                f"holds {self.logical_len}/{self.physical_len}"
            )
        table = self.table
        with torch.no_grad():
            scores = self.scorer.score(self.row_index)
            if combine is not None:
                scores = combine(scores)
            plan = plan_compaction(
                scores, table.positions, table.physical_len_host,
                [request_spans(self.config, command.prompt_end, command.answer_start)], self.config,
                num_layers=table.num_layers, kv_heads=table.kv_heads,
            )
        (kept,), (overflow,) = plan.read()
        if kept != command.keep_count:
            raise RuntimeError(
                f"dynts: request {command.req_id!r}: the policy keeps {kept} slots but the "
                f"scheduler planned {command.keep_count} (protected spans disagree)"
            )
        return plan.keep_index, plan.keep_count, overflow

    def compact(self, keep_index: torch.Tensor, keep_count: torch.Tensor, kept: int) -> None:
        """Move the slot state as the plan moved the K/V: ``keep_count`` on the device, ``kept`` (the plan's count
        as read, the scheduler's) on the host."""
        self.table.compact(self.row_index, keep_index, keep_count)
        self.table.physical_len_host[0] = kept

    def resident_positions(self) -> list[int]:
        return self.table.resident_positions(0)[0].tolist()


@dataclass
class _Suspended:
    """A preempted request's parked state: its slot table and scorer, and the K/V of its first blocks (one host
    tensor per KV cache tensor, in the cache's own block layout)."""

    slots: _RequestSlots
    blocks: list[torch.Tensor]
    num_blocks: int

    @property
    def nbytes(self) -> int:
        return sum(block.nbytes for block in self.blocks)


@dataclass
class PoolStats:
    """What the worker sees of vLLM's block pool (sent by the scheduler with each step)."""

    num_free_blocks: int | None = None
    num_preemptions: int = 0
    peak_running: int = 0
    max_blocks_per_request: int = 0
    max_tokens_per_step: int = 0  # the most tokens one request computed in one step (its largest prefill chunk)
    # Preempted requests: suspended to host memory (after at least one eviction), restored; past the host-memory cap,
    # resumed by recomputing (preempted after at least one eviction); host bytes their K/V take now and at most.
    suspended: int = 0
    suspended_after_eviction: int = 0
    restored: int = 0
    recomputed: int = 0
    recomputed_after_eviction: int = 0
    max_blocks_at_resume: int = 0  # the most blocks a request held in the step that resumed it
    suspended_bytes: int = 0
    peak_suspended_bytes: int = 0


class DynTSWorker:
    """The dynts state of one model runner."""

    def __init__(self, runner: Any, settings: DynTSSettings) -> None:
        from vllm.distributed import get_tensor_model_parallel_world_size

        self.settings = settings
        self.device = runner.device
        model_config = runner.model_config
        self.model_dtype = model_config.dtype
        # Attention layers in model order: scorers keep per-layer state (recent queries, H2O sums) by this index.
        self.layers = _attention_layers(runner)
        self.geometry = ModelGeometry(
            num_layers=len(self.layers),
            q_heads=model_config.get_num_attention_heads(runner.parallel_config),  # this rank's share
            kv_heads=model_config.get_num_kv_heads(runner.parallel_config),
            head_dim=model_config.get_head_size(),
            scale=float(self.layers[0].impl.scale),  # the model's own attention scale, as HF's module.scaling
        )
        groups = runner.kv_cache_config.kv_cache_groups
        self.block_size = groups[0].kv_cache_spec.block_size
        kernel_block_sizes = getattr(runner, "_kernel_block_sizes", [self.block_size])
        if list(kernel_block_sizes) != [self.block_size]:
            raise ValueError(
                f"dynts: the attention kernel block size {kernel_block_sizes} must equal the KV cache block size "
                f"({self.block_size}); pick a block_size the attention backend supports natively"
            )
        self.kv_caches = _unique_tensors(runner.kv_caches)
        self.cpu_layout = self._cpu_layout() if self.device.type == "cpu" else None
        if self.cpu_layout is None:
            self._check_paged_layout()
        self.tensor_parallel = get_tensor_model_parallel_world_size()
        self.scorer_extra = {"predictor": _load_predictor(settings, runner)} if settings.scorer == "predictor" else {}
        self.runner = runner
        self.requests: dict[str, _RequestSlots] = {}
        self.suspended: dict[str, _Suspended] = {}
        self._restores: list[tuple[str, _Suspended]] = []  # restored this step, K/V copied once the blocks are known
        self._resumed: set[str] = set()  # resumed this step (restored or recomputing)
        self._forward: list[tuple[_RequestSlots, int, int]] | None = None  # (slots, first token, count) per request
        self.finished_positions: dict[str, list[int]] = {}
        self.stats = CacheStats(history_limit=0)
        self.pool = PoolStats()
        self._overflow = OverflowNotice()
        if settings.needs_queries:
            self._capture_queries()

    def stats_dict(self) -> dict[str, Any]:
        """Compaction counters and block-pool observations, as one plain dict (read by tests through RPC)."""
        return {**self.stats.as_dict(), **asdict(self.pool)}

    def reset_counters(self) -> None:
        """Start the compaction counters and the pool peaks afresh (the pool's current state is kept)."""
        self.stats = CacheStats(history_limit=0)
        self.pool = PoolStats(num_free_blocks=self.pool.num_free_blocks, num_preemptions=self.pool.num_preemptions,
                              suspended_bytes=self.pool.suspended_bytes)

    # ------------------------------------------------------------------ set-up
    def _cpu_layout(self) -> CPUBlockLayout:
        backends = {type(layer.impl).__name__ for layer in self.layers}
        isas = {getattr(layer, "isa", None) for layer in self.layers}
        if backends != {"CPUAttentionBackendImpl"} or len(isas) != 1 or None in isas:
            raise ValueError(f"dynts on CPU needs vLLM's CPU_ATTN backend on every layer; found {sorted(backends)}")
        cache = self.kv_caches[0]
        if cache.dim() != 4 or cache.shape[2] != self.block_size:
            raise ValueError(
                f"dynts: unexpected CPU KV cache shape {tuple(cache.shape)} (expected [blocks, heads, "
                f"{self.block_size}, 2 * head_size])"
            )
        return CPUBlockLayout.probe(self.block_size, cache.shape[3] // 2, cache.dtype, isas.pop())

    def _check_paged_layout(self) -> None:
        token_shape = (self.block_size, self.geometry.kv_heads, self.geometry.head_dim)
        heads, head_size = token_shape[1:]
        for cache in self.kv_caches:
            # [2, blocks, block_size, heads, head_size] or [blocks, 2, ...]: K/V plane first or block first
            if cache.dim() != 5 or 2 not in (cache.shape[0], cache.shape[1]) or tuple(cache.shape[2:]) != token_shape:
                raise ValueError(
                    f"dynts: unsupported KV cache layout {tuple(cache.shape)} on {self.device}; supported: vLLM's CPU "
                    f"backend and FlashAttention's [2, blocks, {self.block_size}, {heads}, {head_size}] (or blocks first)"
                )

    def _capture_queries(self) -> None:
        """Wrap each attention layer's ``impl.forward`` (this engine's instances only) to hand the layer's queries
        to the scorers after the layer ran: by then the step's keys are in the cache. vLLM calls ``impl.forward``
        from the body of its attention custom op, which runs eagerly in compiled models and between the pieces of
        piecewise CUDA graphs (the config hook refuses full graphs for these scorers)."""
        for index, layer in enumerate(self.layers):
            impl = layer.impl
            original = impl.__dict__.get("_dynts_original_forward", impl.forward)  # a re-initialised cache: once

            def forward_with_queries(attention_layer: Any, query: torch.Tensor, *args: Any, _index: int = index,
                                     _original: Callable[..., torch.Tensor] = original, **kwargs: Any) -> torch.Tensor:
                output = _original(attention_layer, query, *args, **kwargs)
                self.observe_queries(_index, query)
                return output

            impl._dynts_original_forward = original
            impl.forward = forward_with_queries

    # ------------------------------------------------------------------ keys in the paged cache
    def request_keys(self, req_id: str, layer: int) -> torch.Tensor:
        """[1, kv_heads, n, head_size]: the keys of a request's first n slots in ``layer`` (n: the slots it holds,
        plus the current pass's new ones during a forward pass), in slot order (``CacheView.keys``)."""
        slots = self.requests[req_id]
        length = slots.attended_len
        block_ids = self.runner.requests[req_id].block_ids[0]
        cache = self.layers[layer].kv_cache
        if self.cpu_layout is not None:
            return self.cpu_layout.gather_keys(cache, block_ids, length).unsqueeze(0)
        table = torch.as_tensor(block_ids[: -(-length // self.block_size)], dtype=torch.long, device=self.device)
        keys = _plane_first(cache)[0].index_select(0, table).flatten(0, 1)[:length]  # [n, kv_heads, head_size]
        return keys.transpose(0, 1).unsqueeze(0)

    def _combine_ranks(self, scores: torch.Tensor) -> torch.Tensor:
        """Attention scores of a rank cover its own heads: average them over every rank (all ranks then hold the
        same [1, 1, 1, slots] scores, bit for bit: each sums the same gathered values in the same order)."""
        from vllm.distributed import tensor_model_parallel_all_gather

        geometry = self.geometry
        shared = to_granularity(scores, 1, 1, geometry.num_layers, geometry.kv_heads).float().contiguous()
        return tensor_model_parallel_all_gather(shared, dim=0).mean(dim=0, keepdim=True)

    # ------------------------------------------------------------------ step hooks
    def before_step(self, runner: Any, scheduler_output: Any) -> None:
        plan: StepPlan | None = getattr(scheduler_output, ATTRIBUTE, None)
        if plan is None:
            raise RuntimeError(
                f"dynts: the scheduler sent no dynts plan; the engine must use {SCHEDULER_CLASS} (installed by the "
                "dynts plugin's config hook)"
            )
        for req_id in scheduler_output.finished_req_ids:  # an aborted suspended request goes here too
            slots = self.requests.pop(req_id, None)
            suspended = self.suspended.pop(req_id, None)
            if suspended is not None:
                slots = suspended.slots
                self.pool.suspended_bytes -= suspended.nbytes
            if slots is not None and self.settings.record_positions:
                self.finished_positions[req_id] = slots.resident_positions()
        for command in plan.compactions:  # a request compacted, then preempted, in this step: compacted first
            self._compact(runner, command)
        for command in plan.suspends:  # before this step's forward pass writes into the blocks they gave back
            self._suspend(runner, command)
        for req_id in scheduler_output.preempted_req_ids or ():
            dropped = self.requests.pop(req_id, None)  # not suspended (past the host-memory cap): recomputes
            self.pool.recomputed_after_eviction += int(dropped is not None and dropped.evicted > 0)
        cached = scheduler_output.scheduled_cached_reqs
        restores = set(plan.restores)
        self._resumed = set(cached.resumed_req_ids)
        for new in scheduler_output.scheduled_new_reqs:
            self.requests[new.req_id] = self._new_request(new.req_id)
        for req_id in cached.resumed_req_ids:
            if req_id in restores:
                suspended = self.suspended.pop(req_id)
                self.requests[req_id] = suspended.slots
                self._restores.append((req_id, suspended))
            else:  # preempted past the host-memory cap: it recomputes its tokens
                self.requests[req_id] = self._new_request(req_id)
                self.pool.recomputed += 1
        self._record_pool(plan)

    def _new_request(self, req_id: str) -> _RequestSlots:
        scorer = self.settings.build_scorer(**self.scorer_extra)
        return _RequestSlots(self.settings, scorer, self.geometry, self.device, self.model_dtype,
                             keys=lambda layer: self.request_keys(req_id, layer))

    def _compact(self, runner: Any, command: Compaction) -> None:
        slots = self.requests[command.req_id]
        combine = self._combine_ranks if self.tensor_parallel > 1 and self.settings.needs_queries else None
        keep_index, keep_count, overflow = slots.plan(command, combine)
        block_ids = runner.requests[command.req_id].block_ids[0]
        if self.cpu_layout is not None:
            self.cpu_layout.compact_(self.kv_caches, block_ids, keep_index[0, 0, 0], command.keep_count)
        else:
            table = torch.as_tensor([block_ids], dtype=torch.long, device=self.device)
            kernels.compact_paged_([_plane_first(cache) for cache in self.kv_caches], table, keep_index, keep_count)
        slots.compact(keep_index, keep_count, command.keep_count)
        self._truncate_blocks(runner, command.req_id, -(-command.keep_count // self.block_size))
        self.stats.compactions += 1
        self.stats.evicted_tokens += command.physical_len - command.keep_count
        self._overflow.check([overflow])

    def _suspend(self, runner: Any, command: Suspend) -> None:
        """Copy the K/V of the request's resident slots (whole blocks: compaction packed them at the front) to host
        memory and park its slot table; vLLM keeps the old block list on the runner until the request resumes."""
        slots = self.requests.pop(command.req_id)
        if slots.physical_len != command.physical_len:
            raise RuntimeError(
                f"dynts: request {command.req_id!r} is suspended with {command.physical_len} slots by the scheduler "
                f"but holds {slots.physical_len} on the worker"
            )
        num_blocks = -(-command.physical_len // self.block_size)
        blocks = torch.as_tensor(runner.requests[command.req_id].block_ids[0][:num_blocks], dtype=torch.long,
                                 device=self.device)
        saved = [_to_host(view.index_select(dim, blocks)) for view, dim in map(self._block_view, self.kv_caches)]
        suspended = self.suspended[command.req_id] = _Suspended(slots, saved, num_blocks)
        pool = self.pool
        pool.suspended += 1
        pool.suspended_after_eviction += int(slots.evicted > 0)
        pool.suspended_bytes += suspended.nbytes
        pool.peak_suspended_bytes = max(pool.peak_suspended_bytes, pool.suspended_bytes)

    def _restore(self, runner: Any, req_id: str, suspended: _Suspended) -> None:
        """Copy a resumed request's saved K/V into the first of the blocks vLLM gave it."""
        block_ids = runner.requests[req_id].block_ids[0]
        if len(block_ids) < suspended.num_blocks:
            raise RuntimeError(
                f"dynts: request {req_id!r} resumed with {len(block_ids)} blocks; its {suspended.num_blocks} saved "
                "blocks do not fit"
            )
        blocks = torch.as_tensor(block_ids[: suspended.num_blocks], dtype=torch.long, device=self.device)
        for (view, dim), saved in zip(map(self._block_view, self.kv_caches), suspended.blocks):
            view.index_copy_(dim, blocks, saved.to(self.device, non_blocking=True))
        self.pool.restored += 1
        self.pool.suspended_bytes -= suspended.nbytes

    def _block_view(self, cache: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A view of a KV cache tensor and its block dimension (both K and V of a block move together)."""
        return (cache, 0) if self.cpu_layout is not None else (_plane_first(cache), 1)

    @staticmethod
    def _truncate_blocks(runner: Any, req_id: str, num_blocks: int) -> None:
        """Cut the request's block list (and its persistent-batch row) to the blocks the scheduler kept."""
        block_ids = runner.requests[req_id].block_ids[0]
        del block_ids[num_blocks:]
        row = runner.input_batch.req_id_to_index.get(req_id)
        if row is not None:
            table = runner.input_batch.block_table[0]
            table.block_table.np[row, num_blocks : table.num_blocks_per_row[row]] = 0
            table.num_blocks_per_row[row] = min(table.num_blocks_per_row[row], num_blocks)

    def _record_pool(self, plan: StepPlan) -> None:
        self.pool.num_free_blocks = plan.num_free_blocks
        self.pool.num_preemptions = plan.num_preemptions
        self.pool.peak_running = max(self.pool.peak_running, plan.num_running)

    def before_forward(self, runner: Any, scheduler_output: Any) -> None:
        """After ``_prepare_inputs``: restored K/V into their new blocks, each request's new slots claimed, physical
        write slots and attention lengths, logical positions."""
        for req_id, suspended in self._restores:
            self._restore(runner, req_id, suspended)
        self._restores = []
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        self._forward = []
        first = 0
        for req_id in req_ids:  # the step's tokens are laid out request by request, in batch order
            count = scheduler_output.num_scheduled_tokens[req_id]
            slots = self.requests[req_id]
            slots.begin(count)
            self._forward.append((slots, first, count))
            first += count
            self.pool.max_tokens_per_step = max(self.pool.max_tokens_per_step, count)
        evicted = np.array([self.requests[req_id].evicted for req_id in req_ids], dtype=np.int64)
        if not evicted.any():
            return
        total_tokens = scheduler_output.total_num_scheduled_tokens
        evicted_cpu = torch.from_numpy(evicted)
        runner.optimistic_seq_lens_cpu[:num_reqs] -= evicted_cpu.to(runner.optimistic_seq_lens_cpu.dtype)
        evicted_device = evicted_cpu.to(runner.device)
        runner.seq_lens[:num_reqs] -= evicted_device.to(runner.seq_lens.dtype)
        request_of_token = runner.req_indices.gpu[:total_tokens].long()
        physical_positions = runner.positions[:total_tokens] - evicted_device[request_of_token]
        batch.block_table[0].compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], physical_positions)

    def observe_queries(self, layer: int, query: torch.Tensor) -> None:
        """Called by the wrapped attention of ``layer`` with its [tokens, q_heads, head_size] queries (the step's
        tokens first; CUDA-graph padding after them). Outside a step (warm-up, profiling) there is nothing to do."""
        if self._forward is None:
            return
        for slots, first, count in self._forward:
            slots.observe_queries(layer, query[first : first + count])

    def after_forward(self, runner: Any, scheduler_output: Any) -> None:
        forward, self._forward = self._forward, None
        state = runner.execute_model_state
        if state is None or forward is None:
            return  # nothing ran this step
        batch = runner.input_batch
        hidden_states = state.hidden_states
        for row, (req_id, (slots, first, count)) in enumerate(zip(batch.req_ids[: batch.num_reqs], forward)):
            position = int(batch.num_computed_tokens_cpu[row])
            if position != slots.logical_len:
                raise RuntimeError(
                    f"dynts: request {req_id!r} writes from position {position} but the worker holds {slots.logical_len} tokens"
                )
            token_ids = torch.from_numpy(batch.token_ids_cpu[row, position : position + count].astype(np.int64))
            slots.commit(token_ids, hidden_states[first : first + count])
            blocks = len(runner.requests[req_id].block_ids[0])
            self.pool.max_blocks_per_request = max(self.pool.max_blocks_per_request, blocks)
            if req_id in self._resumed:
                self.pool.max_blocks_at_resume = max(self.pool.max_blocks_at_resume, blocks)
        self.stats.record_step([slots.physical_len for slots in self.requests.values()], 0)


def _attention_layers(runner: Any) -> list[Any]:
    """The model's attention layers that hold a KV cache, in layer order."""
    from vllm.model_executor.models.utils import extract_layer_index

    context = runner.compilation_config.static_forward_context
    named = [(name, layer) for name, layer in context.items()
             if getattr(layer, "kv_cache", None) is not None and hasattr(layer, "impl")]
    return [layer for _, layer in sorted(named, key=lambda item: extract_layer_index(item[0]))]


def _to_host(blocks: torch.Tensor) -> torch.Tensor:
    """A host copy of device blocks (pinned memory on CUDA; the copy is ordered before the step's forward pass on
    the same stream, so it reads the blocks before anything overwrites them). On CPU ``index_select`` already copied."""
    if blocks.device.type == "cpu":
        return blocks
    host = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=True)
    host.copy_(blocks, non_blocking=True)
    return host


def _unique_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Layers that share a KV cache (KV sharing) appear once."""
    seen: set[int] = set()
    unique = []
    for tensor in tensors:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique.append(tensor)
    return unique


def _plane_first(cache: torch.Tensor) -> torch.Tensor:
    """A [2, blocks, block_size, heads, head_size] view of a FlashAttention-style cache (K/V plane dim first)."""
    return cache if cache.shape[0] == 2 else cache.transpose(0, 1)


def _load_predictor(settings: DynTSSettings, runner: Any) -> Any:
    """The predictor head, checked against the served weights (embedding / final-norm fingerprint)."""
    from vllm.distributed import get_tensor_model_parallel_rank

    head, identity = settings.load_predictor()
    if get_tensor_model_parallel_rank() == 0:  # other ranks hold other vocabulary shards of the embedding
        identity.check_compatible(_HFModelView(runner.get_model(), runner.model_config.hf_config),
                                  what=f"predictor head {settings.predictor}")
    return head


class _HFModelView:
    """What ``dynts.predictor.ModelIdentity`` reads from an HF model, taken from a vLLM model."""

    def __init__(self, model: Any, hf_config: Any) -> None:
        self.config, self._model = hf_config, model
        decoder = getattr(model, "model", None)
        if getattr(decoder, "embed_tokens", None) is None or getattr(decoder, "norm", None) is None:
            raise ValueError(
                f"dynts: cannot check the predictor head against {type(model).__name__} (no model.embed_tokens / "
                "model.norm)"
            )
        self._decoder = decoder

    def get_input_embeddings(self) -> Any:
        return self._decoder.embed_tokens

    def get_decoder(self) -> Any:
        return self._decoder

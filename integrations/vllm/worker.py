"""Worker side: compaction inside each request's own blocks, physical slots and lengths, scoring of new tokens.

Hooks on vLLM's V1 model runner (``GPUModelRunner``, which ``CPUModelRunner`` subclasses), installed by the plugin
and active only on engines with ``additional_config["dynts"]``:

* before a step (ahead of vLLM's own state update, which zeroes and reuses freed blocks): drop finished requests,
  start fresh state for new or resumed ones, and run the step's ``Compaction`` commands: the scorer scores the
  request's slots, ``dynts.policy`` picks the kept ones, the K/V move inside the request's blocks, and its block
  list is cut to the blocks the scheduler kept;
* after the inputs are prepared: positions stay logical (RoPE), while the write slots and the attention lengths
  become physical (``logical - evicted``);
* after the forward: each request's new tokens get their slots and logical positions recorded, and the scorer
  sees them (the predictor reads their final-norm hidden states).

Per-request bookkeeping is the core's ``SlotTable`` with one row: the logical position of every physical slot and
the scorer's per-slot state, compacted with the same kernels as HF; the keep-set comes from ``dynts.policy``'s
``plan_compaction``, as in HF.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ... import kernels
from ...policy import OverflowNotice, plan_compaction, request_spans
from ...scorers import CacheView, ModelGeometry, Scorer, Step
from ...slots import SlotTable
from ...stats import CacheStats
from .cpu_layout import CPUBlockLayout
from .protocol import ATTRIBUTE, Compaction, StepPlan
from .settings import SCHEDULER_CLASS, DynTSSettings


class _RequestSlots:
    """One request's slots on the worker: the logical position per physical slot, and its scorer's state."""

    def __init__(
        self, settings: DynTSSettings, scorer: Scorer, geometry: ModelGeometry, device: torch.device, dtype: torch.dtype
    ) -> None:
        config = settings.compression
        self.config = config
        self.table = SlotTable(rows=1, capacity=config.trigger, layers_g=1, heads_g=1, num_layers=geometry.num_layers,
                               kv_heads=geometry.kv_heads, device=device)
        self.scorer = scorer
        # dtype: the model's, as the K/V of an HF DynTSCache (scorers such as the predictor run in it).
        scorer.bind(CacheView(self.table, geometry, config, dtype))
        self.logical_len = 0

    @property
    def physical_len(self) -> int:
        return self.table.physical_len_host[0]

    @property
    def evicted(self) -> int:
        return self.logical_len - self.physical_len

    def commit(self, token_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Record the ``n`` tokens a step wrote (next logical positions, next physical slots), then score them."""
        num_new = token_ids.shape[-1]
        table = self.table
        table.ensure_capacity(self.physical_len + num_new)
        device = table.device
        slots = table.write_slots(num_new)
        table.claim(slots)
        positions = self.logical_len + torch.arange(num_new, device=device).view(1, -1)
        table.set_positions(slots, positions)
        table.grow_lengths([num_new])
        self.logical_len += num_new
        step = Step(
            input_ids=token_ids.view(1, -1).to(device), hidden_states=hidden_states.unsqueeze(0), slots=slots,
            positions=positions, stored=torch.ones(1, num_new, dtype=torch.bool, device=device),
            key_len=table.physical_len.clone(), query_count=torch.tensor([num_new], device=device),
            key_start=torch.zeros(1, dtype=torch.long, device=device),
        )
        with torch.no_grad():
            self.scorer.on_step(step)

    def plan(self, command: Compaction) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep indices ([1, 1, 1, K]), keep count ([1]) and overflow flag of a compaction, by ``dynts.policy``."""
        if (self.logical_len, self.physical_len) != (command.logical_len, command.physical_len):
            raise RuntimeError(
                f"dynts: request {command.req_id!r} is out of step between scheduler and worker: the scheduler "
                f"compacts it at logical/physical length {command.logical_len}/{command.physical_len}, the worker "
                f"holds {self.logical_len}/{self.physical_len}"
            )
        table = self.table
        rows = torch.zeros(1, dtype=torch.long, device=table.device)
        with torch.no_grad():
            plan = plan_compaction(
                self.scorer.score(rows), table.positions, table.physical_len,
                [request_spans(self.config, command.prompt_end, command.answer_start)], self.config,
                num_layers=table.num_layers, kv_heads=table.kv_heads,
            )
        if int(plan.keep_count[0]) != command.keep_count:
            raise RuntimeError(
                f"dynts: request {command.req_id!r}: the policy keeps {int(plan.keep_count[0])} slots but the "
                f"scheduler planned {command.keep_count} (protected spans disagree)"
            )
        return plan.keep_index, plan.keep_count, plan.overflow

    def compact(self, keep_index: torch.Tensor, keep_count: torch.Tensor) -> None:
        self.table.compact(torch.zeros(1, dtype=torch.long, device=self.table.device), keep_index, keep_count)

    def resident_positions(self) -> list[int]:
        return self.table.resident_positions(0)[0].tolist()


@dataclass
class PoolStats:
    """What the worker sees of vLLM's block pool (sent by the scheduler with each step)."""

    num_free_blocks: int | None = None
    num_preemptions: int = 0
    peak_running: int = 0
    max_blocks_per_request: int = 0


class DynTSWorker:
    """The dynts state of one model runner."""

    def __init__(self, runner: Any, settings: DynTSSettings) -> None:
        self.settings = settings
        self.device = runner.device
        model_config = runner.model_config
        self.model_dtype = model_config.dtype
        self.geometry = ModelGeometry(
            num_layers=1,  # one keep-set shared by all layers ("shared" granularity)
            q_heads=model_config.get_num_attention_heads(runner.parallel_config),
            kv_heads=model_config.get_num_kv_heads(runner.parallel_config),
            head_dim=model_config.get_head_size(),
            scale=model_config.get_head_size() ** -0.5,
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
        self.cpu_layout = self._cpu_layout(runner) if self.device.type == "cpu" else None
        if self.cpu_layout is None:
            self._check_paged_layout()
        self.scorer_extra = {"predictor": _load_predictor(settings, runner)} if settings.scorer == "predictor" else {}
        self.requests: dict[str, _RequestSlots] = {}
        self.finished_positions: dict[str, list[int]] = {}
        self.stats = CacheStats(history_limit=0)
        self.pool = PoolStats()
        self._overflow = OverflowNotice()

    def stats_dict(self) -> dict[str, Any]:
        """Compaction counters and block-pool observations, as one plain dict (read by tests through RPC)."""
        return {**self.stats.as_dict(), **asdict(self.pool)}

    def reset_counters(self) -> None:
        """Start the compaction counters and the pool peaks afresh (the pool's current state is kept)."""
        self.stats = CacheStats(history_limit=0)
        self.pool = PoolStats(num_free_blocks=self.pool.num_free_blocks, num_preemptions=self.pool.num_preemptions)

    # ------------------------------------------------------------------ set-up
    def _cpu_layout(self, runner: Any) -> CPUBlockLayout:
        layers = [
            layer for layer in runner.compilation_config.static_forward_context.values()
            if getattr(layer, "kv_cache", None) is not None and hasattr(layer, "impl")
        ]
        backends = {type(layer.impl).__name__ for layer in layers}
        isas = {getattr(layer, "isa", None) for layer in layers}
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

    # ------------------------------------------------------------------ step hooks
    def before_step(self, runner: Any, scheduler_output: Any) -> None:
        plan: StepPlan | None = getattr(scheduler_output, ATTRIBUTE, None)
        if plan is None:
            raise RuntimeError(
                f"dynts: the scheduler sent no dynts plan; the engine must use {SCHEDULER_CLASS} (installed by the "
                "dynts plugin's config hook)"
            )
        for req_id in scheduler_output.finished_req_ids:
            slots = self.requests.pop(req_id, None)
            if slots is not None and self.settings.record_positions:
                self.finished_positions[req_id] = slots.resident_positions()
        cached = scheduler_output.scheduled_cached_reqs
        for req_id in [new.req_id for new in scheduler_output.scheduled_new_reqs] + list(cached.resumed_req_ids):
            self.requests[req_id] = self._new_request()
        for command in plan.compactions:
            self._compact(runner, command)
        self._record_pool(plan)

    def _new_request(self) -> _RequestSlots:
        scorer = self.settings.build_scorer(**self.scorer_extra)
        return _RequestSlots(self.settings, scorer, self.geometry, self.device, self.model_dtype)

    def _compact(self, runner: Any, command: Compaction) -> None:
        slots = self.requests[command.req_id]
        keep_index, keep_count, overflow = slots.plan(command)
        block_ids = runner.requests[command.req_id].block_ids[0]
        if self.cpu_layout is not None:
            self.cpu_layout.compact_(self.kv_caches, block_ids, keep_index[0, 0, 0], command.keep_count)
        else:
            table = torch.as_tensor([block_ids], dtype=torch.long, device=self.device)
            kernels.compact_paged_([_plane_first(cache) for cache in self.kv_caches], table, keep_index, keep_count)
        slots.compact(keep_index, keep_count)
        self._truncate_blocks(runner, command.req_id, -(-command.keep_count // self.block_size))
        self.stats.compactions += 1
        self.stats.evicted_tokens += command.physical_len - command.keep_count
        self._overflow.check(overflow)

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

    def fix_inputs(self, runner: Any, total_tokens: int) -> None:
        """After ``_prepare_inputs``: physical write slots and attention lengths, logical positions."""
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        evicted = np.array([self.requests[req_id].evicted for req_id in batch.req_ids[:num_reqs]], dtype=np.int64)
        if not evicted.any():
            return
        evicted_cpu = torch.from_numpy(evicted)
        runner.optimistic_seq_lens_cpu[:num_reqs] -= evicted_cpu.to(runner.optimistic_seq_lens_cpu.dtype)
        evicted_device = evicted_cpu.to(runner.device)
        runner.seq_lens[:num_reqs] -= evicted_device.to(runner.seq_lens.dtype)
        request_of_token = runner.req_indices.gpu[:total_tokens].long()
        physical_positions = runner.positions[:total_tokens] - evicted_device[request_of_token]
        batch.block_table[0].compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], physical_positions)

    def after_forward(self, runner: Any, scheduler_output: Any) -> None:
        state = runner.execute_model_state
        if state is None:
            return  # nothing ran this step
        batch = runner.input_batch
        hidden_states = state.hidden_states
        start = 0
        for row, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
            num_new = scheduler_output.num_scheduled_tokens[req_id]
            slots = self.requests[req_id]
            first = int(batch.num_computed_tokens_cpu[row])
            if first != slots.logical_len:
                raise RuntimeError(
                    f"dynts: request {req_id!r} writes from position {first} but the worker holds {slots.logical_len} tokens"
                )
            token_ids = torch.from_numpy(batch.token_ids_cpu[row, first : first + num_new].astype(np.int64))
            slots.commit(token_ids, hidden_states[start : start + num_new])
            start += num_new
            self.pool.max_blocks_per_request = max(
                self.pool.max_blocks_per_request, len(runner.requests[req_id].block_ids[0])
            )
        self.stats.record_step([slots.physical_len for slots in self.requests.values()], 0)


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

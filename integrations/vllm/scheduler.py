"""Engine side: when each request is compacted, and KV blocks that follow the physical length.

``DynTSScheduler`` is installed as ``scheduler_cls`` by the plugin's config hook when an engine has
``additional_config={"dynts": {...}}``. Before each step it compacts every running request whose prompt is computed
and whose physical length (``num_computed_tokens - evicted``) reached its trigger (the budget; after a compaction
whose protected tokens overflowed the keep quota, the kept length plus the usual gap, as in ``DenseCompressor``).
The new length comes from ``CompressionConfig`` (window + kept share of the older tokens, never fewer than the
protected ones), the blocks past it go back to the pool at once, and a ``Compaction`` command travels to the
workers with the step: the same timing as HF, where a row is compacted right after the step that filled it.
Block allocation follows the physical length (``_PhysicalLengthManager``).

Preemption keeps a request's resident set: the request is *suspended* (a ``Suspend`` command: the worker copies the
K/V of its physical slots to host memory before this step's forward and parks its slot table and scorer state; the
scheduler keeps its eviction state), and when vLLM resumes it, the prefix-cache lookup reports its logical length
as already computed, so vLLM allocates blocks for its physical length plus the new token only and schedules just the
tokens after it; a ``restore`` puts the K/V into the new blocks. Past the host-memory cap (``suspend_memory_gib``),
a preempted request drops its state and recomputes its tokens when it resumes, as in plain vLLM, but in chunks that
end at each compaction trigger, so that it never holds more blocks than the bound (its keep-sets, hence its output,
may then differ from an undisturbed run's). Finishing (abort included) drops everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.request import Request

from ...policy import compacted_length, next_trigger, protected_count, quota_overflows, request_spans
from ...tracking import ThinkEndScanner
from .protocol import ATTRIBUTE, Compaction, StepPlan, Suspend
from .settings import DynTSSettings, check_engine


@dataclass
class _RequestState:
    trigger: int  # the physical length that triggers the next compaction
    scanner: ThinkEndScanner  # finds the end-of-thinking marker among the output tokens
    evicted: int = 0
    answer_start: int | None = None
    searched_until: int = 0  # logical position up to which output tokens were scanned


class _PhysicalLengthManager(FullAttentionManager):
    """Full-attention block manager that sizes a request's blocks by its physical length.

    The scheduler passes logical token counts (``num_computed_tokens`` + new tokens); a compacted request needs
    slots only for what it still holds.
    """

    dynts_scheduler: "DynTSScheduler"

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Any,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        evicted = self.dynts_scheduler.evicted(request_id)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens - evicted, new_computed_blocks, total_computed_tokens - evicted,
            num_local_computed_tokens - evicted, num_tokens_main_model - evicted,
            apply_admission_cap=apply_admission_cap, prefill_end=prefill_end,
        )

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list:
        evicted = self.dynts_scheduler.evicted(request_id)
        return super().allocate_new_blocks(request_id, num_tokens - evicted, num_tokens_main_model - evicted)

    def free_tail(self, request_id: str, num_slots: int) -> int:
        """Return the request's blocks past ``num_slots`` to the pool; returns how many were freed."""
        blocks = self.req_to_blocks.get(request_id)
        keep = cdiv(num_slots, self.block_size)
        if not blocks or len(blocks) <= keep:
            return 0
        tail = blocks[keep:]
        del blocks[keep:]
        self.block_pool.free_blocks(reversed(tail))
        return len(tail)


class DynTSScheduler(Scheduler):
    def __init__(self, vllm_config: Any, kv_cache_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        settings = DynTSSettings.from_additional_config(vllm_config.additional_config)
        if settings is None:
            raise ValueError("DynTSScheduler needs additional_config['dynts'] (it is installed by the dynts plugin)")
        check_engine(vllm_config, settings)
        self.dynts_settings = settings
        self.dynts_config = settings.compression
        self._dynts_requests: dict[str, _RequestState] = {}
        self._dynts_compactions: list[Compaction] = []
        self._dynts_preemptions = 0
        self._dynts_manager = self._install_manager(kv_cache_config)
        # Suspended requests: logical length computed when preempted, and the host bytes their K/V take on a worker.
        self._dynts_suspended: dict[str, tuple[int, int]] = {}
        self._dynts_suspends: list[Suspend] = []  # for the next step's plan
        self._dynts_preempting: str | None = None  # set while vLLM frees the blocks of a request being suspended
        self._dynts_block_bytes = sum(
            group.kv_cache_spec.page_size_bytes * len(group.layer_names) for group in kv_cache_config.kv_cache_groups
        )

    def _install_manager(self, kv_cache_config: Any) -> _PhysicalLengthManager:
        groups = kv_cache_config.kv_cache_groups
        managers = self.kv_cache_manager.coordinator.single_type_managers
        full_attention_only = (
            len(groups) == 1 and type(groups[0].kv_cache_spec) is FullAttentionSpec
            and type(managers[0]) is FullAttentionManager
        )
        if not full_attention_only:
            specs = [type(group.kv_cache_spec).__name__ for group in groups]
            raise ValueError(
                f"dynts KV eviction needs a model whose layers all use full attention (one FullAttentionSpec KV cache "
                f"group); this model has {specs} (sliding-window, hybrid and MLA models are not supported yet)"
            )
        manager = managers[0]
        manager.__class__ = _PhysicalLengthManager  # same state, allocation by physical length
        manager.dynts_scheduler = self
        return manager

    # ------------------------------------------------------------------ queries
    def evicted(self, request_id: str) -> int:
        state = self._dynts_requests.get(request_id)
        return 0 if state is None else state.evicted

    def suspended_bytes(self) -> int:
        """Host memory the suspended requests' K/V take on each worker (whole blocks, every layer)."""
        return sum(size for _, size in self._dynts_suspended.values())

    # ------------------------------------------------------------------ scheduling
    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        self._dynts_compactions = []
        for request in self.running:
            self._maybe_compact(request)
        output = super().schedule(*args, **kwargs)
        # A request preempted by reset_prefix_cache (outside schedule) may be suspended and resumed within this one
        # step: the worker saves before it restores.
        restores = [req_id for req_id in output.scheduled_cached_reqs.resumed_req_ids
                    if self._dynts_suspended.pop(req_id, None) is not None]
        suspends, self._dynts_suspends = self._dynts_suspends, []
        plan = StepPlan(
            compactions=list(self._dynts_compactions),
            suspends=suspends,
            restores=restores,
            num_free_blocks=self.kv_cache_manager.block_pool.get_num_free_blocks(),
            num_running=len(self.running),
            num_preemptions=self._dynts_preemptions,
        )
        setattr(output, ATTRIBUTE, plan)
        return output

    def _maybe_compact(self, request: Request) -> None:
        config = self.dynts_config
        logical_len = request.num_computed_tokens
        if logical_len < request.num_prompt_tokens:
            return  # the prompt is not fully computed yet: like HF, the first compaction follows the prefill
        state = self._dynts_requests.get(request.request_id)
        if state is None:
            state = self._dynts_requests[request.request_id] = _RequestState(
                trigger=config.trigger, scanner=ThinkEndScanner(config.think_end or ()),
                searched_until=request.num_prompt_tokens,
            )
        self._find_think_end(request, state, logical_len)
        spans = request_spans(config, request.num_prompt_tokens, state.answer_start)
        # Compact again at once while a compaction leaves the request at its trigger (a prompt far longer than the
        # budget), as DenseCompressor does: the worker applies the commands in order.
        while (physical_len := logical_len - state.evicted) >= state.trigger:
            # Protected tokens are never evicted, so all of them are resident: count those outside the window (the
            # window is the newest tokens, all resident), as plan_compaction will on the worker.
            protected_older = protected_count(spans, logical_len - min(config.window, physical_len))
            keep_count = compacted_length(config, physical_len, protected_older)
            self._dynts_compactions.append(Compaction(
                req_id=request.request_id, logical_len=logical_len, physical_len=physical_len, keep_count=keep_count,
                prompt_end=request.num_prompt_tokens, answer_start=state.answer_start,
            ))
            state.evicted += physical_len - keep_count
            state.trigger = next_trigger(config, keep_count, quota_overflows(config, physical_len, protected_older))
            if keep_count == physical_len:
                break  # nothing left to remove (keep_ratio 1, or everything protected)
        self._dynts_manager.free_tail(request.request_id, logical_len - state.evicted)

    def _find_think_end(self, request: Request, state: _RequestState, logical_len: int) -> None:
        """Feed the output tokens computed since the last step to the end-of-thinking scanner (never the prompt)."""
        if not self.dynts_config.think_end or state.answer_start is not None or logical_len <= state.searched_until:
            return
        new_tokens = request.all_token_ids[state.searched_until : logical_len]
        state.answer_start = state.scanner.feed(new_tokens, state.searched_until)
        state.searched_until = logical_len

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        self._dynts_preemptions += 1
        request_id = request.request_id
        logical_len = request.num_computed_tokens  # vLLM sets it to 0 below
        physical_len = logical_len - self.evicted(request_id)
        size = cdiv(physical_len, self.block_size) * self._dynts_block_bytes
        suspend = logical_len > 0 and self.suspended_bytes() + size <= self.dynts_settings.suspend_memory_bytes
        # Without a suspension, _free_request_blocks drops the eviction state as for a finished request: the request
        # recomputes its tokens when it resumes.
        self._dynts_preempting = request_id if suspend else None
        try:
            super()._preempt_request(request, *args, **kwargs)
        finally:
            self._dynts_preempting = None
        if suspend:
            self._dynts_suspended[request_id] = (logical_len, size)
            self._dynts_suspends.append(Suspend(req_id=request_id, physical_len=physical_len))

    def _free_request_blocks(self, request: Request) -> None:
        request_id = request.request_id
        if request_id != self._dynts_preempting:  # finished, aborted, or preempted past the host-memory cap
            self._dynts_requests.pop(request_id, None)
            self._dynts_suspended.pop(request_id, None)
            self._dynts_compactions = [c for c in self._dynts_compactions if c.req_id != request_id]
            self._dynts_suspends = [s for s in self._dynts_suspends if s.req_id != request_id]
        # A suspended request keeps this step's compaction: the worker compacts it, then saves what it kept.
        super()._free_request_blocks(request)

    def _get_local_prefix_cache_hit(self, request: Request) -> tuple[Any, int, int, bool]:
        """A suspended request resumes with its logical length computed: vLLM then allocates blocks for its physical
        length (plus the new tokens) only, adopts no cached block, and schedules just the tokens after it."""
        suspended = self._dynts_suspended.get(request.request_id)
        if suspended is None:
            return super()._get_local_prefix_cache_hit(request)
        return self.kv_cache_manager.empty_kv_cache_blocks, suspended[0], 0, False

    def _reserve_prefill_lookahead(self, request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
        """Called by vLLM on every request's token count just before it allocates blocks: a request recomputing its
        tokens after a preemption (past the host-memory cap) stops each chunk at the end of its prompt, then at its
        compaction trigger, so that it is compacted before it grows further, as when it first decoded them."""
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        if num_computed_tokens < request.num_prompt_tokens:
            # No cap inside the prompt (a prompt is held whole, then compacted); for a request that is not replaying
            # output tokens the chunk ends at the prompt's end anyway.
            return min(num_new_tokens, request.num_prompt_tokens - num_computed_tokens)
        state = self._dynts_requests.get(request.request_id)
        trigger = self.dynts_config.trigger if state is None else state.trigger
        physical_len = num_computed_tokens - self.evicted(request.request_id)
        return min(num_new_tokens, max(1, trigger - physical_len))

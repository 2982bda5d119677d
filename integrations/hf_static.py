"""Fast decoding with a ``DynTSCache``: fixed-shape one-token steps, captured once in a CUDA graph.

    decoder = StaticDecoder(model, cache)
    sequences = decoder.generate(input_ids, attention_mask=mask, max_new_tokens=16384)

Why: HF's eager decode loop at batch 20 on an 8B model spends most of a step launching kernels and repeating K/V
for GQA, far from the memory-bandwidth roofline. Here the prompt is prefilled through the normal hooks path; every
decode step then has the same shapes: the storage buffers never move, the new token is written at each row's
physical end by device indices, attention runs the ragged flash-decoding kernel over each row's
``physical_len + 1`` slots (``dynts.kernels.decode_attention``, registered as the ``dynts_decode`` attention
implementation for the duration of the call), the scorer observes the step on the device, and the next token is
chosen on the device. Host work (end-of-thinking and EOS tracking, compaction, stats) runs between replays and
changes the buffers only in place, so the captured graph stays valid; a capacity growth re-captures it.

Two implementations of a step compute the same thing: HF's own modules with the ``dynts_decode`` attention, or,
for Llama, Mistral, Qwen2 and Qwen3, ``FusedDecodeStep`` (``hf_fused_step.py``: a dozen fused launches per layer
instead of ~50 small kernels). ``StaticDecoder(..., fused=None)`` picks the fused step when the model supports it;
``decoder.fused`` says which one runs.

Greedy decoding, or sampling with temperature and top-p. Scorers that need attention queries are not supported
here (use the HF ``generate`` path for them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from .. import kernels
from ..device import to_device
from ..modeling import decoder_module
from .hf import DynTSCache
from .hf_fused_step import FusedDecodeStep, fused_step_unsupported

ATTENTION_NAME = "dynts_decode"


def _decode_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
    scaling: float, dropout: float = 0.0, dynts_lengths: torch.Tensor | None = None,
    dynts_start: torch.Tensor | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention implementation of one static decode step: ``key``/``value`` are the whole storage capacity, in the
    ring layout (each row's slots from ``dynts_start`` on)."""
    if dynts_lengths is None or dynts_start is None or query.shape[2] != 1:
        raise RuntimeError("the dynts_decode attention serves StaticDecoder's one-token steps only")
    out = kernels.decode_attention(query[:, :, 0], key, value, dynts_lengths, scale=scaling, start=dynts_start)
    return out.unsqueeze(1), None


AttentionInterface.register(ATTENTION_NAME, _decode_attention)


@dataclass
class _Sync:
    """One host synchronisation of a decode run as it happened: the steps it ended, when the device had run them
    (``drained``), until when it held the device back (``held``: on the host clock until the next step was queued, or
    until the host was done when none was; on a GPU also a CUDA event recorded after the work the settle queued and
    before any step queued after it), and when the host was done (``now``)."""

    steps: int
    drained: float
    drained_event: torch.cuda.Event | None
    held: float
    held_event: torch.cuda.Event | None
    now: float


def _device_mark(device: torch.device) -> torch.cuda.Event | None:
    """A timing event recorded on the device's current stream (None off CUDA)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


class StaticDecoder:
    """Drives ``model`` + ``cache`` through fixed-shape decode steps (a CUDA graph on GPU, eager elsewhere).

    ``fused``: run each step as ``FusedDecodeStep`` (True: an error if the model does not support it), through HF's
    modules (False), or the fused step whenever the model supports it (None). ``self.fused`` is the choice made.
    """

    def __init__(self, model: nn.Module, cache: DynTSCache, *, use_cuda_graph: bool | None = None,
                 fused: bool | None = None) -> None:
        if not isinstance(cache, DynTSCache):
            raise TypeError(f"cache must be a DynTSCache, got {type(cache).__name__}")
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"fused must be True, False or None (the fused step when supported), got {fused!r}")
        self.model, self.cache = model, cache
        self.decoder = decoder_module(model)
        self.lm_head = model.get_output_embeddings()
        self.use_cuda_graph = use_cuda_graph
        unsupported = fused_step_unsupported(model, len(cache.storage_layer_of))
        if fused and unsupported is not None:
            raise ValueError(f"fused=True: the fused decode step does not support this model: {unsupported}")
        self.fused = unsupported is None if fused is None else fused
        self._fused_step: FusedDecodeStep | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        # Wall time of each decode step of the last generate call: the host synchronises only every few steps, so
        # each step gets the mean of the steps between two synchronisations (compactions and host work included).
        self.step_seconds: list[float] = []
        # Steps between two host synchronisations, in order (they add up to len(step_seconds)); a compaction runs in
        # the synchronisation that ends its interval. sync_seconds: how long each of those synchronisations held the
        # device back once it had run the interval's steps: the host's work (token bookkeeping, compaction planning,
        # stats) until the next step was queued and, on CUDA, the device work queued before that step (a compaction's K/V
        # moves), timed by CUDA events. Part of the interval.
        self.sync_intervals: list[int] = []
        self.sync_seconds: list[float] = []

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        pad_token_id: int = 0,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        readback_every: int = 64,
        logits_callback: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Prompt plus up to ``max_new_tokens`` tokens per row ([rows, prompt + new]); finished rows get padding.

        A row finishes after it emits one of ``eos_token_id`` (default: the cache's ``eos_token_id`` if it was given
        one, else the model's generation config; ``[]``: never).

        ``readback_every``: the host reads the generated tokens back at most this many steps apart (and whenever a
        compaction is due), so decoding runs ahead of the host in between.
        ``logits_callback`` receives each step's next-token logits ([rows, vocab], the step's own buffer: copy
        what you keep), the prefill's first.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and not (temperature > 0 and 0 < top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and top_p in (0, 1], got {temperature}, {top_p}")
        compressor = self.cache.compressor
        if compressor.tracker is not None:
            raise RuntimeError("StaticDecoder.generate needs a fresh DynTSCache")
        if eos_token_id is None:  # the cache's own ids if it was given some, else the model's generation config
            eos_token_id = self.cache.eos_token_ids
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        batch, prompt_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self._sampling = (do_sample, temperature, top_p, generator)
        self._pad = pad_token_id
        self.cache.start_call(prompt_len, eos_token_id, pad_token_id)

        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=self.cache, use_cache=True).last_hidden_state
        self._logits = self.lm_head(hidden[:, -1])
        if logits_callback is not None:
            logits_callback(self._logits)
        self._ids = self._choose(self._logits).view(batch, 1)
        self._position_ids = position_ids[:, -1:] + 1
        self._session = session = compressor.static_session(self._ids, pad_token_id, readback_every)
        attn_config = self.model.config
        saved_attention = attn_config._attn_implementation
        attn_config._attn_implementation = ATTENTION_NAME
        use_graph = self.use_cuda_graph if self.use_cuda_graph is not None else input_ids.is_cuda
        self.step_seconds, self.sync_intervals, self.sync_seconds = [], [], []

        def run_step() -> None:
            nonlocal steps_run
            if use_graph:
                self._replay()
            else:
                self._step()
            if logits_callback is not None:
                logits_callback(self._logits)
            session.stepped()
            steps_run += 1

        def synchronise(step_ahead: bool = False) -> bool:
            """The session's read and settle after the steps queued since the last one; records when they ran (see
            ``_record_timings``). ``step_ahead``: queue the next step as early as it may be, so that the host's
            bookkeeping overlaps it: before settling when no compaction can be due, else right after the settle
            finished the compaction (behind its moves). True when the buffers moved (the graph must be captured
            again)."""
            steps = session.unsynced_steps
            session.prepare()  # queued behind the steps: their tokens' copy to the host, a compaction that may be due
            logged = session.read()  # waits for the steps only, not for that compaction
            drained, drained_event = time.perf_counter(), session.steps_ran
            queued = None  # (host time, device mark) at which the next step was queued, if it was

            def step_after_settle() -> None:
                nonlocal queued
                mark = _device_mark(input_ids.device)  # the device has run what the settle queued
                run_step()
                queued = (time.perf_counter(), mark)

            if step_ahead and session.may_step_before_settling:
                run_step()
                queued = (time.perf_counter(), None)  # the device idled until this step was queued
            moved = session.settle(logged, step_after_settle if step_ahead and queued is None else None)
            now = time.perf_counter()
            held = queued if queued is not None else (now, _device_mark(input_ids.device))
            if steps:
                syncs.append(_Sync(steps, drained, drained_event, held[0], held[1], now))
            return moved

        try:
            self._fused_step = FusedDecodeStep(self.model, self.cache.storage_layer_of) if self.fused else None
            # The host never waits for a step: it queues them and synchronises only when the session needs it
            # (a compaction is due, or the token log is full).
            start = time.perf_counter()
            syncs: list[_Sync] = []
            steps_run = 0
            while steps_run < max_new_tokens - 1:
                if session.due:
                    if synchronise(step_ahead=True):
                        self._graph = None  # the buffers moved: capture again
                    if session.finished:
                        break
                    continue  # a step queued ahead may already make the next synchronisation due
                run_step()
            synchronise()  # the steps since the last sync
            last = self._ids.view(-1).tolist()
            self._record_timings(start, syncs)
        finally:
            attn_config._attn_implementation = saved_attention
            session.close()
            self._graph = None
            self._fused_step = None
        fed = [row + [token] for row, token in zip(session.fed, last)]
        # The host learns that every row finished only at a sync, so up to readback_every - 1 steps may have run
        # after that (feeding padding): the result ends where the last row to finish emitted its EOS, as generate's.
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        width = max(next((index + 1 for index, token in enumerate(row) if token in eos), len(row)) for row in fed)
        new = to_device([tokens[:width] + [pad_token_id] * (width - len(tokens)) for tokens in fed], input_ids.device,
                        input_ids.dtype)
        return torch.cat([input_ids, new], dim=1)

    def _record_timings(self, start: float, syncs: list[_Sync]) -> None:
        """``step_seconds``, ``sync_intervals`` and ``sync_seconds`` of the run, once it ended (its CUDA events are
        read only then, so timing never makes the host wait). A synchronisation holds the device until the next step
        is queued (or the host is done) and the device has run what the settle queued (a compaction's K/V moves); its
        interval ends when both the host is done and the device was released, so that a compaction's device work
        counts in the interval of the synchronisation that queued it, not in the next one."""
        self.step_seconds, self.sync_intervals, self.sync_seconds = [], [], []
        for sync in syncs:
            held = sync.held - sync.drained
            if sync.held_event is not None:
                sync.held_event.synchronize()
                held = max(held, sync.drained_event.elapsed_time(sync.held_event) / 1e3)
            end = max(sync.now, sync.drained + held)
            self.step_seconds.extend([(end - start) / sync.steps] * sync.steps)
            self.sync_intervals.append(sync.steps)
            self.sync_seconds.append(held)
            start = end

    # ------------------------------------------------------------------ one step
    def _step(self) -> None:
        """Feed ``_ids`` at ``_position_ids``; leaves the next tokens in ``_ids`` (device work only)."""
        session = self._session
        lengths = session.lengths()
        if self._fused_step is None:
            hidden = self.decoder(input_ids=self._ids, position_ids=self._position_ids, past_key_values=self.cache,
                                  use_cache=True, dynts_lengths=lengths, dynts_start=session.kv_start).last_hidden_state
        else:  # the same buffers: K/V into the storage at each row's physical end, attention up to ``lengths``
            storage = session.compressor.kv
            hidden = self._fused_step(self._ids, self._position_ids, storage.keys, storage.values,
                                      session.kv_slots, lengths, session.kv_start)
        session.commit(hidden)
        self._logits = self.lm_head(hidden[:, -1])  # under capture: the graph's output buffer, refreshed by replays
        chosen = self._choose(self._logits).view(-1, 1)
        self._ids.copy_(torch.where(session.active.view(-1, 1), chosen, torch.full_like(chosen, self._pad)))
        self._position_ids += 1

    def _replay(self) -> None:
        if self._graph is None:
            self._capture()
        self._graph.replay()

    def _capture(self) -> None:
        """Capture ``_step`` after one real warm-up step on a side stream (the warm-up is a real step, so it is
        undone: the buffers it changes are saved and restored around it)."""
        buffers = [self._ids, self._position_ids, *self._session.state_buffers()]
        saved = [buffer.clone() for buffer in buffers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step()  # compiles kernels and settles the allocator before capture
        torch.cuda.current_stream().wait_stream(stream)
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        # Capture records without running: the buffers still hold the state before this step.
        self._graph = graph

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        do_sample, temperature, top_p, generator = self._sampling
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        # Gumbel-max: a sample from softmax(logits) with device-side randomness only (graph friendly).
        uniform = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(min=1e-20)
        return (logits - torch.log(-torch.log(uniform))).argmax(dim=-1)

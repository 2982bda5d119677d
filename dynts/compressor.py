"""The dense compression loop: scorer -> policy -> storage, one forward pass at a time.

Integration-independent. An integration (``dynts.integrations.hf``) calls, per forward pass:
``begin_step`` (before the model runs), ``write`` (each compressed layer's new K/V; returns what attention reads),
``observe_queries`` (each layer's queries, if the scorer needs them), ``end_step`` (after the model ran: commits
the tokens, lets the scorer observe, and compacts the rows whose physical length reached the budget).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import CompressionConfig
from .policy import protected_slots, select_keep
from .scorers.base import ModelGeometry, Scorer, Step, to_granularity
from .stats import CacheStats, Stopwatch
from .storage import KVStorage
from .tracking import SequenceTracker


@dataclass
class _Pending:
    num_new: int
    stored_count: list[int]
    prefill: bool
    input_ids: torch.Tensor | None
    step: Step | None = None


class DenseCompressor:
    """Owns the storage, the scorer binding, the sequence tracker and the stats of one batch of sequences."""

    def __init__(
        self,
        config: CompressionConfig,
        scorer: Scorer,
        *,
        num_layers: int,
        query_heads: int | None = None,
        scale: float | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        self.config, self.scorer = config, scorer
        self.num_layers, self.query_heads, self.scale = num_layers, query_heads, scale
        self.eos_token_ids = tuple(eos_token_ids)
        self.storage: KVStorage | None = None
        self.tracker: SequenceTracker | None = None
        self._stats = CacheStats()
        self.stopwatch: Stopwatch | None = None
        self._pending: _Pending | None = None
        self._sequence_start: torch.Tensor | None = None
        self._warned_overflow = False
        # Per row, the physical length that triggers the next compaction (``CompressionConfig.next_trigger``).
        self._trigger: list[int] = []
        # Static decoding (see ``enter_static``): fixed-shape one-token steps, no host work inside a step.
        self.static = False
        self._static_step: Step | None = None
        self._static_active: torch.Tensor | None = None

    @property
    def stats(self) -> CacheStats:
        """Counters so far; reading them resolves pending GPU timings (a synchronisation)."""
        if self.stopwatch is not None:
            self._stats.scoring_seconds = self.stopwatch.seconds("scoring")
            self._stats.eviction_seconds = self.stopwatch.seconds("eviction")
        return self._stats

    # ------------------------------------------------------------------ lengths
    @property
    def logical_len(self) -> int:
        return 0 if self.tracker is None else self.tracker.logical_len

    @property
    def max_physical_len(self) -> int:
        return 0 if self.storage is None else max(self.storage.physical_len_host)

    def is_aligned(self) -> bool:
        """True while every row's physical length equals the logical length (nothing evicted or skipped)."""
        return self.storage is None or all(length == self.logical_len for length in self.storage.physical_len_host)

    # ------------------------------------------------------------------ step protocol
    def begin_step(
        self,
        *,
        batch_size: int,
        num_new: int,
        input_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> None:
        """Announce a forward pass adding ``num_new`` tokens to each of ``batch_size`` rows.

        ``padding_mask`` ([rows, logical_len + num_new], 1 = real token) may mark left padding in the first pass.
        """
        if self._pending is not None:
            raise RuntimeError("begin_step called twice without end_step (an interrupted forward pass?)")
        prefill = self.tracker is None
        if prefill:
            self.tracker = SequenceTracker(batch_size, self.config.think_end, self.eos_token_ids)
            self.tracker.start(num_new, _left_pad_counts(padding_mask, num_new, batch_size))
            self._trigger = [self.config.budget] * batch_size
        else:
            if batch_size != self.tracker.batch_size:
                raise ValueError(
                    f"batch size changed from {self.tracker.batch_size} to {batch_size}; use a new cache per batch"
                )
            if padding_mask is not None and not bool(padding_mask[:, -num_new:].all()):
                raise ValueError("attention_mask: padding is only supported on the left of the prompt")
        self._pending = _Pending(num_new, self.tracker.stored_counts(num_new), prefill, input_ids)
        if self.storage is not None:
            self.storage.ensure_capacity(self.max_physical_len + num_new)

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new K/V ([rows, heads, new, dim]); return the [rows, heads, length, dim] views attention reads."""
        if self.static:
            self.storage.write_rows(layer, key_states, value_states, self._static_step.slots)
            return self.storage.keys[layer], self.storage.values[layer]
        pending = self._require_pending()
        if key_states.shape[2] != pending.num_new:
            raise ValueError(f"layer {layer} wrote {key_states.shape[2]} tokens; the step announced {pending.num_new}")
        if self.storage is None:
            self._allocate(key_states, value_states)
        step = self._current_step()
        self.storage.write(layer, key_states, value_states, step.slots)
        length = self.max_physical_len + pending.num_new
        return self.storage.keys[layer, :, :, :length], self.storage.values[layer, :, :, :length]

    def observe_queries(self, layer: int, queries: torch.Tensor) -> None:
        """``queries`` [rows, q_heads, new, head_dim] (post-RoPE) of a layer whose K/V this step already wrote."""
        step = self._current_step()
        with self.stopwatch.measure("scoring"):
            self.scorer.on_layer(layer, queries, step)

    def end_step(self, hidden_states: torch.Tensor | None = None) -> None:
        """Commit the step's tokens, let the scorer observe them, and compact the rows that reached the budget."""
        pending = self._require_pending()
        if self.storage is None:
            raise RuntimeError("end_step: no layer wrote K/V during this forward pass")
        step = self._current_step()
        step.hidden_states = hidden_states if self.scorer.needs_hidden_states else None
        storage, tracker = self.storage, self.tracker
        storage.commit(step.slots, step.positions, pending.stored_count)
        new_tokens = None if pending.input_ids is None else pending.input_ids.tolist()
        tracker.advance(new_tokens, pending.num_new, pending.prefill)
        with self.stopwatch.measure("scoring"):
            self.scorer.on_step(step)
        self._pending = None
        if pending.prefill and any(tracker.sequence_start):
            self._drop_left_padding()
        full = [row for row, length in enumerate(storage.physical_len_host) if length >= self._trigger[row]]
        if full:
            self._compact(full)
        self._record_stats()

    # ------------------------------------------------------------------ static decoding
    def enter_static(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Switch to fixed-shape one-token steps whose device work can be captured in a CUDA graph.

        ``input_ids`` ([rows, 1]) is the buffer the driving loop feeds each step. In this mode ``write`` stores at
        each row's physical end and returns the whole capacity (attention takes the lengths from
        ``physical_len + 1``); ``static_commit`` (device only) runs inside the step; ``static_advance`` (host)
        runs after it. Returns the device ``active`` mask ([rows] bool) the loop keeps equal to the unfinished rows.
        """
        if self.storage is None or self._pending is not None:
            raise RuntimeError("enter_static needs a prefilled cache and no step in progress")
        if self.scorer.needs_queries:
            raise ValueError(f"static decoding supports scorers that need no attention queries, not {self.scorer.name!r}")
        storage = self.storage
        self._static_active = torch.tensor([not done for done in self.tracker.finished], device=storage.device)
        self._static_step = Step(
            input_ids=input_ids, hidden_states=None, slots=storage.physical_len.view(-1, 1),
            positions=torch.full((storage.batch_size, 1), self.logical_len, dtype=torch.long, device=storage.device),
            stored_count=self._static_active.long(), key_len=storage.physical_len + 1,
            key_start=torch.zeros(storage.batch_size, dtype=torch.long, device=storage.device),
        )
        self.static = True
        return self._static_active

    def static_lengths(self) -> torch.Tensor:
        """Device-only start of a static step: each row's attention length (its held tokens plus the new one)."""
        key_len = self._static_step.key_len
        key_len.copy_(self.storage.physical_len + 1)
        return key_len

    def exit_static(self) -> None:
        self.static = False
        self._static_step = None

    def static_commit(self, hidden_states: torch.Tensor | None) -> None:
        """Device-only end of a static step: slot positions, scorer observation, physical lengths."""
        step, storage, active = self._static_step, self.storage, self._static_active
        step.hidden_states = hidden_states if self.scorer.needs_hidden_states else None
        step.stored_count.copy_(active)
        index = step.slots.view(1, -1, 1, 1).expand(storage.layers_g, -1, storage.heads_g, 1)
        held = torch.where(active.view(-1, 1), step.positions, torch.full_like(step.positions, -1))
        storage.positions.scatter_(3, index, held.view(1, -1, 1, 1).expand_as(index))
        self.scorer.on_step(step)
        storage.physical_len += active
        step.positions += 1

    def static_advance(self, fed_tokens: list[list[int]]) -> bool:
        """Host side of a static step that fed ``fed_tokens``: lengths, tracker, compaction, stats.

        Returns True when the set of active rows changed (the loop must refresh the device mask).
        """
        storage, tracker = self.storage, self.tracker
        before = list(tracker.finished)
        for row, done in enumerate(before):
            storage.physical_len_host[row] += 0 if done else 1
        tracker.advance(fed_tokens, 1, prefill=False)
        full = [row for row, length in enumerate(storage.physical_len_host) if length >= self._trigger[row]]
        if full:
            self._compact(full)
        storage.ensure_capacity(self.max_physical_len + 1)  # a growth re-captures the decoder's graph
        self._record_stats()
        if tracker.finished != before:
            self._static_active.copy_(torch.tensor([not done for done in tracker.finished]))
            return True
        return False

    # ------------------------------------------------------------------ introspection
    def attention_mask(self, num_new: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [rows, 1, new, length] for the coming step when rows are not aligned: each row sees its
        own physical slots plus its new tokens causally."""
        storage = self.storage
        length = self.max_physical_len + num_new
        slot = torch.arange(length, device=storage.device).view(1, 1, -1)
        physical = storage.physical_len.view(-1, 1, 1)
        query = torch.arange(num_new, device=storage.device).view(1, -1, 1)
        visible = slot <= physical + query  # own past plus new tokens up to itself
        mask = torch.zeros(visible.shape, dtype=dtype, device=storage.device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return mask.unsqueeze(1)

    def resident_positions(self, layer: int) -> list[torch.Tensor]:
        if self.storage is None:
            return []
        return self.storage.resident_positions(layer)

    # ------------------------------------------------------------------ internals
    def _require_pending(self) -> _Pending:
        if self._pending is None:
            raise RuntimeError("no step in progress: begin_step must run before the model writes K/V")
        return self._pending

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, num_new, key_dim = key_states.shape
        if self.tracker.batch_size != batch:
            raise ValueError(f"K/V batch {batch} does not match the step's batch {self.tracker.batch_size}")
        self.storage = KVStorage(
            num_layers=self.num_layers, batch_size=batch, kv_heads=kv_heads, key_dim=key_dim,
            value_dim=value_states.shape[-1], value_heads=value_states.shape[1],
            capacity=max(self.config.budget, num_new), dtype=key_states.dtype, device=key_states.device,
            config=self.config,
        )
        self.stopwatch = Stopwatch(self.storage.device)
        self._sequence_start = torch.tensor(self.tracker.sequence_start, device=self.storage.device)
        geometry = ModelGeometry(
            num_layers=self.num_layers, q_heads=self.query_heads or kv_heads, kv_heads=kv_heads, head_dim=key_dim,
            scale=self.scale if self.scale is not None else key_dim**-0.5,
        )
        if self.scorer.needs_queries and self.query_heads is None:
            raise ValueError(f"scorer {self.scorer.name!r} needs attention queries, which this integration cannot capture")
        self.scorer.bind(self.storage, geometry, self._sequence_start)

    def _current_step(self) -> Step:
        pending = self._require_pending()
        if pending.step is None:
            storage, tracker = self.storage, self.tracker
            device = storage.device
            num_new = pending.num_new
            positions = tracker.logical_len + torch.arange(num_new, device=device).view(1, -1).expand(storage.batch_size, -1)
            key_start = torch.zeros(storage.batch_size, dtype=torch.long, device=device)
            if pending.prefill:
                key_start = self._sequence_start.clone()
                positions = torch.where(positions < key_start.view(-1, 1), -1, positions)  # left padding
            stored = torch.tensor(pending.stored_count, dtype=torch.long, device=device)
            if pending.prefill:
                stored = stored - key_start  # padding queries are not real queries
            pending.step = Step(
                input_ids=pending.input_ids, hidden_states=None, slots=storage.write_slots(num_new),
                positions=positions, stored_count=stored, key_len=storage.physical_len + num_new, key_start=key_start,
            )
        return pending.step

    def _drop_left_padding(self) -> None:
        storage, starts = self.storage, self.tracker.sequence_start
        rows = [row for row, pad in enumerate(starts) if pad]
        lengths = [storage.physical_len_host[row] - starts[row] for row in rows]
        width = max(lengths)
        keep_index = torch.zeros(1, len(rows), 1, width, dtype=torch.long)
        for i, row in enumerate(rows):
            keep_index[0, i, 0, : lengths[i]] = torch.arange(starts[row], storage.physical_len_host[row])
        storage.compact(
            torch.tensor(rows, device=storage.device), keep_index.to(storage.device),
            torch.tensor(lengths, device=storage.device),
        )

    def _compact(self, rows: list[int]) -> None:
        storage, tracker = self.storage, self.tracker
        device = storage.device
        rows_t = torch.tensor(rows, device=device)
        width = max(storage.physical_len_host[row] for row in rows)
        with self.stopwatch.measure("scoring"):
            raw = self.scorer.score(rows_t)
            scores = to_granularity(raw, storage.layers_g, storage.heads_g, storage.num_layers, storage.kv_heads)
            scores = scores[..., :width]
        with self.stopwatch.measure("eviction"):
            positions = storage.positions[:, rows_t, :, :width]
            protected = protected_slots(
                positions,
                torch.tensor([tracker.prompt_end[row] for row in rows], device=device),
                torch.tensor([tracker.answer_start[row] for row in rows], device=device),
                self.config,
            )
            plan = select_keep(scores, storage.physical_len[rows_t], protected, self.config)
            storage.compact(rows_t, plan.keep_index, plan.keep_count)
        for row, kept in zip(rows, plan.keep_count.tolist()):
            self._trigger[row] = self.config.next_trigger(kept)
        self._stats.evictions += len(rows)
        if not self._warned_overflow and bool(plan.overflow.any()):
            self._warned_overflow = True
            warnings.warn(
                "dynts: protected tokens (prompt / answer) exceed the keep quota of a compaction; all of them are "
                "kept, and the row grows past the budget: it is next compacted after the usual growth "
                "(budget - compacted length) (warned once per cache)",
                RuntimeWarning, stacklevel=2,
            )

    def _record_stats(self) -> None:
        storage, stats = self.storage, self._stats
        stats.physical_len_history.append(list(storage.physical_len_host))
        stats.peak_resident_kv_bytes = max(stats.peak_resident_kv_bytes, storage.resident_kv_bytes())
        stats.allocated_kv_bytes = storage.allocated_bytes()
        stats.reallocations = storage.reallocations


def _left_pad_counts(padding_mask: torch.Tensor | None, num_new: int, batch_size: int) -> list[int]:
    """Leading zeros per row of a [rows, num_new] mask; raises if a zero follows a one (right/inner padding)."""
    if padding_mask is None:
        return [0] * batch_size
    if padding_mask.dim() != 2 or padding_mask.shape != (batch_size, num_new):
        raise ValueError(
            f"attention_mask must be a [batch, prompt_len] = [{batch_size}, {num_new}] padding mask, "
            f"got shape {tuple(padding_mask.shape)}"
        )
    real = padding_mask.bool()
    counts = (~real).long().cumprod(dim=1).sum(dim=1)  # leading zeros
    if bool((real.sum(dim=1) + counts != num_new).any()):
        raise ValueError("attention_mask: only left padding is supported (set tokenizer.padding_side='left')")
    return counts.tolist()

"""The dense compression loop of the HF integration: scorer -> policy -> slot table + K/V storage, one pass at a time.

An integration (``dynts.integrations.hf``) calls, per forward pass: ``begin_step`` (before the model runs: which
fed columns each row keeps), ``write`` (each compressed layer's new K/V; returns what attention reads),
``observe_queries`` (each layer's queries, if the scorer needs them), ``end_step`` (after the model ran: records
the tokens, lets the scorer observe them, drops padding and compacts the rows whose physical length reached their
trigger). ``start_call`` marks the start of a generation call (its input columns are protected, its EOS ids apply).
``dynts.static.StaticSession`` (``static_session``) runs fixed-shape one-token steps whose device work a CUDA graph
can capture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import CompressionConfig
from .device import to_device
from .policy import KeepPlan, OverflowNotice, Span, next_trigger, plan_compaction
from .scorers.base import CacheView, ModelGeometry, Scorer, Step
from .slots import SlotTable
from .static import StaticSession
from .stats import CacheStats, Stopwatch
from .storage import KVStorage
from .tracking import SequenceTracker, StepPlan

# Called after each compaction with (rows, positions held before, positions kept), per row, for layer 0 / head 0.
CompactionObserver = Callable[[list[int], list[torch.Tensor], list[torch.Tensor]], None]


@dataclass
class PreparedCompaction:
    """A compaction of ``rows`` (``row_index``: the same on the device) planned and queued on the device for physical
    lengths ``held`` and protected ``spans``, which the host has still to finish (``DenseCompressor.compact``).

    Queued ahead of the host's knowledge (``StaticSession.prepare``), its moves were gated on a device check of those
    assumptions; the host finishes it only when the same check passes on the host, which implies that the rows due,
    their lengths and spans are exactly these (``holds``)."""

    rows: list[int]
    row_index: torch.Tensor
    held: list[int]
    spans: list[list[Span]]
    plan: KeepPlan
    before: torch.Tensor | None = None  # [rows, capacity] layer 0 / head 0 positions before the moves (an observer's)

    def holds(self, rows: list[int], held: list[int], spans: Sequence[Sequence[Span]]) -> bool:
        return self.rows == rows and self.held == held and self.spans == [list(row) for row in spans]


@dataclass
class _Call:
    input_end: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


@dataclass
class _Pending:
    plan: StepPlan
    input_ids: torch.Tensor | None
    step: Step | None = None


class DenseCompressor:
    """Owns the K/V storage, the slot table, the scorer binding, the sequence tracker and the stats of one batch."""

    def __init__(
        self,
        config: CompressionConfig,
        scorer: Scorer,
        *,
        num_layers: int,
        query_heads: int | None = None,
        scale: float | None = None,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        history_limit: int = 4096,
    ) -> None:
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        scorer.validate(config)
        self.config, self.scorer = config, scorer
        self.num_layers, self.query_heads, self.scale = num_layers, query_heads, scale
        # Used by loops that never call start_call (a manual loop over the model's forward).
        self.default_call = _Call(0, tuple(eos_token_ids), pad_token_id)
        self.kv: KVStorage | None = None
        self.slots: SlotTable | None = None
        self.tracker: SequenceTracker | None = None
        self._stats = CacheStats(history_limit=history_limit)
        self.stopwatch: Stopwatch | None = None
        self.compaction_observer: CompactionObserver | None = None
        self.session: StaticSession | None = None
        self._pending: _Pending | None = None
        self._call: _Call | None = None  # a start_call waiting for its first forward pass
        self._history_mask: torch.Tensor | None = None
        self.triggers: list[int] = []  # per row, the physical length that triggers its next compaction
        self._overflow = OverflowNotice()

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
        """Columns fed before the current step (during a forward pass: its tokens' first position, which the model
        reads through ``get_seq_length`` for RoPE)."""
        if self._pending is not None:
            return self._pending.plan.first_column
        return 0 if self.tracker is None else self.tracker.logical_len

    @property
    def max_physical_len(self) -> int:
        return 0 if self.slots is None else max(self.slots.physical_len_host)

    def is_aligned(self) -> bool:
        """True while every row holds every column fed before the announced step (nothing evicted, dropped or
        skipped): the model's own 2D padding mask then describes the cache exactly."""
        return self.slots is None or all(length == self.logical_len for length in self.slots.physical_len_host)

    # ------------------------------------------------------------------ step protocol
    def start_call(self, input_end: int, eos_token_ids: Sequence[int], pad_token_id: int | None) -> None:
        """A generation call begins: columns ``[logical_len, input_end)`` are its input (protected with
        ``protect_prompt``; never scanned for EOS); rows finish on ``eos_token_ids`` and must then be fed
        ``pad_token_id``. Rows that finished an earlier call continue."""
        if self._pending is not None:
            raise RuntimeError("start_call during a forward pass")
        self._call = _Call(int(input_end), tuple(eos_token_ids), pad_token_id)

    def begin_step(
        self,
        *,
        batch_size: int,
        num_new: int,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """Announce a forward pass adding ``num_new`` columns to each of ``batch_size`` rows.

        ``attention_mask``: the 2D padding mask (1 = real token) over all columns so far plus the new ones, or over
        the new ones only. Padding anywhere is allowed: a row keeps only its real columns.
        """
        if self._pending is not None:
            raise RuntimeError("begin_step called twice without end_step (an interrupted forward pass?)")
        if self.session is not None:
            raise RuntimeError("a static decoding session is active; close it before running the model normally")
        if self.tracker is None:
            self.tracker = SequenceTracker(batch_size, self.config.think_end, protect_prompt=self.config.protect_prompt,
                                           protect_answer=self.config.protect_answer)
            self.triggers = [self.config.trigger] * batch_size
            if self._call is None:  # a manual loop: the first pass is the prompt
                self._call = _Call(num_new, self.default_call.eos_token_ids, self.default_call.pad_token_id)
        elif batch_size != self.tracker.rows:
            raise ValueError(f"batch size changed from {self.tracker.rows} to {batch_size}; use a new cache per batch")
        new_mask, history_mask = _split_mask(attention_mask, batch_size, self.logical_len, num_new)
        if self._call is not None:
            call, self._call = self._call, None
            self.tracker.start_call(call.input_end, call.eos_token_ids, call.pad_token_id)
            if self.logical_len:
                if history_mask is None:  # no mask (generate drops an all-ones one): every earlier column is real
                    history_mask = torch.ones(batch_size, self.logical_len, dtype=torch.long)
                self._apply_history_mask(history_mask)
        tokens = None if input_ids is None else input_ids.tolist()
        mask = None if new_mask is None or bool(new_mask.all()) else new_mask.tolist()
        plan = self.tracker.feed(num_new, tokens, mask)
        self._pending = _Pending(plan, input_ids)
        if self.slots is not None:
            self.ensure_capacity(self.max_physical_len + num_new)

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new K/V ([rows, heads, new, dim]); return the [rows, heads, length, dim] views attention reads."""
        if self.session is not None:
            return self.session.write(layer, key_states, value_states)
        pending = self._require_pending()
        if key_states.shape[2] != pending.plan.num_new:
            raise ValueError(f"layer {layer} wrote {key_states.shape[2]} tokens; the step announced {pending.plan.num_new}")
        if self.kv is None:
            self._allocate(key_states, value_states)
        step = self._current_step()
        lengths = self.slots.physical_len_host
        same_start = lengths[0] if all(length == lengths[0] for length in lengths) else None
        self.kv.write(layer, key_states, value_states, step.slots, first_slot=same_start)
        length = self.max_physical_len + pending.plan.num_new
        return self.kv.keys[layer, :, :, :length], self.kv.values[layer, :, :, :length]

    def observe_queries(self, layer: int, queries: torch.Tensor) -> None:
        """``queries`` [rows, q_heads, new, head_dim] (post-RoPE) of a layer whose K/V this step already wrote."""
        step = self._current_step()
        with torch.no_grad(), self.stopwatch.measure("scoring"):
            self.scorer.on_layer(layer, queries.detach(), step)

    def end_step(self, hidden_states: torch.Tensor | None = None) -> None:
        """Record the step's tokens, let the scorer observe them, drop padding, compact the rows that are full."""
        pending = self._require_pending()
        if self.kv is None:
            raise RuntimeError("end_step: no layer wrote K/V during this forward pass")
        step = self._current_step()
        if self.scorer.needs_hidden_states:
            step.hidden_states = None if hidden_states is None else hidden_states.detach()
        slots = self.slots
        slots.set_positions(step.slots, torch.where(step.stored, step.positions, -1))
        with torch.no_grad(), self.stopwatch.measure("scoring"):
            self.scorer.on_step(step)
        self._pending = None
        self._settle(pending.plan)
        self.compact_full_rows()
        self.record_stats()

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [rows, 1, new, length] for the announced step when rows are not aligned: each row sees its
        own held slots plus its kept new tokens causally (and each new token itself)."""
        pending = self._require_pending()
        device = self.slots.device
        num_new = pending.plan.num_new
        stored = to_device(pending.plan.stored, device, torch.bool)
        length = self.max_physical_len + num_new
        slot = torch.arange(length, device=device).view(1, 1, -1)
        physical = self.slots.physical_len.view(-1, 1, 1)
        query = torch.arange(num_new, device=device).view(1, -1, 1)
        offset = slot - physical  # index among the new tokens (negative: a held slot)
        in_new = (offset >= 0) & (offset < num_new)
        index = offset.clamp(0, num_new - 1).expand(stored.shape[0], 1, length)
        new_kept = torch.gather(stored.unsqueeze(1), 2, index) & in_new
        visible = (slot < physical) | (new_kept & (offset <= query)) | (offset == query)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return mask.unsqueeze(1)

    def resident_positions(self, layer: int) -> list[torch.Tensor]:
        return [] if self.slots is None else self.slots.resident_positions(layer)

    # ------------------------------------------------------------------ compaction
    def compact_full_rows(self, prepared: PreparedCompaction | None = None) -> None:
        """Compact every row at or above its trigger, again while a compaction leaves it there (a prompt far longer
        than the budget) and still removes tokens. ``prepared``: the first of these compactions, already queued
        (``prepare_compaction``) for exactly the rows due now, at their lengths and spans."""
        lengths = self.slots.physical_len_host
        full = [row for row, length in enumerate(lengths) if length >= self.triggers[row]]
        if prepared is not None and not prepared.holds(full, [lengths[row] for row in full],
                                                       [self.tracker.protected_spans[row] for row in full]):
            raise RuntimeError(
                f"dynts: a compaction queued ahead was planned for rows {prepared.rows} at lengths {prepared.held}, "
                f"but the rows due are {full} at lengths {[lengths[row] for row in full]} (or their protected spans "
                "changed): the session's check of its assumptions let it through (a bug)")
        while full:
            before = {row: lengths[row] for row in full}
            self.compact(full, prepared)
            prepared = None
            full = [row for row in full if before[row] > lengths[row] >= self.triggers[row]]

    def prepare_compaction(self, rows: list[int], held: list[int],
                           valid: torch.Tensor | None = None) -> PreparedCompaction:
        """Score and plan ``rows`` as if they held ``held`` tokens and their protected spans were the tracker's now,
        and queue the K/V and slot-state moves: device work queued behind whatever is queued, nothing read back.
        ``valid`` (a device bool): where False, every row keeps all it holds (the moves change nothing); the same
        for a plan with NaN scores, which ``compact`` then rejects. ``compact`` finishes it on the host."""
        slots = self.slots
        spans = [list(self.tracker.protected_spans[row]) for row in rows]
        row_index = to_device(rows, slots.device)
        with torch.no_grad():
            with self.stopwatch.measure("scoring"):
                scores = self.scorer.score(row_index)
            with self.stopwatch.measure("eviction"):
                plan = plan_compaction(scores, slots.positions[:, row_index], held, spans, self.config,
                                       num_layers=slots.num_layers, kv_heads=slots.kv_heads)
                usable = ~plan.nan_scores.any()
                if valid is not None:
                    usable &= valid
                # What an observer sees as held before: copied on the device, ahead of the moves.
                before = None if self.compaction_observer is None else slots.positions[0, row_index, 0].clone()
                self._move(row_index, plan.keep_index, plan.keep_count, usable)
        return PreparedCompaction(rows, row_index, held, spans, plan, before)

    def compact(self, rows: list[int], prepared: PreparedCompaction | None = None) -> None:
        """Compact ``rows`` now: score their slots, plan with the policy and queue the moves of K/V and slot state
        (unless ``prepared`` did that for these rows at their current lengths and spans), then read the plan's
        counts back (its one read-back, which waits for the planning only: the device moves while the host goes
        on) and update the host's side. A plan with NaN scores moved nothing and raises here."""
        slots = self.slots
        held = [slots.physical_len_host[row] for row in rows]
        if prepared is None:
            prepared = self.prepare_compaction(rows, held)
        kept, overflow = prepared.plan.read()
        for row, count, overflowed in zip(rows, kept, overflow):
            slots.physical_len_host[row] = count
            self.triggers[row] = next_trigger(self.config, count, overflowed)
        self._stats.compactions += len(rows)
        self._stats.evicted_tokens += sum(held) - sum(kept)
        if prepared.before is not None and self.compaction_observer is not None:
            before = [held_positions[:length].cpu() for held_positions, length in zip(prepared.before, held)]
            self.compaction_observer(rows, before, self._observed_positions(rows))
        self._overflow.check(overflow)

    def _observed_positions(self, rows: list[int]) -> list[torch.Tensor]:
        table = self.slots.positions[0, :, 0]
        return [table[row, : self.slots.physical_len_host[row]].cpu() for row in rows]

    def _move(self, row_index: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor,
              usable: torch.Tensor | None = None) -> None:
        """Move the K/V, then the slot state (which updates the device lengths the K/V move reads first). Where
        ``usable`` (a device bool) is False, every row keeps all it holds instead: nothing moves."""
        held = self.slots.physical_len[row_index]
        if usable is not None:
            every_slot = torch.arange(keep_index.shape[-1], device=keep_index.device)
            keep_index = torch.where(usable, keep_index, every_slot)
            keep_count = torch.where(usable, keep_count, held)
        self.kv.compact(row_index, keep_index, keep_count, held)
        self.slots.compact(row_index, keep_index, keep_count)

    def _drop_slots(self, keep: dict[int, list[int]]) -> None:
        """Keep only the listed slots of some rows (padding, masked history): not an eviction, nothing is scored."""
        rows = sorted(keep)
        width = max(1, max(len(keep[row]) for row in rows))
        table = [keep[row] + [0] * (width - len(keep[row])) for row in rows]  # padding past the keep count
        keep_index = to_device(table, self.slots.device).view(1, len(rows), 1, width)
        row_index, keep_count = to_device([rows, [len(keep[row]) for row in rows]], self.slots.device).unbind(0)
        self._move(row_index, keep_index, keep_count)
        for row in rows:
            self.slots.physical_len_host[row] = len(keep[row])

    # ------------------------------------------------------------------ static decoding
    def static_session(self, input_ids: torch.Tensor, pad_token_id: int, readback_every: int = 64) -> StaticSession:
        """Switch to fixed-shape one-token steps (see ``StaticSession``); ``input_ids`` ([rows, 1]) is the buffer the
        driving loop feeds each step."""
        if self.slots is None or self._pending is not None or self.session is not None:
            raise RuntimeError("a static session needs a prefilled cache, no step in progress and no other session")
        if self.scorer.needs_queries:
            raise ValueError(f"static decoding supports scorers that need no attention queries, not {self.scorer.name!r}")
        self.session = StaticSession(self, input_ids, pad_token_id, readback_every)
        return self.session

    # ------------------------------------------------------------------ internals
    def _require_pending(self) -> _Pending:
        if self._pending is None:
            raise RuntimeError("no step in progress: begin_step must run before the model writes K/V")
        return self._pending

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, kv_heads, num_new, key_dim = key_states.shape
        if self.tracker.rows != rows:
            raise ValueError(f"K/V batch {rows} does not match the step's batch {self.tracker.rows}")
        capacity = max(self.config.trigger, num_new)
        device, granularity = key_states.device, self.config.granularity
        self.kv = KVStorage(
            num_layers=self.num_layers, rows=rows, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_states.shape[-1],
            value_heads=value_states.shape[1], capacity=capacity, dtype=key_states.dtype, device=device,
        )
        if granularity == "per_kv_head" and value_states.shape[1] != kv_heads:
            raise ValueError(
                f"granularity='per_kv_head' needs as many value heads as key heads (got {value_states.shape[1]} and {kv_heads})"
            )
        row_start = [self.logical_len if start is None else start for start in self.tracker.row_start]
        self.slots = SlotTable(
            rows=rows, capacity=capacity, layers_g=1 if granularity == "shared" else self.num_layers,
            heads_g=kv_heads if granularity == "per_kv_head" else 1, num_layers=self.num_layers, kv_heads=kv_heads,
            device=device, row_start=to_device(row_start, device),
        )
        self.stopwatch = Stopwatch(torch.device(device))
        if self.scorer.needs_queries and self.query_heads is None:
            raise ValueError(f"scorer {self.scorer.name!r} needs attention queries, which this integration cannot capture")
        geometry = ModelGeometry(
            num_layers=self.num_layers, q_heads=self.query_heads or kv_heads, kv_heads=kv_heads, head_dim=key_dim,
            scale=self.scale if self.scale is not None else key_dim**-0.5,
        )
        self.scorer.bind(CacheView(self.slots, geometry, self.config, key_states.dtype, keys=self.kv.keys_in_slot_order))

    def ensure_capacity(self, needed: int) -> None:
        """Grow the K/V storage and the slot table to hold ``needed`` slots per row (rarely: buffers then move)."""
        if self.kv.ensure_capacity(needed):
            self.slots.ensure_capacity(self.kv.capacity)

    def _current_step(self) -> Step:
        pending = self._require_pending()
        if pending.step is None:
            pending.step = self._build_step(pending.plan, pending.input_ids)
            self.slots.claim(pending.step.slots)
        return pending.step

    def _build_step(self, plan: StepPlan, input_ids: torch.Tensor | None) -> Step:
        slots = self.slots
        device, num_new, rows = slots.device, plan.num_new, slots.rows
        stored = to_device(plan.stored, device, torch.bool).view(rows, num_new)
        positions = (plan.first_column + torch.arange(num_new, device=device)).view(1, -1).expand(rows, -1)
        step = Step(
            input_ids=None if input_ids is None else input_ids.to(device), hidden_states=None,
            slots=slots.write_slots(num_new), positions=positions, stored=stored,
            key_len=slots.physical_len + num_new, all_stored=all(all(row) for row in plan.stored),
        )
        counts = plan.stored_counts()
        suffix = [all(kept == (offset >= num_new - count) for offset, kept in enumerate(row))
                  for row, count in zip(plan.stored, counts)]
        regular = all(ok and (count in (0, num_new) or length == 0)
                      for ok, count, length in zip(suffix, counts, slots.physical_len_host))
        if regular:
            step.query_count, step.key_start = to_device(
                [counts, [num_new - count if 0 < count < num_new else 0 for count in counts]], device).unbind(0)
        else:
            step.query_valid = stored
            width = self.max_physical_len + num_new
            slot = torch.arange(width, device=device).view(1, -1)
            offset = slot - slots.physical_len.view(-1, 1)
            index = offset.clamp(0, num_new - 1)
            step.key_valid = (offset < 0) | (torch.gather(stored, 1, index) & (offset < num_new))
        return step

    def _settle(self, plan: StepPlan) -> None:
        """After a pass: lengths grow by the kept tokens; kept tokens that follow dropped ones move up."""
        slots = self.slots
        keep: dict[int, list[int]] = {}
        growth = []
        for row, kept in enumerate(plan.stored):
            count = sum(kept)
            if all(kept[:count]):  # kept tokens first: the dropped ones sit past the new end already
                growth.append(count)
                continue
            growth.append(plan.num_new)
            start = slots.physical_len_host[row]
            keep[row] = list(range(start)) + [start + offset for offset, value in enumerate(kept) if value]
        slots.grow_lengths(growth)
        if keep:
            self._drop_slots(keep)

    def _apply_history_mask(self, history_mask: torch.Tensor) -> None:
        """A new call's mask over earlier columns: columns it masks out leave the cache; columns it marks real that the
        cache never kept (padding, after a row's EOS) cannot be restored: an error."""
        tracker, slots = self.tracker, self.slots
        mask_rows = history_mask.tolist()
        problems = []
        for row in range(tracker.rows):
            columns = tracker.unkept_but_real(row, mask_rows[row])
            if columns:
                problems.append(f"row {row}: columns {columns[:5]}{'...' if len(columns) > 5 else ''}")
        if problems:
            raise ValueError(
                "attention_mask marks as real some earlier columns this cache never kept (padding, or tokens after a "
                "row's EOS, which a finished row does not keep): " + "; ".join(problems) + ". Pass an attention_mask "
                "that masks them (0), as for the padding of the first call"
            )
        if slots is None:
            return
        positions = slots.positions[:, :, :, : self.max_physical_len]
        visible = torch.gather(history_mask.to(slots.device).bool(), 1, positions[0, :, 0].clamp(min=0))
        resident = positions[0, :, 0] >= 0
        if slots.layers_g > 1 or slots.heads_g > 1:
            if bool((resident & ~visible).any()):
                raise ValueError(
                    "attention_mask masks out earlier tokens of a reused cache: supported with granularity='shared' "
                    f"only (this cache uses {self.config.granularity!r})"
                )
            return
        keep = {}
        for row in range(tracker.rows):
            length = slots.physical_len_host[row]
            row_visible = visible[row, :length]
            if bool(row_visible.all()):
                continue
            dropped = positions[0, row, 0, :length][~row_visible].tolist()
            for column in dropped:
                tracker.unkept[row].append((column, column + 1))
            tracker.unkept[row].sort()
            keep[row] = torch.nonzero(row_visible).flatten().tolist()
        if keep:
            self._drop_slots(keep)

    def record_stats(self, lengths: list[int] | None = None) -> None:
        """Account for the rows' lengths after a step (``stats``): ``lengths``, or the physical lengths now."""
        stats = self._stats
        stats.record_step(self.slots.physical_len_host if lengths is None else lengths, self.kv.bytes_per_token)
        stats.allocated_kv_bytes = self.kv.allocated_bytes() + self.slots.state_bytes()
        stats.reallocations = self.slots.reallocations


def _split_mask(
    attention_mask: torch.Tensor | None, rows: int, logical_len: int, num_new: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask of the new columns, mask of the earlier columns or None) from a 2D padding mask."""
    if attention_mask is None:
        return None, None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != rows:
        raise ValueError(
            f"attention_mask must be a 2D [batch, columns] padding mask with batch {rows}, got shape "
            f"{tuple(attention_mask.shape)}"
        )
    width = attention_mask.shape[1]
    if width == logical_len + num_new:
        return attention_mask[:, logical_len:], (attention_mask[:, :logical_len] if logical_len else None)
    if width == num_new:
        return attention_mask, None
    raise ValueError(
        f"attention_mask has {width} columns; expected the columns so far plus the new ones ({logical_len} + {num_new}) "
        f"or the new ones only ({num_new})"
    )

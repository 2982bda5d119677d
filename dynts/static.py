"""Static decoding: fixed-shape one-token steps over a prefilled cache, whose device work a CUDA graph captures.

Integration-independent: ``integrations/hf_static.py`` (``StaticDecoder``) drives it for HF models.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from .config import check_int
from .device import HostCopy, to_device
from .scorers.base import Step

if TYPE_CHECKING:
    from .compressor import DenseCompressor, PreparedCompaction


class StaticSession:
    """Fixed-shape one-token decode steps over a prefilled ``DenseCompressor``, for a CUDA-graph-captured loop.

    Inside a step only device work happens (capturable): ``lengths`` (start: each row's attention length; claims
    the new slots), ``write`` (each layer's K/V at each row's physical end: ``kv_slots``), ``commit`` (slot positions,
    scorer observation, device lengths, the fed token logged, rows that fed an EOS deactivated). The host does not
    look at every step: it knows how the lengths of active rows grow, so it only synchronises when a row may reach
    its trigger or the token log is full (``due``): ``prepare`` queues the logged tokens' copy to the host and, if a
    row may reach its trigger, its compaction behind the steps (gated on the device by a check of what it assumes);
    ``read`` waits for the tokens; ``settle`` updates the tracker, finishes that compaction (or plans it again if the
    check failed), records stats. The driver may queue the next step between ``read`` and ``settle`` when no row can
    have reached its trigger, or else inside ``settle`` once the compaction is finished on the host, so that the
    host's bookkeeping overlaps the device's work. Buffers only move on a capacity growth, after which the driver
    captures again.

    The K/V storage is in its ring layout while the session is open (``KVStorage``: a compaction then leaves the
    local window where it is); attention reads each row from ``kv_start``. ``close`` restores the plain layout.
    """

    def __init__(self, compressor: "DenseCompressor", input_ids: torch.Tensor, pad_token_id: int,
                 readback_every: int = 64) -> None:
        self.compressor = compressor
        slots, tracker = compressor.slots, compressor.tracker
        device, rows = slots.device, slots.rows
        self.pad_token_id = pad_token_id
        self.readback_every = check_int("readback_every", readback_every, minimum=1)
        self.active = to_device([not done for done in tracker.finished], device, torch.bool)
        self.eos_token_ids = to_device(sorted(tracker.eos_token_ids), device)
        # Tokens that break what a compaction queued ahead assumes (``prepare``): an EOS (the row stops growing) or the
        # last token of the end-of-thinking marker (an answer span may open and be protected: a marker found in these
        # steps ends in them, and one that ended earlier was found then).
        answer_opens = tracker.think_end[-1:] if tracker.protect_answer else ()
        watched = set(tracker.eos_token_ids) | set(answer_opens)
        self._watched = frozenset(watched)
        self._watched_on_device = to_device(sorted(watched), device)
        self.step = Step(
            input_ids=input_ids, hidden_states=None, slots=slots.physical_len.view(-1, 1),
            positions=torch.full((rows, 1), compressor.logical_len, dtype=torch.long, device=device),
            stored=self.active.view(-1, 1).clone(), key_len=slots.physical_len + 1,
            query_count=self.active.long(), key_start=torch.zeros(rows, dtype=torch.long, device=device),
        )
        # Tokens fed since the last read, one column per step (written inside the step at ``_log_position``).
        self._log = torch.full((rows, self.readback_every), pad_token_id, dtype=torch.long, device=device)
        self._log_position = torch.zeros(1, dtype=torch.long, device=device)
        self.fed: list[list[int]] = [[] for _ in range(rows)]  # every token fed, per row, up to the last settle
        compressor.ensure_capacity(max(compressor.triggers))  # a row reaches its trigger between syncs
        compressor.kv.set_ring(True)
        # Where this step's K/V go in the storage: each row's physical end, in the ring layout.
        self.kv_slots = compressor.kv.physical_index(self.step.slots).view(-1)
        self._unsynced = 0
        self._step_before_settling = False
        self._logged: HostCopy | None = None  # the tokens of the steps since the last read, on their way to the host
        self._steps_ran: torch.cuda.Event | None = None
        self._prepared: PreparedCompaction | None = None
        self._running_when_prepared: list[bool] = []
        self._plan_next_sync()

    def close(self) -> None:
        self.compressor.kv.set_ring(False)
        self.compressor.session = None

    @property
    def kv_start(self) -> torch.Tensor:
        """[rows] the storage index of each row's first slot (attention kernels take it as ``start``)."""
        return self.compressor.kv.start

    def state_buffers(self) -> list[torch.Tensor]:
        """The device buffers a step changes (a driver that runs a warm-up step before capture restores them)."""
        return [self.compressor.slots.physical_len, self.step.positions, self.active, self._log_position]

    # ------------------------------------------------------------------ device side (capturable)
    def lengths(self) -> torch.Tensor:
        """Start of a step: each row's attention length (held tokens plus the new one); claims the new slots."""
        slots = self.compressor.slots
        self.step.key_len.copy_(slots.physical_len + 1)
        slots.claim(self.step.slots)
        self.kv_slots.copy_(self.compressor.kv.physical_index(self.step.slots).view(-1))
        return self.step.key_len

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's K/V of one layer at each row's physical end; attention reads the whole capacity up to
        ``lengths()``."""
        kv = self.compressor.kv
        kv.write(layer, key_states, value_states, self.kv_slots.view(-1, 1))
        return kv.keys[layer], kv.values[layer]

    def commit(self, hidden_states: torch.Tensor | None) -> None:
        """End of a step: slot positions of the active rows, scorer observation, device lengths, the fed tokens
        logged; a row that was fed an EOS keeps it and is inactive from the next step on."""
        compressor, step, active = self.compressor, self.step, self.active
        slots = compressor.slots
        fed = step.input_ids.view(-1)
        step.hidden_states = hidden_states if compressor.scorer.needs_hidden_states else None
        step.stored.copy_(active.view(-1, 1))
        step.query_count.copy_(active)
        slots.set_positions(step.slots, torch.where(active.view(-1, 1), step.positions, -1))
        compressor.scorer.on_step(step)
        slots.physical_len += active
        step.positions += 1
        self._log.index_copy_(1, self._log_position, fed.view(-1, 1))
        self._log_position += 1
        active &= ~torch.isin(fed, self.eos_token_ids)

    # ------------------------------------------------------------------ host side
    @property
    def unsynced_steps(self) -> int:
        return self._unsynced

    def stepped(self) -> None:
        """Count a step the driver ran."""
        self._unsynced += 1

    @property
    def due(self) -> bool:
        """The host must ``read`` (and ``settle``) before the next step."""
        return self._unsynced >= self._countdown

    def prepare(self) -> None:
        """Before the host waits for the steps queued since the last read: queue the copy of the tokens they fed to
        the host (``read`` waits for that copy only) and, if a row may reach its trigger in them, its compaction
        (planned and moved behind those steps: ``DenseCompressor.prepare_compaction``), so that the device does not
        wait for the host's bookkeeping at a compaction. The compaction assumes what the host does not know yet:
        that no row still running was fed an EOS or the end-of-thinking marker's last token in these steps (so each
        grew by one token per step and no protected span changed). The device checks that on the tokens it logged
        and moves nothing where it fails; ``settle`` makes the same check on the host, then finishes the compaction
        or plans it again."""
        self._prepared = None
        compressor, steps = self.compressor, self._unsynced
        logged = self._log[:, :steps]
        self._logged = HostCopy(logged)
        self._log_position.zero_()
        if not steps or self._room > steps:
            return
        finished = compressor.tracker.finished
        held = [length + (0 if done else steps) for length, done in zip(compressor.slots.physical_len_host, finished)]
        rows = [row for row, length in enumerate(held) if length >= compressor.triggers[row]]
        if not rows:
            return
        self._running_when_prepared = [not done for done in finished]
        running = to_device(self._running_when_prepared, logged.device, torch.bool)
        broken = (torch.isin(logged, self._watched_on_device) & running.view(-1, 1)).any()
        self._prepared = compressor.prepare_compaction(rows, [held[row] for row in rows], valid=~broken)

    def read(self) -> list[list[int]]:
        """The tokens fed since the last read, per row: waits for the steps that fed them (for the copy ``prepare``
        queued), not for a compaction queued after them; the token log starts over.

        Until ``settle`` tracks them, the driver may run one more step if ``may_step_before_settling``: the host's
        bookkeeping then overlaps that step instead of holding the device idle."""
        if self._logged is None:
            raise RuntimeError("StaticSession.read: call prepare() first (it queues the tokens' copy to the host)")
        steps = self._unsynced
        logged = self._logged.wait().tolist()
        self._steps_ran, self._logged = self._logged.done, None
        self._unsynced = 0
        # No row can have reached its trigger in these steps, so nothing is compacted before the next one.
        self._step_before_settling = self._room > steps
        return logged

    @property
    def steps_ran(self) -> torch.cuda.Event | None:
        """A CUDA event recorded right after the steps of the last ``read`` (None off CUDA), for timing."""
        return self._steps_ran

    @property
    def may_step_before_settling(self) -> bool:
        return self._step_before_settling

    def settle(self, logged: list[list[int]], step_ahead: Callable[[], None] | None = None) -> bool:
        """Track the tokens ``read`` returned, compact the rows that reached their trigger, record stats. Returns
        True when the buffers grew (the driver must capture again).

        ``step_ahead``: called once the compaction (if any) is queued, unless the buffers grew: the driver queues the
        next step there, behind the moves, so that the host's remaining bookkeeping overlaps it."""
        compressor = self.compressor
        slots, tracker = compressor.slots, compressor.tracker
        steps = len(logged[0]) if logged else 0
        if not steps:
            return False
        # The whole interval in one feed (the same as one feed per step: generated columns are tracked one by
        # one), then each step's lengths for the stats.
        plan = tracker.feed(steps, logged, None)
        lengths = slots.physical_len_host
        before = list(lengths)
        for row, kept in enumerate(plan.stored):
            lengths[row] += sum(kept)
        prepared, self._prepared = self._prepared, None
        if prepared is not None and self._broken(logged):
            prepared = None  # the device made the same check and moved nothing: plan again, now that the host knows
        compressor.compact_full_rows(prepared)
        capacity = compressor.kv.capacity
        compressor.ensure_capacity(max(compressor.triggers))
        moved = compressor.kv.capacity != capacity
        self._plan_next_sync()
        if step_ahead is not None and not moved:
            step_ahead()
        # What only the host needs comes after the compaction (and perhaps the next step) is queued, while the
        # device works: the fed tokens, and the stats of each step (its lengths before the compaction).
        for row, tokens in enumerate(logged):
            self.fed[row].extend(tokens)
        grown = [list(accumulate(kept, initial=length))[1:] for length, kept in zip(before, plan.stored)]
        for offset in range(steps - 1):
            compressor.record_stats([row[offset] for row in grown])
        compressor.record_stats()
        return moved

    @property
    def finished(self) -> bool:
        """Every row finished (as of the last settle)."""
        return all(self.compressor.tracker.finished)

    def _broken(self, logged: list[list[int]]) -> bool:
        """The host's side of the check ``prepare`` queued on the device (the same rule on the same tokens): a row
        running when the compaction was prepared was fed a watched token."""
        watched = self._watched
        return any(running and not watched.isdisjoint(tokens)
                   for running, tokens in zip(self._running_when_prepared, logged))

    def _plan_next_sync(self) -> None:
        """Steps until a row still growing may reach its trigger, or the token log fills."""
        compressor = self.compressor
        lengths, finished = compressor.slots.physical_len_host, compressor.tracker.finished
        room = [trigger - length for trigger, length, done in zip(compressor.triggers, lengths, finished) if not done]
        self._room = min(room, default=self.readback_every + 1)  # steps from the last read (rows grow one per step)
        self._countdown = max(1, min(self.readback_every, self._room))

"""The slot table: which token each physical slot of a row holds, the scorers' per-slot state, and the lengths.

K/V live elsewhere (``KVStorage`` in the HF integration, vLLM's paged blocks); the slot table is the bookkeeping
that must move exactly as the K/V move, and it is all the vLLM worker keeps per request. Tensors, one row per
sequence (HF) or a single row (one vLLM request):

* ``positions`` [layers_g, rows, heads_g, capacity] int64: the logical position held by each slot, -1 when free.
  (layers_g, heads_g) is (1, 1) for ``shared``, (layers, 1) for ``per_layer`` and (layers, kv_heads) for
  ``per_kv_head`` granularity.
* per-slot scorer state (``add_state``): [layers_x, rows, heads_x, capacity], at least as fine as the granularity.
* ``physical_len`` [rows] on the device (drives kernels), mirrored in ``physical_len_host`` (drives control flow).

Invariants: slots ``[0, physical_len)`` of a row hold its tokens in increasing logical position; every state value of
a slot describes the token in that slot. A slot is reused after a compaction frees it, so ``claim`` resets every
state tensor at the slots a step is about to write, before any scorer looks at them (one mechanism for every scorer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .device import to_device


@dataclass
class _State:
    tensor: torch.Tensor
    fill: float | bool


class SlotTable:
    def __init__(
        self,
        *,
        rows: int,
        capacity: int,
        layers_g: int,
        heads_g: int,
        num_layers: int,
        kv_heads: int,
        device: torch.device | str,
        row_start: torch.Tensor | None = None,
    ) -> None:
        for name, value in (("rows", rows), ("capacity", capacity), ("num_layers", num_layers), ("kv_heads", kv_heads)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.rows, self.capacity = rows, capacity
        self.layers_g, self.heads_g = layers_g, heads_g
        self.num_layers, self.kv_heads = num_layers, kv_heads
        self.device = torch.device(device)
        self.positions = torch.full((layers_g, rows, heads_g, capacity), -1, dtype=torch.long, device=self.device)
        self.physical_len = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.physical_len_host: list[int] = [0] * rows
        # First logical position of each row's own tokens (left padding precedes it); scorers count sinks from it.
        self.row_start = (torch.zeros(rows, dtype=torch.long, device=self.device) if row_start is None
                          else row_start.to(device=self.device, dtype=torch.long))
        self._states: dict[str, _State] = {}
        self.reallocations = 0

    # ------------------------------------------------------------------ scorer state
    def add_state(
        self, name: str, *, dtype: torch.dtype = torch.float32, fill: float | bool = 0.0,
        per_layer: bool = False, per_head: bool = False,
    ) -> None:
        """Register per-slot state that follows the tokens through compaction and is reset to ``fill`` when its
        slot is claimed for a new token. Read it with ``state(name)`` at each use (growth reallocates it)."""
        if name in self._states:
            raise ValueError(f"slot state {name!r} is already registered")
        layers_x = self.num_layers if (per_layer or self.layers_g > 1) else 1
        heads_x = self.kv_heads if (per_head or self.heads_g > 1) else 1
        tensor = torch.full((layers_x, self.rows, heads_x, self.capacity), fill, dtype=dtype, device=self.device)
        self._states[name] = _State(tensor, fill)

    def state(self, name: str) -> torch.Tensor:
        return self._states[name].tensor

    def state_bytes(self) -> int:
        tensors = [self.positions, *(state.tensor for state in self._states.values())]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ a step
    def write_slots(self, num_new: int) -> torch.Tensor:
        """[rows, num_new] slots where a step's tokens go: right after each row's physical end."""
        return self.physical_len.view(-1, 1) + torch.arange(num_new, device=self.device).view(1, -1)

    def claim(self, slots: torch.Tensor) -> None:
        """Reset every state tensor and position at ``slots`` ([rows, new]) before a step writes there.

        Device work only (no host synchronisation): usable inside a captured CUDA graph."""
        self._scatter(self.positions, slots, torch.full(slots.shape, -1, dtype=torch.long, device=self.device))
        for state in self._states.values():
            values = torch.full(slots.shape, state.fill, dtype=state.tensor.dtype, device=self.device)
            self._scatter(state.tensor, slots, values)

    def scatter(self, name: str, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Store one value per new token ([rows, new]) of state ``name`` at ``slots`` ([rows, new]), for every layer
        and head the state has."""
        state = self.state(name)
        self._scatter(state, slots, values.to(state.dtype))

    def set_positions(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Record the logical positions ([rows, new], -1 for tokens not kept) of the tokens written at ``slots``."""
        self._scatter(self.positions, slots, positions)

    @staticmethod
    def _scatter(table: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        """The one slot scatter: ``table[l, r, h, slots[r, j]] = values[r, j]`` for every l and h."""
        layers_x, rows, heads_x, _ = table.shape
        index = slots.view(1, rows, 1, -1).expand(layers_x, -1, heads_x, -1)
        table.scatter_(3, index, values.view(1, rows, 1, -1).expand_as(index))

    def grow_lengths(self, counts: list[int]) -> None:
        """Add ``counts[row]`` kept tokens to each row's physical length."""
        self.physical_len += to_device(counts, self.device)
        for row, count in enumerate(counts):
            self.physical_len_host[row] += count

    # ------------------------------------------------------------------ capacity and compaction
    def ensure_capacity(self, needed: int) -> bool:
        """Grow every per-slot tensor to hold ``needed`` slots; True if it grew (tensors were reallocated)."""
        if needed <= self.capacity:
            return False
        new_capacity = max(needed, self.capacity + self.capacity // 4)
        self.positions = grow_slots(self.positions, new_capacity, -1)
        for state in self._states.values():
            state.tensor = grow_slots(state.tensor, new_capacity, state.fill)
        self.capacity = new_capacity
        self.reallocations += 1
        return True

    def compact(self, rows: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor) -> None:
        """Keep, for each of ``rows``, the slots ``keep_index[..., :keep_count]`` (a ``dynts.policy.KeepPlan``'s,
        valid by construction: moved without a device check): the same move the integration applies to the K/V.
        Freed slots are marked -1 (their state is reset on reuse). int64 tensors on this table's device, and device
        work only: the owner sets ``physical_len_host`` of these rows once it has read the plan's counts."""
        tensors = [self.positions, *(state.tensor for state in self._states.values())]
        kernels.compact_([tensor.unsqueeze(-1) for tensor in tensors], rows, keep_index, keep_count, check_values=False)
        self.physical_len.index_copy_(0, rows, keep_count)
        slot = torch.arange(self.capacity, device=self.device).view(1, 1, 1, -1)
        self.positions.masked_fill_(slot >= self.physical_len.view(1, -1, 1, 1), -1)

    # ------------------------------------------------------------------ introspection
    def resident_positions(self, layer: int) -> list[torch.Tensor]:
        """Per row, the logical positions held: [n] (shared/per_layer) or [kv_heads, n] (per_kv_head)."""
        table = self.positions[layer if self.layers_g > 1 else 0]
        result = []
        for row, length in enumerate(self.physical_len_host):
            held = table[row, :, :length]
            result.append(held if self.heads_g > 1 else held[0])
        return result


def grow_slots(tensor: torch.Tensor, capacity: int, fill: float | bool) -> torch.Tensor:
    """A copy of a [layers, rows, heads, slots, ...] tensor with ``capacity`` slots, new ones set to ``fill``."""
    shape = list(tensor.shape)
    old = shape[3]
    shape[3] = capacity
    bigger = torch.full(shape, fill, dtype=tensor.dtype, device=tensor.device)
    bigger.narrow(3, 0, old).copy_(tensor)
    return bigger

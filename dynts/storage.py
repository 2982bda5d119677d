"""Dense K/V storage of the HF integration: preallocated buffers that compaction rewrites in place.

* ``keys``   [layers, rows, kv_heads, capacity, key_dim]
* ``values`` [layers, rows, value_heads, capacity, value_dim]

One tensor for all compressed layers, so that one kernel launch compacts a whole step. Which token a slot holds,
the rows' physical lengths and the scorers' per-slot state are in the ``SlotTable`` (``dynts.slots``), which the
owner (``DenseCompressor``) compacts together with these buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import kernels
from .device import to_device
from .slots import grow_slots


class KVStorage:
    def __init__(
        self,
        *,
        num_layers: int,
        rows: int,
        kv_heads: int,
        key_dim: int,
        value_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        value_heads: int | None = None,
    ) -> None:
        for name, value in (("num_layers", num_layers), ("rows", rows), ("kv_heads", kv_heads),
                            ("key_dim", key_dim), ("value_dim", value_dim), ("capacity", capacity)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.num_layers, self.rows = num_layers, rows
        self.kv_heads = kv_heads
        self.value_heads = kv_heads if value_heads is None else value_heads
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = capacity
        self.keys = torch.zeros(num_layers, rows, kv_heads, capacity, key_dim, dtype=dtype, device=self.device)
        self.values = torch.zeros(num_layers, rows, self.value_heads, capacity, value_dim, dtype=dtype, device=self.device)

    @property
    def bytes_per_token(self) -> int:
        """K/V bytes one token occupies across all compressed layers and heads."""
        per_layer = self.kv_heads * self.keys.shape[-1] + self.value_heads * self.values.shape[-1]
        return self.num_layers * per_layer * self.keys.element_size()

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def ensure_capacity(self, needed: int) -> bool:
        """Grow the buffers to hold ``needed`` slots (rare: a prompt or protected span longer than planned)."""
        if needed <= self.capacity:
            return False
        capacity = max(needed, self.capacity + self.capacity // 4)
        self.keys = grow_slots(self.keys, capacity, 0)
        self.values = grow_slots(self.values, capacity, 0)
        self.capacity = capacity
        return True

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor, slots: torch.Tensor,
              first_slot: int | None = None) -> None:
        """Store a step's K/V ([rows, heads, new, dim]) of one layer at ``slots`` ([rows, new]).

        ``first_slot``: when every row writes at the same slots (``first_slot + arange(new)``), a plain slice write.
        K/V are stored detached: the cache serves inference, gradients do not flow into cached tokens.
        """
        key_states, value_states = key_states.detach(), value_states.detach()
        if first_slot is not None:
            num_new = key_states.shape[2]
            self.keys[layer, :, :, first_slot : first_slot + num_new] = key_states
            self.values[layer, :, :, first_slot : first_slot + num_new] = value_states
            return
        rows = torch.arange(self.rows, device=self.device).view(-1, 1)
        self.keys[layer][rows, :, slots] = key_states.transpose(1, 2)
        self.values[layer][rows, :, slots] = value_states.transpose(1, 2)

    def compact(self, rows: Sequence[int], keep_index: torch.Tensor, keep_count: Sequence[int]) -> None:
        """Keep, for each of ``rows``, the slots ``keep_index[..., :keep_count]`` of every layer (a
        ``dynts.policy.KeepPlan``'s, valid by construction: moved without a device check; one launch each for K
        and V)."""
        rows_t, keep_count_t = to_device([list(rows), list(keep_count)], self.device).unbind(0)
        kernels.compact_((self.keys, self.values), rows_t, keep_index, keep_count_t, check_values=False)

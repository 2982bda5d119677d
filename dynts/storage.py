"""Dense K/V storage of the HF integration: preallocated buffers that compaction rewrites in place.

* ``keys``   [layers, rows, kv_heads, capacity, key_dim]
* ``values`` [layers, rows, value_heads, capacity, value_dim]

One tensor for all compressed layers, so that one kernel launch compacts a whole step. Which token a slot holds,
the rows' physical lengths and the scorers' per-slot state are in the ``SlotTable`` (``dynts.slots``), which the
owner (``DenseCompressor``) compacts together with these buffers.

Two layouts of a row's slots (slot s = the s-th token the slot table lists):

* plain: slot s at index s. The HF forward path reads the buffers as a dense prefix ``[:physical_len]``; compaction
  moves the kept slots to the front.
* ring (``ring = True``, a static decode session): slot s at index ``(start[row] + s) % capacity``. Compaction moves
  the kept slots to the end of the row's held slots instead, so the local window (the kept tail, the bulk of what a
  row keeps) does not move: only the kept tokens older than the last evicted one do. ``start`` advances by the
  evicted count. New tokens go to ``physical_index(physical_len)``; the decode attention kernel takes ``start``.
  Leaving the ring layout (``set_ring(False)``, when the session closes) rotates every row back to start 0.
"""

from __future__ import annotations

import torch

from . import kernels
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
        self.ring = False
        # Ring layout only: the index of each row's slot 0; all zero in the plain layout. Updated in place, so that a
        # captured CUDA graph reads the current values; the host never reads it, it only knows whether a ring
        # compaction may have moved a start since the last unroll (``_rotated``).
        self.start = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._rotated = False

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
        self._unroll()  # the new slots go after index capacity - 1, which is a row's end only at start 0
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

    def compact(self, rows: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor,
                held: torch.Tensor) -> None:
        """Keep, for each of ``rows`` (holding ``held`` slots), the slots ``keep_index[..., :keep_count]`` of every
        layer (a ``dynts.policy.KeepPlan``'s, valid by construction: moved without a device check; one launch each
        for K and V), in this storage's layout. All int64 tensors on this storage's device, and device work only:
        the moves are queued without the host knowing the counts (``held`` is read in the ring layout only)."""
        if not self.ring:
            kernels.compact_((self.keys, self.values), rows, keep_index, keep_count, check_values=False)
            return
        start = self.start[rows]
        kernels.compact_ring_((self.keys, self.values), rows, keep_index, keep_count, held, start,
                              check_values=False)
        self.start.index_copy_(0, rows, torch.remainder(start + held - keep_count, self.capacity))
        self._rotated = True

    # ------------------------------------------------------------------ ring layout
    def set_ring(self, enabled: bool) -> None:
        """Enter the ring layout (every row at start 0 then), or leave it: rows rotate back to start 0."""
        if not enabled:
            self._unroll()
        self.ring = enabled

    def physical_index(self, slots: torch.Tensor) -> torch.Tensor:
        """Where slots ([rows, n]) of each row are stored (device work only: usable inside a captured graph)."""
        return torch.remainder(self.start.view(-1, 1) + slots, self.capacity)

    def keys_in_slot_order(self, layer: int) -> torch.Tensor:
        """[rows, kv_heads, capacity, key_dim]: slot s of each row at index s (the buffer itself in the plain layout;
        a gathered copy in the ring layout)."""
        if not self._rotated:
            return self.keys[layer]
        return torch.gather(self.keys[layer], 2, self._slot_order(self.keys))

    def _slot_order(self, buffer: torch.Tensor) -> torch.Tensor:
        """Gather index over one layer of ``buffer`` that reads each row from its start on."""
        _, rows, heads, capacity, dim = buffer.shape
        physical = self.physical_index(torch.arange(capacity, device=self.device).view(1, -1).expand(rows, -1))
        return physical.view(rows, 1, capacity, 1).expand(rows, heads, capacity, dim)

    def _unroll(self) -> None:
        """Rotate every row to start 0 (one layer at a time: the copy holds one layer's buffer)."""
        if not self._rotated:
            return
        for buffer in (self.keys, self.values):
            index = self._slot_order(buffer)
            for layer in range(self.num_layers):
                buffer[layer].copy_(torch.gather(buffer[layer], 2, index))
        self.start.zero_()
        self._rotated = False

"""Cache storage: preallocated K/V buffers with a logical and a physical length per row.

Layout (one tensor for all compressed layers, so that one kernel launch compacts a whole step):

* ``keys``   [layers, rows, kv_heads, capacity, key_dim]
* ``values`` [layers, rows, value_heads, capacity, value_dim]
* ``positions`` [layers_g, rows, heads_g, capacity] int64: the logical position held by each slot, where
  (layers_g, heads_g) is (1, 1) for ``shared``, (layers, 1) for ``per_layer`` and (layers, kv_heads) for
  ``per_kv_head`` granularity. Unused slots hold -1.
* ``slot_tensors``: per-slot state of the scorer (accumulated attention, per-token scores ...), compacted
  together with the K/V.

The physical length of a row (slots ``[0, physical_len)`` hold its tokens, in logical order) is the same for every
layer and head: each compaction keeps the same number of tokens everywhere, only *which* tokens may differ.
The storage owns all these buffers; scorers and integrations only read them or register slot tensors.
"""

from __future__ import annotations

import torch

from . import kernels
from .config import CompressionConfig


class KVStorage:
    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        kv_heads: int,
        key_dim: int,
        value_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        config: CompressionConfig,
        value_heads: int | None = None,
    ) -> None:
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("kv_heads", kv_heads),
                            ("key_dim", key_dim), ("value_dim", value_dim), ("capacity", capacity)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        value_heads = kv_heads if value_heads is None else value_heads
        if config.granularity == "per_kv_head" and value_heads != kv_heads:
            raise ValueError(
                f"granularity='per_kv_head' needs as many value heads as key heads (got {value_heads} and {kv_heads})"
            )
        self.config = config
        self.num_layers, self.batch_size = num_layers, batch_size
        self.kv_heads, self.value_heads = kv_heads, value_heads
        self.layers_g = 1 if config.granularity == "shared" else num_layers
        self.heads_g = kv_heads if config.granularity == "per_kv_head" else 1
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = capacity
        self.keys = torch.zeros(num_layers, batch_size, kv_heads, capacity, key_dim, dtype=dtype, device=self.device)
        self.values = torch.zeros(num_layers, batch_size, value_heads, capacity, value_dim, dtype=dtype, device=self.device)
        self.positions = torch.full((self.layers_g, batch_size, self.heads_g, capacity), -1, dtype=torch.long, device=self.device)
        self.slot_tensors: dict[str, torch.Tensor] = {}
        # Device copy drives the kernels; the host copy drives control flow without synchronising.
        self.physical_len = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.physical_len_host: list[int] = [0] * batch_size
        self.reallocations = 0

    # ------------------------------------------------------------------ sizes
    @property
    def bytes_per_token(self) -> int:
        """K/V bytes one token occupies across all compressed layers and heads."""
        per_layer = self.kv_heads * self.keys.shape[-1] + self.value_heads * self.values.shape[-1]
        return self.num_layers * per_layer * self.keys.element_size()

    def allocated_bytes(self) -> int:
        tensors = [self.keys, self.values, self.positions, *self.slot_tensors.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def resident_kv_bytes(self) -> int:
        return sum(self.physical_len_host) * self.bytes_per_token

    # ------------------------------------------------------------------ slot tensors
    def add_slot_tensor(
        self, name: str, *, dtype: torch.dtype = torch.float32, fill: float = 0.0,
        per_layer: bool = False, per_head: bool = False,
    ) -> torch.Tensor:
        """Register per-slot state that follows the tokens through compaction.

        Its shape is [layers_x, rows, heads_x, capacity], at least as fine as the granularity (a shared keep-set
        can move per-layer state; a per-layer keep-set cannot move state shared across layers).
        """
        if name in self.slot_tensors:
            raise ValueError(f"slot tensor {name!r} is already registered")
        layers_x = self.num_layers if (per_layer or self.layers_g > 1) else 1
        heads_x = self.kv_heads if (per_head or self.heads_g > 1) else 1
        tensor = torch.full((layers_x, self.batch_size, heads_x, self.capacity), fill, dtype=dtype, device=self.device)
        self.slot_tensors[name] = tensor
        return tensor

    # ------------------------------------------------------------------ growth
    def ensure_capacity(self, needed: int) -> None:
        """Grow the buffers (rare: a prompt or protected span longer than planned) to hold ``needed`` slots."""
        if needed <= self.capacity:
            return
        new_capacity = max(needed, self.capacity + self.capacity // 4)

        def grown(tensor: torch.Tensor, fill: float) -> torch.Tensor:
            shape = list(tensor.shape)
            slot_dim = 3
            shape[slot_dim] = new_capacity
            bigger = torch.full(shape, fill, dtype=tensor.dtype, device=tensor.device)
            bigger.narrow(slot_dim, 0, self.capacity).copy_(tensor)
            return bigger

        self.keys = grown(self.keys, 0)
        self.values = grown(self.values, 0)
        self.positions = grown(self.positions, -1)
        for name, tensor in self.slot_tensors.items():
            self.slot_tensors[name] = grown(tensor, 0)
        self.capacity = new_capacity
        self.reallocations += 1

    # ------------------------------------------------------------------ append
    def write_slots(self, num_new: int) -> torch.Tensor:
        """[rows, num_new] slots where this step's tokens go: right after each row's physical end."""
        return self.physical_len.view(-1, 1) + torch.arange(num_new, device=self.device).view(1, -1)

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor, slots: torch.Tensor) -> None:
        """Store a step's K/V ([rows, heads, new, dim]) of one layer at ``slots`` ([rows, new])."""
        num_new = key_states.shape[2]
        first = self.physical_len_host[0]
        if all(length == first for length in self.physical_len_host):
            # All rows end at the same slot: a plain slice write.
            self.keys[layer, :, :, first : first + num_new] = key_states
            self.values[layer, :, :, first : first + num_new] = value_states
            return
        self.write_rows(layer, key_states, value_states, slots)

    def write_rows(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor, slots: torch.Tensor) -> None:
        """``write`` without looking at host lengths (device indices only: safe inside a CUDA graph)."""
        rows = torch.arange(self.batch_size, device=self.device).view(-1, 1)
        self.keys[layer][rows, :, slots] = key_states.transpose(1, 2)
        self.values[layer][rows, :, slots] = value_states.transpose(1, 2)

    def commit(self, slots: torch.Tensor, positions: torch.Tensor, stored_count: list[int]) -> None:
        """Account for a step's tokens written at ``slots`` ([rows, new]).

        The first ``stored_count[row]`` new tokens of each row stay (a finished row stores none); ``positions``
        ([rows, new]) are their logical positions, -1 for padding that the caller compacts away afterwards.
        """
        counts = torch.tensor(stored_count, dtype=torch.long, device=self.device)
        stored = torch.arange(slots.shape[1], device=self.device).view(1, -1) < counts.view(-1, 1)
        slot_positions = torch.where(stored, positions, torch.full_like(positions, -1))
        index = slots.view(1, self.batch_size, 1, -1).expand(self.layers_g, -1, self.heads_g, -1)
        self.positions.scatter_(3, index, slot_positions.view(1, self.batch_size, 1, -1).expand_as(index))
        self.physical_len += counts
        for row, count in enumerate(stored_count):
            self.physical_len_host[row] += count

    # ------------------------------------------------------------------ compaction
    def compact(self, rows: torch.Tensor, keep_index: torch.Tensor, keep_count: torch.Tensor) -> None:
        """Keep, for each row in ``rows``, the slots ``keep_index[..., :keep_count]`` (see ``dynts.policy``)."""
        rows = rows.to(self.device)
        keep_count = keep_count.to(self.device)
        for cache in (self.keys, self.values):
            kernels.compact_(cache, rows, keep_index, keep_count)
        kernels.compact_(self.positions.unsqueeze(-1), rows, keep_index, keep_count)
        for tensor in self.slot_tensors.values():
            kernels.compact_(tensor.unsqueeze(-1), rows, keep_index, keep_count)
        self.physical_len[rows] = keep_count
        for row, count in zip(rows.tolist(), keep_count.tolist()):
            self.physical_len_host[row] = count
        # Slots past the new end are free; mark them so introspection never reports stale positions.
        slot = torch.arange(self.capacity, device=self.device).view(1, 1, 1, -1)
        stale = slot >= self.physical_len.view(1, -1, 1, 1)
        self.positions.masked_fill_(stale, -1)

    def resident_positions(self, layer: int) -> list[torch.Tensor]:
        """Per row, the logical positions held: [n] (shared/per_layer) or [kv_heads, n] (per_kv_head)."""
        table = self.positions[layer if self.layers_g > 1 else 0]
        result = []
        for row, length in enumerate(self.physical_len_host):
            held = table[row, :, :length]
            result.append(held if self.heads_g > 1 else held[0])
        return result

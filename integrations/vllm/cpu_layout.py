"""Compaction inside a request's own KV blocks for vLLM's CPU attention backend (``CPU_ATTN``), and the gather of
its keys for the scorers that read them, in torch.

Each layer's cache is [num_blocks, kv_heads, block_size, 2 * head_size]: per (block, head) a region of
``2 * block_size * head_size`` elements holding the block's keys then its values, in an order that depends on the
CPU ISA (with float32 and the ``vec`` ISA: keys as [head_size, block_size], values as [block_size, head_size]).
Rather than hard-coding each ISA's order, ``CPUBlockLayout.probe`` asks the backend's own write op
(``cpu_attn_reshape_and_cache``) where every (token, feature) element of a block lands, so compaction moves exactly
what the backend wrote.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Probe values are small integers (digits base 16), exact in every float dtype the backend accepts.
_DIGIT = 16


class CPUBlockLayout:
    """Where each token of a block lives inside its (block, head) region.

    offsets: [block_size, 2 * head_size] int64: element offsets of a token's key features, then value features.
    """

    def __init__(self, offsets: torch.Tensor, block_size: int, head_size: int) -> None:
        self.offsets = offsets
        self.block_size, self.head_size = block_size, head_size

    @classmethod
    def probe(cls, block_size: int, head_size: int, dtype: torch.dtype, isa: str) -> "CPUBlockLayout":
        from vllm import _custom_ops as ops

        if block_size // _DIGIT >= _DIGIT**2 or head_size // _DIGIT >= _DIGIT**2:
            raise ValueError(f"block_size ({block_size}) and head_size ({head_size}) must be < {_DIGIT**3} for the layout probe")
        token = torch.arange(block_size).view(block_size, 1, 1).expand(block_size, 1, head_size)
        feature = torch.arange(head_size).view(1, 1, head_size).expand(block_size, 1, head_size)
        slot_mapping = torch.arange(block_size)

        def write(plane: int, digits: torch.Tensor) -> torch.Tensor:
            """Write ``digits + 1`` into one plane (0 keys, 1 values) of a one-block cache; read back ``value - 1``
            per element (-1: not written by this plane)."""
            cache = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
            key_cache, value_cache = cache.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
            written, zeros = (digits + 1).to(dtype).contiguous(), torch.zeros(block_size, 1, head_size, dtype=dtype)
            keys, values = (written, zeros) if plane == 0 else (zeros, written)
            ops.cpu_attn_reshape_and_cache(
                keys, values, key_cache, value_cache, slot_mapping, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
            )
            return cache.view(-1).to(torch.float64).round().long() - 1

        def locate(plane: int, index: torch.Tensor) -> torch.Tensor:
            """Per element of the region, the ``index`` (token or feature) stored there by ``plane``, else -1."""
            low, high = write(plane, index % _DIGIT), write(plane, index // _DIGIT)
            return torch.where(low >= 0, high * _DIGIT + low, -1)

        region = 2 * block_size * head_size
        offsets = torch.full((block_size, 2 * head_size), -1, dtype=torch.long)
        claimed = torch.zeros(region, dtype=torch.long)
        for plane in (0, 1):
            token_at, feature_at = locate(plane, token), locate(plane, feature)
            written = token_at >= 0
            claimed += written.long()
            offsets[token_at[written], plane * head_size + feature_at[written]] = torch.arange(region)[written]
        if bool((offsets < 0).any()) or bool((claimed != 1).any()):
            raise RuntimeError(
                f"dynts: could not map the CPU KV block layout (isa {isa!r}, {dtype}, block {block_size}, head "
                f"{head_size}): the backend does not store each (token, feature) in an element of its own"
            )
        return cls(offsets, block_size, head_size)

    def compact_(
        self,
        kv_caches: Sequence[torch.Tensor],
        block_ids: Sequence[int],
        keep_index: torch.Tensor,
        keep_count: int,
    ) -> None:
        """Move slot ``keep_index[j]`` of one request to slot j (j < keep_count), in every layer and head.

        kv_caches:  one [num_blocks, kv_heads, block_size, 2 * head_size] tensor per layer.
        block_ids:  the request's blocks, in slot order.
        keep_index: [K] int64 ascending slot indices (K >= keep_count; entries past keep_count are ignored).
        """
        source = keep_index[:keep_count].to(torch.long)
        destination = torch.arange(keep_count)
        moves = source != destination
        if not bool(moves.any()):
            return
        source, destination = source[moves], destination[moves]
        table = torch.as_tensor(list(block_ids), dtype=torch.long)

        def addresses(slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return table[slot // self.block_size].view(-1, 1, 1), self.offsets[slot % self.block_size].unsqueeze(1)

        source_block, source_offset = addresses(source)
        destination_block, destination_offset = addresses(destination)
        for cache in kv_caches:
            flat = cache.view(cache.shape[0], cache.shape[1], -1)  # [num_blocks, kv_heads, region]
            head = torch.arange(flat.shape[1]).view(1, -1, 1)
            moved = flat[source_block, head, source_offset]  # advanced indexing copies: all reads precede the writes
            flat[destination_block, head, destination_offset] = moved

    def gather_keys(self, cache: torch.Tensor, block_ids: Sequence[int], length: int) -> torch.Tensor:
        """[kv_heads, length, head_size]: the keys of a request's first ``length`` slots in one layer's cache
        ([num_blocks, kv_heads, block_size, 2 * head_size]), in slot order."""
        slot = torch.arange(length)
        table = torch.as_tensor(list(block_ids[: -(-length // self.block_size)]), dtype=torch.long)
        flat = cache.view(cache.shape[0], cache.shape[1], -1)  # [num_blocks, kv_heads, region]
        block = table[slot // self.block_size].view(1, -1, 1)
        offset = self.offsets[slot % self.block_size, : self.head_size].unsqueeze(0)  # the key features
        head = torch.arange(flat.shape[1]).view(-1, 1, 1)
        return flat[block, head, offset]

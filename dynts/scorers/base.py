"""The tiny interface every token-importance scorer implements.

A scorer is bound to one cache. It may observe each step (``on_step``: new tokens' ids, final hidden states,
slots) and, if it ``needs_queries``, each layer's queries right after that layer's keys were written
(``on_layer``). When rows are compacted, ``score(rows)`` returns their slots' importance as
[layers_x, rows, heads_x, slots] with layers_x in {1, layers} and heads_x in {1, kv_heads}; the cache averages it
down to the configured granularity. Per-slot state must live in ``storage.add_slot_tensor`` so that it follows
the tokens through compaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import CompressionConfig
from ..storage import KVStorage


@dataclass
class ModelGeometry:
    """Attention shapes of the compressed layers."""

    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    scale: float


@dataclass
class Step:
    """What one forward pass added.

    input_ids:     [rows, new] or None (embeddings input).
    hidden_states: [rows, new, hidden] final-norm hidden states, or None if no scorer asked for them.
    slots:         [rows, new] where the new tokens were written.
    positions:     [rows, new] their logical positions (-1 for padding).
    stored_count:  [rows] how many of the new tokens stay (0 for a finished row; padding is dropped later).
    key_len:       [rows] physical length including this step's tokens (what this step's attention read).
    key_start:     [rows] slots before it are padding (non-zero only in a left-padded prefill).
    """

    input_ids: torch.Tensor | None
    hidden_states: torch.Tensor | None
    slots: torch.Tensor
    positions: torch.Tensor
    stored_count: torch.Tensor
    key_len: torch.Tensor
    key_start: torch.Tensor


class Scorer:
    """Base class: subclasses override ``score`` and whichever observation hooks they need."""

    name: ClassVar[str] = "base"
    needs_queries: ClassVar[bool] = False
    needs_hidden_states: ClassVar[bool] = False

    storage: KVStorage
    config: CompressionConfig
    geometry: ModelGeometry
    sequence_start: torch.Tensor  # [rows] first logical position of each row's real tokens

    def bind(self, storage: KVStorage, geometry: ModelGeometry, sequence_start: torch.Tensor) -> None:
        """Attach to a cache's storage (called once, when the storage is allocated)."""
        self.storage, self.config, self.geometry = storage, storage.config, geometry
        self.sequence_start = sequence_start

    def on_layer(self, layer: int, queries: torch.Tensor, step: Step) -> None:
        """``queries`` [rows, q_heads, new, head_dim] (post-RoPE) of ``layer``; its keys are already stored."""

    def on_step(self, step: Step) -> None:
        """Called after each forward pass, before any compaction."""

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # helpers shared by subclasses -------------------------------------------------------------------------
    def slot_positions(self, rows: torch.Tensor) -> torch.Tensor:
        """[layers_g, rows, heads_g, capacity] logical positions of the given rows' slots."""
        return self.storage.positions[:, rows]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k not in (
            "storage", "config", "geometry", "sequence_start"))
        return f"{type(self).__name__}({fields})"


def to_granularity(scores: torch.Tensor, layers_g: int, heads_g: int, num_layers: int, kv_heads: int) -> torch.Tensor:
    """Average [layers_x, rows, heads_x, slots] scores down (or broadcast them up) to [layers_g, rows, heads_g, slots]."""
    if scores.dim() != 4:
        raise ValueError(f"a scorer must return [layers, rows, heads, slots] scores, got shape {tuple(scores.shape)}")
    layers_x, _, heads_x, _ = scores.shape
    if layers_x not in (1, num_layers) or heads_x not in (1, kv_heads):
        raise ValueError(
            f"scorer output has {layers_x} layers x {heads_x} heads; expected 1 or {num_layers} layers and 1 or "
            f"{kv_heads} heads"
        )
    if layers_g == 1 and layers_x > 1:
        scores = scores.mean(dim=0, keepdim=True)
    if heads_g == 1 and heads_x > 1:
        scores = scores.mean(dim=2, keepdim=True)
    return scores.expand(layers_g, -1, heads_g, -1)

"""The tiny interface every token-importance scorer implements.

A scorer is bound to one cache through a ``CacheView`` (its slot table, the model's attention geometry, and the
keys where the integration can provide them). It may observe each step (``on_step``: new tokens' ids, final hidden
states, slots) and, if it ``needs_queries``, each layer's queries right after that layer's keys were written
(``on_layer``). When rows are compacted, ``score(rows)`` returns their slots' importance as
[layers_x, rows, heads_x, slots] with layers_x in {1, layers} and heads_x in {1, kv_heads}; the policy averages it
down to the configured granularity. Per-slot state must live in the slot table (``slots.add_state``): it then
follows the tokens through compaction and is reset when a slot is reused for a new token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import kernels
from ..config import CompressionConfig
from ..slots import SlotTable


@dataclass
class ModelGeometry:
    """Attention shapes of the compressed layers."""

    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    scale: float


@dataclass
class CacheView:
    """What a scorer sees of the cache it is bound to.

    keys: ``keys(layer)`` -> [rows, kv_heads, capacity, head_dim], the layer's keys by slot (None where the
          integration cannot provide them; scorers that need keys then refuse to bind).
    """

    slots: SlotTable
    geometry: ModelGeometry
    config: CompressionConfig
    dtype: torch.dtype
    keys: Callable[[int], torch.Tensor] | None = None


@dataclass
class Step:
    """What one forward pass added.

    input_ids:     [rows, new] or None (embeddings input).
    hidden_states: [rows, new, hidden] final-norm hidden states, or None if the scorer does not need them.
    slots:         [rows, new] where the new tokens were written.
    positions:     [rows, new] their logical positions.
    stored:        [rows, new] bool: the tokens each row keeps (False: padding, or a row that finished).
    key_len:       [rows] physical length including this step's slots (what this step's attention spans).
    all_stored:    every row keeps every new token (the usual decode step).
    query_count / key_start: the kept tokens as ``kernels.attention_scores`` takes them when they form the usual
                   pattern (the last ``query_count`` new tokens kept, slots before ``key_start`` invisible); None when
                   kept and dropped tokens interleave, and then ``query_valid`` / ``key_valid`` masks describe them.
    """

    input_ids: torch.Tensor | None
    hidden_states: torch.Tensor | None
    slots: torch.Tensor
    positions: torch.Tensor
    stored: torch.Tensor
    key_len: torch.Tensor
    all_stored: bool = True
    query_count: torch.Tensor | None = None
    key_start: torch.Tensor | None = None
    query_valid: torch.Tensor | None = field(default=None, repr=False)
    key_valid: torch.Tensor | None = field(default=None, repr=False)

    def attention_received(
        self, queries: torch.Tensor, keys: torch.Tensor, scale: float, reduce_queries: str, reduce_group: str
    ) -> torch.Tensor:
        """[rows, kv_heads, key_len.max()] softmax attention this step's kept queries pay to each visible slot."""
        return kernels.attention_scores(
            queries, keys, self.key_len, scale=scale, query_count=self.query_count, key_start=self.key_start,
            query_valid=self.query_valid, key_valid=self.key_valid, reduce_queries=reduce_queries,
            reduce_group=reduce_group,
        )


class Scorer:
    """Base class: subclasses override ``score`` and whichever observation hooks they need."""

    name: ClassVar[str] = "base"
    needs_queries: ClassVar[bool] = False
    needs_keys: ClassVar[bool] = False
    needs_hidden_states: ClassVar[bool] = False

    view: CacheView

    def validate(self, config: CompressionConfig) -> None:
        """Raise ValueError if this scorer's settings cannot work with ``config`` (called when a cache is built)."""

    def bind(self, view: CacheView) -> None:
        """Attach to a cache (called once, when its slot table is allocated)."""
        if getattr(self, "view", None) is not None:
            raise ValueError(f"scorer {self.name!r} is already bound to a cache; create one scorer per cache")
        if self.needs_keys and view.keys is None:
            raise ValueError(f"scorer {self.name!r} needs the cached keys, which this integration cannot provide")
        self.validate(view.config)
        self.view = view

    @property
    def slots(self) -> SlotTable:
        return self.view.slots

    @property
    def geometry(self) -> ModelGeometry:
        return self.view.geometry

    @property
    def config(self) -> CompressionConfig:
        return self.view.config

    def on_layer(self, layer: int, queries: torch.Tensor, step: Step) -> None:
        """``queries`` [rows, q_heads, new, head_dim] (post-RoPE) of ``layer``; its keys are already stored."""

    def on_step(self, step: Step) -> None:
        """Called after each forward pass, before any compaction."""

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        """Importance of every slot of ``rows``. A pure read of the scorer's state: the static path may call it for a
        plan it then discards (``StaticSession.prepare``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "view")
        return f"{type(self).__name__}({fields})"


class TokenScoreScorer(Scorer):
    """Scorers that give each token one score when it enters the cache (stored in its slot, moved with it)."""

    needs_hidden_states = True
    STATE = "token_score"

    def bind(self, view: CacheView) -> None:
        super().bind(view)
        view.slots.add_state(self.STATE)

    def token_scores(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        """[rows, new] scores of a step's tokens."""
        raise NotImplementedError

    def on_step(self, step: Step) -> None:
        if step.hidden_states is None:
            raise ValueError(f"{self.name} scorer: the model produced no hidden states for this step")
        scores = self.token_scores(step.hidden_states, step.input_ids)
        if scores.shape != step.slots.shape:
            raise ValueError(
                f"{self.name} scorer: score_fn returned shape {tuple(scores.shape)}; expected [rows, new tokens] = "
                f"{tuple(step.slots.shape)}"
            )
        self.slots.scatter(self.STATE, step.slots, scores)

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        return self.slots.state(self.STATE)[:, rows]

"""Per-token scores given from outside: one value per token, computed once when the token enters.

This is the slot the learned DynTS Importance Predictor fills: ``score_fn(hidden_states, input_ids)`` maps each
step's final-norm hidden states ([rows, new, hidden]) to scores ([rows, new]).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..storage import KVStorage
from .base import ModelGeometry, Scorer, Step

ScoreFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class ExternalScorer(Scorer):
    name = "external"
    needs_hidden_states = True

    def __init__(self, score_fn: ScoreFn) -> None:
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        self.score_fn = score_fn

    def bind(self, storage: KVStorage, geometry: ModelGeometry, sequence_start: torch.Tensor) -> None:
        super().bind(storage, geometry, sequence_start)
        storage.add_slot_tensor("token_score")

    def on_step(self, step: Step) -> None:
        if step.hidden_states is None:
            raise ValueError("external scorer: the model produced no hidden states for this step")
        with torch.no_grad():
            scores = self.score_fn(step.hidden_states, step.input_ids)
        if scores.shape != step.slots.shape:
            raise ValueError(
                f"score_fn returned shape {tuple(scores.shape)}; expected [rows, new tokens] = {tuple(step.slots.shape)}"
            )
        table = self.storage.slot_tensors["token_score"]
        index = step.slots.view(1, step.slots.shape[0], 1, -1).expand(table.shape[0], -1, table.shape[2], -1)
        table.scatter_(3, index, scores.to(table.dtype).view(1, step.slots.shape[0], 1, -1).expand_as(index))

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        return self.storage.slot_tensors["token_score"][:, rows]

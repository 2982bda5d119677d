"""Per-token scores given from outside: one value per token, computed once when the token enters.

``score_fn(hidden_states, input_ids)`` maps each step's final-norm hidden states ([rows, new, hidden]) to scores
([rows, new]). The learned DynTS Importance Predictor is the same kind of scorer with a trained head
(``dynts.predictor.PredictorScorer``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import TokenScoreScorer

ScoreFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class ExternalScorer(TokenScoreScorer):
    name = "external"

    def __init__(self, score_fn: ScoreFn) -> None:
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        self.score_fn = score_fn

    def token_scores(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        return self.score_fn(hidden_states, input_ids)

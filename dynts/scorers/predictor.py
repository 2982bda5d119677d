"""``PredictorScorer``: the trained head scores each token from its final-norm hidden state while decoding.

    scorer = PredictorScorer("ip-head", model=model)  # refuses a head trained for another model
    cache = DynTSCache(model, CompressionConfig(budget=3000, window=1000, think_end=...), scorer=scorer)
    model.generate(**inputs, past_key_values=cache)

or by name: ``DynTSCache(model, config, scorer="predictor", scorer_kwargs={"predictor": "ip-head", "model": model})``.
The cache hands it each step's final-norm hidden states; the head maps them to one score per new token, stored in
the token's slot (it moves with the token through compaction). Prompt and post-thinking tokens need no special
score: the policy protects them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..predictor.head import ImportancePredictor
from .base import CacheView, TokenScoreScorer


class PredictorScorer(TokenScoreScorer):
    """predictor: an ``ImportancePredictor`` or the directory of a saved head. model: with a directory, the
    model the head will score (checked against the head's recorded base model).

    At bind time the head moves to the cache's device and its wide layers to the cache's dtype (in place: the
    scorer owns the head it is given); its last projection stays float32.
    """

    name = "predictor"

    def __init__(self, predictor: ImportancePredictor | str | Path | None = None, model: nn.Module | None = None) -> None:
        if predictor is None:
            raise ValueError(
                "the predictor scorer needs predictor=PATH (a head directory from `dynts train-predictor`) or an "
                "ImportancePredictor; on the command line: --predictor PATH"
            )
        if isinstance(predictor, (str, Path)):
            predictor = ImportancePredictor.load(predictor, model=model)
        elif not isinstance(predictor, ImportancePredictor):
            raise TypeError(f"predictor must be an ImportancePredictor or a head directory, got {type(predictor).__name__}")
        elif model is not None:
            hidden_size = int(model.config.get_text_config(decoder=True).hidden_size)
            if hidden_size != predictor.hidden_size:
                raise ValueError(f"the predictor head reads hidden size {predictor.hidden_size}; the model's is {hidden_size}")
        self.head = predictor.eval()

    def bind(self, view: CacheView) -> None:
        super().bind(view)
        self.head.to(view.slots.device)
        self.head.hidden_layers.to(view.dtype)

    def token_scores(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        return self.head(hidden_states)

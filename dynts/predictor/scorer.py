"""``PredictorScorer``: the trained head scores each token from its final-norm hidden state during generate.

    scorer = PredictorScorer("ip-head", model=model)  # refuses a head trained for another model
    cache = DynTSCache(model, CompressionConfig(budget=3000, window=1000, think_end=...), scorer=scorer)
    model.generate(**inputs, past_key_values=cache)

or by name: ``DynTSCache(model, config, scorer="predictor", scorer_kwargs={"predictor": "ip-head", "model": model})``.
It is an ``ExternalScorer``: ``DynTSCache``'s decoder hook hands it each step's final-norm hidden states, the
head maps them to one score per new token, and the score is stored in the token's slot and moves with it
through compaction. Prompt and post-thinking tokens need no special score: the policy protects them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..scorers.base import ModelGeometry
from ..scorers.external import ExternalScorer
from ..storage import KVStorage
from .head import ImportancePredictor


class PredictorScorer(ExternalScorer):
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
        super().__init__(self._predict)

    def bind(self, storage: KVStorage, geometry: ModelGeometry, sequence_start: torch.Tensor) -> None:
        super().bind(storage, geometry, sequence_start)
        self.head.to(storage.device)
        self.head.hidden_layers.to(storage.dtype)

    def _predict(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        return self.head(hidden_states)


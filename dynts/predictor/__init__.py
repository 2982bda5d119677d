"""The DynTS Importance Predictor at inference: the trained MLP head and the scorer that runs it while decoding.

    from dynts.predictor import PredictorScorer
    cache = DynTSCache(model, config, scorer=PredictorScorer("ip-head/", model=model))

Training (traces, labels, the head's training loop) is in ``dynts.training.predictor``.
"""

from __future__ import annotations

from typing import Any

from .head import ImportancePredictor, ModelIdentity

__all__ = ["ImportancePredictor", "ModelIdentity", "PredictorScorer"]


def __getattr__(name: str) -> Any:
    # The scorer lives with the other scorers (dynts.scorers.predictor), which import this package's head.
    if name == "PredictorScorer":
        from ..scorers.predictor import PredictorScorer

        return PredictorScorer
    raise AttributeError(f"module 'dynts.predictor' has no attribute {name!r}")

"""The DynTS Importance Predictor at inference: the trained MLP head and the scorer that runs it while decoding.

    from dynts.predictor import PredictorScorer
    cache = DynTSCache(model, config, scorer=PredictorScorer("ip-head/", model=model))

Training (traces, labels, the head's training loop) is in ``dynts.training.predictor``.
"""

from __future__ import annotations

from .head import ImportancePredictor, ModelIdentity
from .scorer import PredictorScorer

__all__ = ["ImportancePredictor", "ModelIdentity", "PredictorScorer"]

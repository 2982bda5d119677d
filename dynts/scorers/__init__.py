"""Token-importance scorers: one small class per method over ``base.Scorer``, and the one way to build them by name."""

from __future__ import annotations

from typing import Any

from .base import CacheView, ModelGeometry, Scorer, Step, TokenScoreScorer
from .external import ExternalScorer
from .h2o import H2OScorer
from .positional import RandomScorer, SepLLMScorer, StreamingLLMScorer, WindowScorer
from .rkv import RKVScorer
from .snapkv import SnapKVScorer
from .tova import TOVAScorer
from .predictor import PredictorScorer

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (PredictorScorer, ExternalScorer, H2OScorer, SnapKVScorer, RKVScorer, TOVAScorer, StreamingLLMScorer,
                SepLLMScorer, WindowScorer, RandomScorer)
}


def get_scorer(name: str, **kwargs: Any) -> Scorer:
    """Build a scorer by name (``SCORERS`` lists them); kwargs go to its constructor, and a wrong one is reported
    with the scorer's name."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; allowed: {sorted(SCORERS)}")
    try:
        return SCORERS[name](**kwargs)
    except TypeError as error:
        if "argument" in str(error):  # an unknown or missing keyword, not a type check of a value
            raise TypeError(f"scorer {name!r}: {error}") from error
        raise


__all__ = [
    "SCORERS", "CacheView", "ExternalScorer", "H2OScorer", "ModelGeometry", "PredictorScorer", "RKVScorer",
    "RandomScorer", "Scorer", "SepLLMScorer", "SnapKVScorer", "Step", "StreamingLLMScorer", "TOVAScorer",
    "TokenScoreScorer", "WindowScorer", "get_scorer",
]

"""Token-importance scorers: one small class per method over ``base.Scorer``."""

from __future__ import annotations

from typing import Any

from .base import ModelGeometry, Scorer, Step, to_granularity
from .external import ExternalScorer
from .h2o import H2OScorer
from .positional import RandomScorer, SepLLMScorer, StreamingLLMScorer, WindowScorer
from .rkv import RKVScorer
from .snapkv import SnapKVScorer
from .tova import TOVAScorer
from ..predictor.scorer import PredictorScorer  # after .external: it subclasses ExternalScorer

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (ExternalScorer, H2OScorer, SnapKVScorer, RKVScorer, TOVAScorer, StreamingLLMScorer, SepLLMScorer,
                WindowScorer, RandomScorer, PredictorScorer)
}


def get_scorer(name: str, **kwargs: Any) -> Scorer:
    """Build a scorer by name (``SCORERS`` lists them); kwargs go to its constructor."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; allowed: {sorted(SCORERS)}")
    return SCORERS[name](**kwargs)


__all__ = [
    "SCORERS", "ExternalScorer", "H2OScorer", "ModelGeometry", "RKVScorer", "RandomScorer", "Scorer",
    "SepLLMScorer", "SnapKVScorer", "Step", "StreamingLLMScorer", "TOVAScorer", "WindowScorer", "get_scorer",
    "to_granularity",
]

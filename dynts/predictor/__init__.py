"""The DynTS Importance Predictor: attention-derived labels, a small MLP head, its training, and its scorer.

    dynts label --model M --data train.jsonl --grader math --out labels/     # traces -> labels + hidden states
    dynts train-predictor --labels labels/ --out ip-head/                    # trains the head (model frozen)
    dynts generate --model M --predictor ip-head/ ...                        # scores tokens while decoding
"""

from __future__ import annotations

from .head import ImportancePredictor, ModelIdentity
from .labels import label_sequence, normalise
from .scorer import PredictorScorer

__all__ = ["ImportancePredictor", "ModelIdentity", "PredictorScorer", "label_sequence", "normalise"]

"""Training the DynTS Importance Predictor: traces, attention-derived labels, label sets and the head's training.

    dynts label --model M --data train.jsonl --grader math --out labels/     # traces -> labels + hidden states
    dynts train-predictor --labels labels/ --out ip-head/                    # trains the head (model frozen)

The trained head (``dynts.predictor.ImportancePredictor``) and its scorer are inference code and live in the core.
"""

from __future__ import annotations

from .labels import label_sequence, normalise

__all__ = ["label_sequence", "normalise"]

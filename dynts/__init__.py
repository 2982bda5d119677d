"""dynts: keep only the thinking tokens that matter; a bounded KV cache for reasoning models.

    from dynts import CompressionConfig, DynTSCache
    cache = DynTSCache(model, CompressionConfig(budget=3000, window=1000, keep_ratio=0.3), scorer="h2o")
    model.generate(**inputs, past_key_values=cache)
"""

from __future__ import annotations

from typing import Any

from .config import CompressionConfig, resolve_think_end
from .policy import KeepPlan, plan_compaction, select_keep
from .scorers import SCORERS, Scorer, get_scorer

__version__ = "0.1.0"

__all__ = [
    "SCORERS", "CompressionConfig", "DynTSCache", "KeepPlan", "Scorer", "get_scorer", "plan_compaction",
    "resolve_think_end", "select_keep",
]


def __getattr__(name: str) -> Any:
    # The HF integration imports transformers (slow); load it on first use.
    if name == "DynTSCache":
        from .integrations.hf import DynTSCache

        return DynTSCache
    raise AttributeError(f"module 'dynts' has no attribute {name!r}")

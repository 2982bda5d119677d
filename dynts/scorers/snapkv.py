"""SnapKV: attention of an observation window of recent queries, summed and pooled (Li et al., 2024).

The paper's defaults: an observation window of 32 queries, max pooling with kernel 7 (the scores are summed over the
window's queries and averaged over each GQA group here, as in kvpress).
"""

from __future__ import annotations

import torch

from ..config import check_int
from .recent_queries import RecentQueriesScorer, pool_slots


class SnapKVScorer(RecentQueriesScorer):
    name = "snapkv"

    def __init__(self, observation_window: int = 32, kernel_size: int = 7, pooling: str = "max") -> None:
        super().__init__(observation_window)
        kernel_size = check_int("kernel_size", kernel_size, minimum=1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd number >= 1, got {kernel_size}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        self.kernel_size, self.pooling = kernel_size, pooling

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        attention = self.recent_attention(rows, reduce_queries="sum", reduce_group="mean")
        return pool_slots(attention, self.kernel_size, self.pooling)

"""TOVA: the attention of the current query, averaged over heads (Oren et al., 2024)."""

from __future__ import annotations

import torch

from .recent_queries import RecentQueriesScorer


class TOVAScorer(RecentQueriesScorer):
    name = "tova"

    def __init__(self) -> None:
        super().__init__(observation_window=1)

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        return self.recent_attention(rows, reduce_queries="sum", reduce_group="mean")

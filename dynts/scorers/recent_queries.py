"""Shared machinery of the scorers that look at the attention of the most recent queries."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from .base import ModelGeometry, Scorer, Step
from ..storage import KVStorage


class RecentQueriesScorer(Scorer):
    """Keeps the last ``observation_window`` post-RoPE queries of every layer (a few KB per row and layer)."""

    needs_queries = True

    def __init__(self, observation_window: int) -> None:
        if observation_window < 1:
            raise ValueError(f"observation_window must be >= 1, got {observation_window}")
        self.observation_window = observation_window

    def bind(self, storage: KVStorage, geometry: ModelGeometry, sequence_start: torch.Tensor) -> None:
        super().bind(storage, geometry, sequence_start)
        if self.observation_window > max(storage.config.window, 1):
            # The queries' own tokens must still be in the cache (inside the window) for causal alignment.
            raise ValueError(
                f"{self.name}: observation_window ({self.observation_window}) must be <= the config window "
                f"({storage.config.window})"
            )
        shape = (geometry.num_layers, storage.batch_size, geometry.q_heads, self.observation_window, geometry.head_dim)
        self.recent_queries = torch.zeros(shape, dtype=storage.dtype, device=storage.device)
        self.queries_seen = torch.zeros(storage.batch_size, dtype=torch.long, device=storage.device)

    def on_layer(self, layer: int, queries: torch.Tensor, step: Step) -> None:
        window = self.observation_window
        new = queries.shape[2]
        if new >= window:
            self.recent_queries[layer] = queries[:, :, -window:]
        else:
            self.recent_queries[layer] = torch.cat([self.recent_queries[layer, :, :, new:], queries], dim=2)

    def on_step(self, step: Step) -> None:
        self.queries_seen += step.stored_count

    def recent_attention(self, rows: torch.Tensor, reduce_queries: str, reduce_group: str) -> torch.Tensor:
        """[layers, rows, kv_heads, capacity]: attention of the recent queries over each row's resident keys."""
        key_len = self.storage.physical_len[rows]
        query_count = self.queries_seen[rows].clamp(max=self.observation_window)
        per_layer = [
            kernels.attention_scores(
                self.recent_queries[layer, rows], self.storage.keys[layer, rows], key_len,
                scale=self.geometry.scale, query_count=query_count,
                reduce_queries=reduce_queries, reduce_group=reduce_group,
            )
            for layer in range(self.geometry.num_layers)
        ]
        return torch.stack(per_layer)


def pool_slots(scores: torch.Tensor, kernel_size: int, mode: str) -> torch.Tensor:
    """1-D pooling along the slot axis (stride 1, same length), so neighbours of important tokens score high."""
    if kernel_size <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if mode == "max":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    else:
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=False)
    return pooled[..., : shape[-1]].reshape(shape)

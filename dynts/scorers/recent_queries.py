"""Shared machinery of the scorers that look at the attention of the most recent queries (SnapKV, TOVA, R-KV)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..config import CompressionConfig, check_int
from .base import CacheView, Scorer, Step


class RecentQueriesScorer(Scorer):
    """Keeps the last ``observation_window`` kept post-RoPE queries of every layer (a few KB per row and layer) and
    scores the resident keys by their attention when a row is compacted."""

    needs_queries = True
    needs_keys = True

    def __init__(self, observation_window: int) -> None:
        self.observation_window = check_int("observation_window", observation_window, minimum=1)

    def validate(self, config: CompressionConfig) -> None:
        if self.observation_window > max(config.window, 1):
            # The queries' own tokens must still be resident (inside the window) for the causal alignment.
            raise ValueError(
                f"{self.name}: observation_window ({self.observation_window}) must be <= the CompressionConfig window "
                f"({config.window})"
            )

    def bind(self, view: CacheView) -> None:
        super().bind(view)
        geometry, rows = view.geometry, view.slots.rows
        shape = (geometry.num_layers, rows, geometry.q_heads, self.observation_window, geometry.head_dim)
        self.recent_queries = torch.zeros(shape, dtype=view.dtype, device=view.slots.device)
        self.queries_seen = torch.zeros(rows, dtype=torch.long, device=view.slots.device)

    def on_layer(self, layer: int, queries: torch.Tensor, step: Step) -> None:
        window, new = self.observation_window, queries.shape[2]
        ring = self.recent_queries[layer]
        queries = queries.to(ring.dtype)
        if step.all_stored:
            self.recent_queries[layer] = torch.cat([ring, queries], dim=2)[:, :, -window:]
            return
        # Some rows drop some of their new tokens (padding, finished rows): each row appends only its kept queries.
        stored = step.stored
        kept_count = stored.sum(dim=1, keepdim=True)  # [R, 1]
        rank = stored.long().cumsum(dim=1) - 1  # index of each kept query among the row's kept ones
        target = torch.where(stored, window - kept_count + rank, -1)  # slot in the new ring; < 0: falls out
        ring_target = torch.arange(window, device=ring.device).view(1, -1) - kept_count  # old entries shift left
        combined = torch.cat([ring, queries], dim=2)
        combined_target = torch.cat([ring_target, target], dim=1)  # [R, window + new]
        valid = combined_target >= 0
        # Scatter into a ring one slot longer; entries that fall out go to the extra slot, which is dropped.
        buffer = torch.zeros(ring.shape[0], ring.shape[1], window + 1, ring.shape[3], dtype=ring.dtype, device=ring.device)
        sink_index = torch.where(valid, combined_target.clamp(min=0), window)
        buffer.scatter_(2, sink_index.view(ring.shape[0], 1, -1, 1).expand(-1, ring.shape[1], -1, ring.shape[3]), combined)
        self.recent_queries[layer] = buffer[:, :, :window]

    def on_step(self, step: Step) -> None:
        self.queries_seen += step.stored.sum(dim=1)

    def recent_attention(self, rows: torch.Tensor, reduce_queries: str, reduce_group: str) -> torch.Tensor:
        """[layers, rows, kv_heads, capacity]: attention of the recent queries over each row's resident keys."""
        key_len = self.slots.physical_len[rows]
        query_count = self.queries_seen[rows].clamp(max=self.observation_window)
        per_layer = [
            kernels.attention_scores(
                self.recent_queries[layer, rows], self.view.keys(layer)[rows], key_len,
                scale=self.view.geometry.scale, query_count=query_count,
                reduce_queries=reduce_queries, reduce_group=reduce_group,
            )
            for layer in range(self.view.geometry.num_layers)
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

"""H2O: attention each token has received from every query since it entered the cache (Zhang et al., 2023).

The running sum lives per layer and KV head in a slot tensor (it follows the tokens through compaction) and is
accumulated at every step from the step's queries, including each token's attention to itself.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..storage import KVStorage
from .base import ModelGeometry, Scorer, Step


class H2OScorer(Scorer):
    name = "h2o"
    needs_queries = True

    def bind(self, storage: KVStorage, geometry: ModelGeometry, sequence_start: torch.Tensor) -> None:
        super().bind(storage, geometry, sequence_start)
        storage.add_slot_tensor("h2o_attention_sum", per_layer=True, per_head=True)

    def on_layer(self, layer: int, queries: torch.Tensor, step: Step) -> None:
        received = kernels.attention_scores(
            queries, self.storage.keys[layer], step.key_len, scale=self.geometry.scale,
            query_count=step.stored_count, key_start=step.key_start, reduce_queries="sum", reduce_group="sum",
        )  # [rows, kv_heads, key_len.max()]
        # The slot tensor may have been re-registered by a capacity growth: look it up again.
        accumulator = self.storage.slot_tensors["h2o_attention_sum"][layer]
        accumulator[:, :, : received.shape[-1]] += received

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        return self.storage.slot_tensors["h2o_attention_sum"][:, rows]

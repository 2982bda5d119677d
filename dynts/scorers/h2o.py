"""H2O: attention each token has received from every query since it entered the cache (Zhang et al., 2023).

The running sum lives per layer and KV head (summed over the query heads of its GQA group) in slot state, so it
follows the tokens through compaction and starts from zero when a slot is reused. It is accumulated at every step
from the step's kept queries, including each token's attention to itself. The paper keeps heavy hitters and recent
tokens half and half; here the recent part is the configured ``window`` and the heavy hitters are the kept share of
the older tokens.
"""

from __future__ import annotations

import torch

from .base import Scorer, Step


class H2OScorer(Scorer):
    name = "h2o"
    needs_queries = True
    needs_keys = True
    STATE = "h2o_attention_sum"

    def bind(self, view) -> None:
        super().bind(view)
        view.slots.add_state(self.STATE, per_layer=True, per_head=True)

    def on_layer(self, layer: int, queries: torch.Tensor, step: Step) -> None:
        received = step.attention_received(
            queries, self.view.keys(layer), self.view.geometry.scale, reduce_queries="sum", reduce_group="sum"
        )  # [rows, kv_heads, key_len.max()]
        self.slots.state(self.STATE)[layer, :, :, : received.shape[-1]] += received

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        return self.slots.state(self.STATE)[:, rows]

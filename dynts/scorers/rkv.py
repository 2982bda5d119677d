"""R-KV: importance from recent attention minus key redundancy (Cai et al., 2025).

importance: attention of the last ``observation_window`` queries, averaged over them and over the GQA group,
            max-pooled along the slots; it sums to ~1 over a row's slots.
redundancy: per KV head, each key's mean cosine similarity to the other resident keys, turned into a
            distribution over the slots with a softmax so that it lives on the same scale as the importance.
score = lam * importance - (1 - lam) * redundancy  (lam = 0.1 as in the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .recent_queries import RecentQueriesScorer, pool_slots

# Rows of the similarity matrix computed at once: bounds the O(slots^2) temporary.
_SIMILARITY_CHUNK = 1024


class RKVScorer(RecentQueriesScorer):
    name = "rkv"

    def __init__(self, observation_window: int = 8, kernel_size: int = 7, lam: float = 0.1) -> None:
        super().__init__(observation_window)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd number >= 1, got {kernel_size}")
        self.kernel_size, self.lam = kernel_size, lam

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        importance = pool_slots(self.recent_attention(rows, reduce_queries="mean", reduce_group="mean"), self.kernel_size, "max")
        redundancy = torch.stack([self.redundancy(layer, rows) for layer in range(self.geometry.num_layers)])
        return self.lam * importance - (1.0 - self.lam) * redundancy

    def redundancy(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """[rows, kv_heads, capacity] softmax-normalised mean cosine similarity to the other resident keys."""
        keys = self.storage.keys[layer, rows]  # [R, H, S, D]
        length = self.storage.physical_len[rows]
        capacity = keys.shape[2]
        used = int(length.max().item())
        unit = F.normalize(keys[:, :, :used].float(), dim=-1)
        slot = torch.arange(used, device=keys.device)
        valid = slot.view(1, 1, used) < length.view(-1, 1, 1)  # [R, 1, S]
        mean_similarity = torch.zeros(unit.shape[:3], device=keys.device)
        for start in range(0, used, _SIMILARITY_CHUNK):
            end = min(start + _SIMILARITY_CHUNK, used)
            similarity = torch.matmul(unit[:, :, start:end], unit.transpose(-1, -2))  # [R, H, c, S]
            similarity = similarity.masked_fill(~valid.unsqueeze(2), 0.0)
            own = slot[start:end]
            similarity[:, :, torch.arange(end - start, device=keys.device), own] = 0.0  # not similar to itself
            others = (length.view(-1, 1, 1) - 1).clamp(min=1).float()
            mean_similarity[:, :, start:end] = similarity.sum(-1) / others
        logits = mean_similarity.masked_fill(~valid, float("-inf"))
        redundancy = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        return F.pad(redundancy, (0, capacity - used))

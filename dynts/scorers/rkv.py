"""R-KV: importance from recent attention minus key redundancy (Cai et al., 2025), as in its paper and official code.

For each layer and KV head, at a compaction, over a row's resident keys (``L`` of them; the last ``W`` form the kept
window, ``W = min(window, L)``):

importance: the logits of the last ``observation_window`` queries, reduced over each GQA group by the **max of the
            logits** (one score row per KV head), softmax over the **non-window** keys only, mean over the queries,
            max-pooled along the slots (kernel 7).
redundancy: cosine similarity of every pair of resident keys (diagonal 0); for each key ``i`` the similarity to its
            most recent highly similar key (cosine > ``similarity_threshold``) is not counted (R-KV's
            retain-most-recent rule: of a group of near-duplicates, the most recent collects the least redundancy
            and survives); the column means over all ``L`` keys, turned into a distribution with a softmax over all
            ``L`` keys.
score = lam * importance - (1 - lam) * redundancy, for the non-window slots (the window is kept anyway).

Defaults are the paper's: observation window 8, max pooling with kernel 7, lam 0.1 (the official code uses 0.07:
pass ``lam=0.07``), threshold 0.5. One known deviation from the official code: a key with no highly similar key
leaves its similarities untouched (the code then zeroes its similarity to the first cached token, a side effect of
``argmax`` over an empty set). R-KV keeps one set per layer and KV head: use ``granularity="per_kv_head"`` and
``budget_mode="fixed"`` (compress from budget + buffer down to budget) for the published setting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import check_int
from .recent_queries import RecentQueriesScorer, pool_slots

# Rows of the similarity matrix computed at once: bounds the O(slots^2) temporary.
_SIMILARITY_CHUNK = 1024


class RKVScorer(RecentQueriesScorer):
    name = "rkv"

    def __init__(self, observation_window: int = 8, kernel_size: int = 7, lam: float = 0.1,
                 similarity_threshold: float = 0.5) -> None:
        super().__init__(observation_window)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam!r}")
        kernel_size = check_int("kernel_size", kernel_size, minimum=1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd number >= 1, got {kernel_size}")
        if isinstance(similarity_threshold, bool) or not isinstance(similarity_threshold, (int, float)) \
                or not -1.0 <= similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be a cosine in [-1, 1], got {similarity_threshold!r}")
        self.kernel_size, self.lam, self.similarity_threshold = kernel_size, float(lam), float(similarity_threshold)

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        length = self.slots.physical_len[rows]
        older_end = length - length.clamp(max=self.config.window)
        per_layer = [
            self.lam * self.importance(layer, rows, older_end) - (1.0 - self.lam) * self.redundancy(layer, rows)
            for layer in range(self.geometry.num_layers)
        ]
        return torch.stack(per_layer)  # [layers, rows, kv_heads, capacity]

    def importance(self, layer: int, rows: torch.Tensor, older_end: torch.Tensor) -> torch.Tensor:
        """[rows, kv_heads, capacity]: recent queries' attention over the non-window slots (0 elsewhere), pooled."""
        geometry = self.geometry
        keys = self.view.keys(layer)[rows].float()  # [R, H, S, D]
        queries = self.recent_queries[layer, rows].float()  # [R, Hq, w, D]
        batch, kv_heads, slots, dim = keys.shape
        group = geometry.q_heads // kv_heads
        window = queries.shape[2]
        logits = torch.matmul(queries.view(batch, kv_heads, group, window, dim), keys.unsqueeze(2).transpose(-1, -2))
        logits = (logits * geometry.scale).amax(dim=2)  # [R, H, w, S]: max over the group of the logits
        slot = torch.arange(slots, device=keys.device).view(1, 1, 1, -1)
        logits = logits.masked_fill(slot >= older_end.view(-1, 1, 1, 1), float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row without older slots scores nothing
        count = self.queries_seen[rows].clamp(max=window)  # rows that have seen fewer tokens than the window
        valid = torch.arange(window, device=keys.device).view(1, 1, -1, 1) >= (window - count).view(-1, 1, 1, 1)
        importance = (probs * valid).sum(dim=2) / count.clamp(min=1).view(-1, 1, 1)
        pooled = pool_slots(importance.masked_fill(slot[:, :, 0] >= older_end.view(-1, 1, 1), float("-inf")),
                            self.kernel_size, "max")
        return pooled.masked_fill(slot[:, :, 0] >= older_end.view(-1, 1, 1), 0.0)

    def redundancy(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """[rows, kv_heads, capacity]: softmax over the resident slots of each key's mean similarity to the others,
        without its similarity to its most recent highly similar key."""
        keys = self.view.keys(layer)[rows]  # [R, H, S, D]
        length = self.slots.physical_len[rows]
        capacity = keys.shape[2]
        used = int(length.max().item())
        unit = F.normalize(keys[:, :, :used].float(), dim=-1)
        slot = torch.arange(used, device=keys.device)
        valid = slot.view(1, 1, used) < length.view(-1, 1, 1)  # [R, 1, S]
        column_sum = torch.zeros(unit.shape[:3], device=keys.device)
        for start in range(0, used, _SIMILARITY_CHUNK):
            end = min(start + _SIMILARITY_CHUNK, used)
            own = slot[start:end]
            similarity = torch.matmul(unit[:, :, start:end], unit.transpose(-1, -2))  # [R, H, c, S]
            similarity = similarity.masked_fill(~valid.unsqueeze(2), 0.0)
            similarity[:, :, torch.arange(end - start, device=keys.device), own] = 0.0  # not similar to itself
            similar = similarity > self.similarity_threshold
            most_recent = torch.where(similar, slot.view(1, 1, 1, -1), -1).amax(dim=-1, keepdim=True)  # [R, H, c, 1]
            retained = (slot.view(1, 1, 1, -1) == most_recent) & (most_recent >= 0)
            similarity = similarity.masked_fill(retained, 0.0)
            row_valid = valid[:, :, start:end].unsqueeze(-1)  # rows past the length contribute nothing
            column_sum += (similarity * row_valid).sum(dim=2)
        mean_similarity = column_sum / length.clamp(min=1).view(-1, 1, 1).float()
        redundancy = torch.softmax(mean_similarity.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
        return F.pad(redundancy, (0, capacity - used))

"""The eviction policy: which slots of a row stay when the row is compacted.

A pure function of scores, lengths and protection, shared by every integration (HF and vLLM call exactly
this). For a row of physical length L compacted under ``CompressionConfig`` c:

* the last ``min(c.window, L)`` slots stay (the local window);
* of the ``older = L - window`` slots before it, ``quota = c.kept_older(older)`` stay: protected slots first
  (all of them, always), then the best-scored unprotected ones, ties going to the more recent slot;
* if the protected older slots alone exceed the quota, all of them stay and no scored slot does
  (``KeepPlan.overflow`` flags the row so the caller can warn).

Slots are assumed ordered by logical position (compaction preserves order), so the window is the physical tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import CompressionConfig


@dataclass
class KeepPlan:
    """Kept slots of the compacted rows.

    keep_index: [layers_g, rows, heads_g, K] int64, ascending slot indices; entries at j >= keep_count[r] are
                padding (unspecified).
    keep_count: [rows] int64, the new physical length of each row (the same for every layer and head).
    overflow:   [rows] bool, rows whose protected tokens alone exceeded the keep quota.
    """

    keep_index: torch.Tensor
    keep_count: torch.Tensor
    overflow: torch.Tensor


def protected_slots(
    positions: torch.Tensor,
    prompt_end: torch.Tensor,
    answer_start: torch.Tensor,
    config: CompressionConfig,
) -> torch.Tensor:
    """Which slots hold protected tokens.

    positions:    [..., rows, heads_g, slots] logical positions of the slots.
    prompt_end:   [rows] first logical position after the prompt.
    answer_start: [rows] logical position where the ``think_end`` marker starts (a huge value while thinking).
    """
    shape = (-1, 1, 1)
    protected = torch.zeros_like(positions, dtype=torch.bool)
    if config.protect_prompt:
        protected |= positions < prompt_end.view(shape)
    if config.protect_answer:
        protected |= positions >= answer_start.view(shape)
    return protected


def select_keep(
    scores: torch.Tensor,
    physical_len: torch.Tensor,
    protected: torch.Tensor,
    config: CompressionConfig,
) -> KeepPlan:
    """Choose the kept slots of each row.

    scores:       [layers_g, rows, heads_g, slots] float, higher = more important (finite or +-inf; no NaN).
    physical_len: [rows] int64, current physical length of each row (slots past it are ignored).
    protected:    bool, broadcastable to ``scores``: slots that must stay.
    """
    if scores.dim() != 4:
        raise ValueError(f"scores must be [layers_g, rows, heads_g, slots], got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; a scorer must return finite (or +-inf) importance values")
    layers_g, rows, heads_g, slots = scores.shape
    device = scores.device
    physical_len = physical_len.to(device=device, dtype=torch.long)
    if physical_len.shape != (rows,):
        raise ValueError(f"physical_len must have shape [{rows}], got {tuple(physical_len.shape)}")
    if bool((physical_len > slots).any()):
        raise ValueError(f"physical_len exceeds the {slots} scored slots")
    protected = protected.to(device).expand_as(scores)

    slot = torch.arange(slots, device=device).view(1, 1, 1, slots)
    length = physical_len.view(1, rows, 1, 1)
    window = torch.clamp(length, max=config.window)
    older_end = length - window
    is_older = slot < older_end
    in_window = (slot >= older_end) & (slot < length)
    forced_older = is_older & protected

    older = (physical_len - physical_len.clamp(max=config.window)).tolist()
    quota = torch.tensor([config.kept_older(n) for n in older], device=device, dtype=torch.long)
    protected_count = forced_older.sum(dim=-1)  # [Lg, R, G]; equal across layers/heads by construction
    protected_count = protected_count.amax(dim=(0, 2))
    scored_keep = (quota - protected_count).clamp(min=0)  # [R]
    keep_count = physical_len.clamp(max=config.window) + torch.maximum(quota, protected_count)

    # Rank the unprotected older slots by score; ties go to the more recent slot (stable sort over reversed slots).
    candidate = is_older & ~protected
    flipped_scores = scores.flip(-1)
    order = torch.sort(flipped_scores, dim=-1, descending=True, stable=True).indices
    order = slots - 1 - order  # back to slot indices, best first
    order_candidate = torch.gather(candidate, -1, order)
    # Candidates first (stable: keeps their score order), then everything else.
    regroup = torch.sort(order_candidate.to(torch.int8), dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(order, -1, regroup)
    rank_position = torch.arange(slots, device=device).view(1, 1, 1, slots)
    chosen_ranked = rank_position < scored_keep.view(1, rows, 1, 1)
    chosen = torch.zeros_like(candidate).scatter_(-1, ranked, chosen_ranked.expand_as(ranked))

    keep = forced_older | in_window | (chosen & candidate)
    width = int(keep_count.max().item()) if rows else 0
    ordered = torch.where(keep, slot.expand_as(keep), torch.full_like(keep, slots, dtype=torch.long))
    keep_index = torch.sort(ordered, dim=-1).values[..., :width]
    return KeepPlan(keep_index=keep_index, keep_count=keep_count, overflow=protected_count > quota)

"""The eviction policy: when a row is compacted, how many of its slots stay, and which.

Pure functions of scores, lengths and protection, shared by every integration: the HF cache and the vLLM worker call
``plan_compaction``; the vLLM scheduler, which never sees scores, calls its count-only twin ``compacted_length``
(tests check that the two agree). For a row of physical length L compacted under ``CompressionConfig`` c:

* the last ``min(c.window, L)`` slots stay (the local window);
* of the ``older = L - window`` slots before it, ``quota = keep_quota(c, older)`` stay: protected slots first
  (all of them, always), then the best-scored unprotected ones, ties going to the more recent slot;
* if the protected older slots alone exceed the quota, all of them stay and no scored slot does
  (``KeepPlan.overflow`` flags the row; ``OverflowNotice`` warns once);
* the row is compacted again when it reaches ``next_trigger(c, kept, overflow)``: the budget, or after protected
  overflow the kept length plus the usual growth, so that it is not compacted at every step;
* a row that is still at or above its trigger after a compaction (a prompt much longer than the budget) is compacted
  again at once, until it is below (or a compaction keeps everything: ``keep_ratio`` 1).

Hence the bound between forward passes: a row holds fewer than ``trigger`` tokens (``budget``; ``budget + buffer`` in
fixed mode), unless its protected tokens alone exceed the quota; then fewer than
``window + protected + (trigger - compacted_length(trigger))``.

Slots are ordered by logical position (compaction preserves order), so the window is the physical tail.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .config import CompressionConfig
from .device import HostCopy, to_device

# A protected span that is still open (an answer being written) ends here: larger than any position.
OPEN_END = 2**62

Span = tuple[int, int]


# ---------------------------------------------------------------------------------------------- counts
def keep_quota(config: CompressionConfig, older: int) -> int:
    """How many of ``older`` tokens (those outside the window) a compaction keeps, protected ones included:
    ``floor(keep_ratio * older)`` in dynts mode, ``budget - window`` in fixed mode."""
    if config.budget_mode == "fixed":
        return min(older, config.budget - config.window)
    # The small epsilon keeps e.g. 0.3 * 10 from flooring to 2 through float rounding.
    return min(older, math.floor(config.keep_ratio * older + 1e-9))


def compacted_length(config: CompressionConfig, physical_len: int, protected_older: int = 0) -> int:
    """Physical length of a row right after it is compacted at ``physical_len`` (the count-only twin of
    ``plan_compaction``): ``protected_older`` is the number of protected tokens outside the window."""
    window = min(config.window, physical_len)
    older = physical_len - window
    return window + max(keep_quota(config, older), protected_older)


def next_trigger(config: CompressionConfig, kept: int, overflow: bool) -> int:
    """Physical length at which a row holding ``kept`` tokens right after a compaction is compacted again.

    ``config.trigger`` (the budget, or budget + buffer in fixed mode), unless protected tokens overflowed the keep
    quota (``overflow``; ``kept`` is then large): the row then first grows by the usual gap
    ``trigger - compacted_length(trigger)``, so that it is not compacted at every step.
    """
    if not overflow:
        return config.trigger
    gap = max(1, config.trigger - compacted_length(config, config.trigger))
    return max(config.trigger, kept + gap)


def quota_overflows(config: CompressionConfig, physical_len: int, protected_older: int) -> bool:
    """Whether the protected tokens outside the window alone exceed a compaction's keep quota (count-only twin of
    ``KeepPlan.overflow``)."""
    return protected_older > keep_quota(config, physical_len - min(config.window, physical_len))


def request_spans(config: CompressionConfig, prompt_len: int, answer_start: int | None) -> list[Span]:
    """The protected spans of one request (one prompt, then generated tokens): the prompt, and from the end of
    thinking on, under the config's ``protect_prompt`` / ``protect_answer``."""
    spans: list[Span] = []
    if config.protect_prompt and prompt_len:
        spans.append((0, prompt_len))
    if config.protect_answer and answer_start is not None:
        spans.append((answer_start, OPEN_END))
    return spans


def protected_count(spans: Sequence[Span], end: int) -> int:
    """How many logical positions in ``[0, end)`` the protected ``spans`` cover (spans do not overlap)."""
    return sum(max(0, min(stop, end) - start) for start, stop in spans)


# ---------------------------------------------------------------------------------------------- protection
def spans_tensor(spans: Sequence[Sequence[Span]], device: torch.device | str) -> torch.Tensor:
    """[rows, max_spans, 2] int64 (start, end) per row, padded with empty spans."""
    width = max(1, max((len(row) for row in spans), default=0))
    # Built as a list: one tensor made from it, not one tiny tensor write per span (this runs at every compaction).
    table = [[[start, min(stop, OPEN_END)] for start, stop in row] + [[0, 0]] * (width - len(row)) for row in spans]
    return to_device(table, device).view(len(spans), width, 2)


def protected_slots(positions: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Which slots hold protected tokens.

    positions: [layers_g, rows, heads_g, slots] logical positions of the slots (-1: free slot).
    spans:     [rows, max_spans, 2] protected logical spans [start, end) per row (``spans_tensor``).
    """
    position = positions.unsqueeze(-1)  # [Lg, R, Hg, S, 1]
    start = spans[:, :, 0].view(1, spans.shape[0], 1, 1, -1)
    stop = spans[:, :, 1].view(1, spans.shape[0], 1, 1, -1)
    return ((position >= start) & (position < stop)).any(dim=-1)


# ---------------------------------------------------------------------------------------------- which slots
@dataclass
class KeepPlan:
    """Kept slots of the compacted rows, on the scores' device (planning reads nothing back from the device).

    keep_index:  [layers_g, rows, heads_g, K] int64, ascending slot indices; entries at j >= keep_count[r] are
                 padding (unspecified). K is the longest compacted row's physical length.
    keep_count:  [rows] int64, the new physical length of each row (the same for every layer and head).
    overflow:    [rows] bool, rows whose protected tokens alone exceeded the keep quota.
    nan_scores:  [rows] bool, rows whose scores held NaN (``read`` rejects the plan).

    Valid by construction for ``kernels.compact_`` (kept indices strictly increasing, below the row's length, exactly
    ``keep_count`` of them), so its owners move slots without checking it again on the device. An owner that queues
    the moves before it reads the plan back gates them on ``nan_scores`` (``DenseCompressor``).
    """

    keep_index: torch.Tensor
    keep_count: torch.Tensor
    overflow: torch.Tensor
    nan_scores: torch.Tensor
    _counts: HostCopy = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The counts start for the host as soon as they are planned (queued behind the planning), so that ``read``
        # waits for them only, not for work queued after the plan, such as its own moves.
        self._counts = HostCopy(torch.stack([self.keep_count, self.overflow.long(), self.nan_scores.long()]))

    def read(self) -> tuple[list[int], list[bool]]:
        """(keep_count, overflow) on the host: the plan's only read-back, which waits for the planning and nothing
        queued after it. Raises ValueError if a row's scores held NaN."""
        counts, overflow, nan_scores = self._counts.wait().tolist()
        if any(nan_scores):
            rows = [row for row, bad in enumerate(nan_scores) if bad]
            raise ValueError(f"scores contain NaN (compacted rows {rows}); a scorer must return finite (or +-inf) "
                             "importance values")
        return counts, [bool(flag) for flag in overflow]


def to_granularity(scores: torch.Tensor, layers_g: int, heads_g: int, num_layers: int, kv_heads: int) -> torch.Tensor:
    """Average [layers_x, rows, heads_x, slots] scores down (or broadcast them up) to [layers_g, rows, heads_g, slots]."""
    if scores.dim() != 4:
        raise ValueError(f"a scorer must return [layers, rows, heads, slots] scores, got shape {tuple(scores.shape)}")
    layers_x, _, heads_x, _ = scores.shape
    if layers_x not in (1, num_layers) or heads_x not in (1, kv_heads):
        raise ValueError(
            f"scorer output has {layers_x} layers x {heads_x} heads; expected 1 or {num_layers} layers and 1 or "
            f"{kv_heads} heads"
        )
    if layers_g == 1 and layers_x > 1:
        scores = scores.mean(dim=0, keepdim=True)
    if heads_g == 1 and heads_x > 1:
        scores = scores.mean(dim=2, keepdim=True)
    return scores.expand(layers_g, -1, heads_g, -1)


def select_keep(
    scores: torch.Tensor,
    physical_len: Sequence[int],
    protected: torch.Tensor,
    config: CompressionConfig,
) -> KeepPlan:
    """Choose the kept slots of each row (device work from host-known lengths: nothing is read back).

    scores:       [layers_g, rows, heads_g, slots] float, higher = more important (finite or +-inf; NaN is flagged
                  in ``KeepPlan.nan_scores``).
    physical_len: the current physical length of each row, as the host knows it (slots past it are ignored).
    protected:    bool, broadcastable to ``scores``: slots that must stay.
    """
    if scores.dim() != 4:
        raise ValueError(f"scores must be [layers_g, rows, heads_g, slots], got shape {tuple(scores.shape)}")
    layers_g, rows, heads_g, slots = scores.shape
    device = scores.device
    lengths = [int(length) for length in physical_len]
    if len(lengths) != rows:
        raise ValueError(f"physical_len must give one length per row ({rows}), got {len(lengths)}")
    if any(not 0 <= length <= slots for length in lengths):
        raise ValueError(f"physical_len must be in [0, {slots}] (the scored slots), got {lengths}")
    protected = protected.to(device).expand_as(scores)
    windows = [min(config.window, length) for length in lengths]
    quotas = [keep_quota(config, length - window) for length, window in zip(lengths, windows)]
    # One host-to-device copy for every per-row count the device needs: length, window, quota.
    length, window, quota = to_device([lengths, windows, quotas], device).unbind(0)

    slot = torch.arange(slots, device=device).view(1, 1, 1, slots)
    older_end = (length - window).view(1, rows, 1, 1)
    is_older = slot < older_end
    in_window = (slot >= older_end) & (slot < length.view(1, rows, 1, 1))
    forced_older = is_older & protected

    protected_older = forced_older.sum(dim=-1)  # [Lg, R, G]; equal across layers/heads by construction
    protected_older = protected_older.amax(dim=(0, 2))
    scored_keep = (quota - protected_older).clamp(min=0)  # [R]
    keep_count = window + torch.maximum(quota, protected_older)

    # Rank the unprotected older slots by score; ties go to the more recent slot (stable sort over reversed slots).
    candidate = is_older & ~protected
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
    order = slots - 1 - order  # back to slot indices, best first
    order_candidate = torch.gather(candidate, -1, order)
    # Candidates first (stable: keeps their score order), then everything else.
    regroup = torch.sort(order_candidate.to(torch.int8), dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(order, -1, regroup)
    rank_position = torch.arange(slots, device=device).view(1, 1, 1, slots)
    chosen_ranked = rank_position < scored_keep.view(1, rows, 1, 1)
    chosen = torch.zeros_like(candidate).scatter_(-1, ranked, chosen_ranked.expand_as(ranked))

    keep = forced_older | in_window | (chosen & candidate)
    width = max(lengths, default=0)  # >= every keep count, known without asking the device
    ordered = torch.where(keep, slot.expand_as(keep), torch.full_like(keep, slots, dtype=torch.long))
    keep_index = torch.sort(ordered, dim=-1).values[..., :width]
    nan_scores = torch.isnan(scores).any(dim=3).any(dim=2).any(dim=0)
    return KeepPlan(keep_index=keep_index, keep_count=keep_count, overflow=protected_older > quota, nan_scores=nan_scores)


def plan_compaction(
    scores: torch.Tensor,
    positions: torch.Tensor,
    physical_len: Sequence[int],
    spans: Sequence[Sequence[Span]],
    config: CompressionConfig,
    *,
    num_layers: int,
    kv_heads: int,
) -> KeepPlan:
    """The whole choice for the compacted rows: scores -> granularity -> protection -> ``select_keep``.

    scores:       [layers_x, rows, heads_x, >= width] raw scorer output (``Scorer.score``).
    positions:    [layers_g, rows, heads_g, >= width] logical position of each slot (the slot table's).
    physical_len: per row, the current physical length as the host knows it; width = the longest.
    spans:        per row, the protected logical spans (``SequenceTracker.protected_spans`` in HF, the prompt and
                  answer spans of a request in vLLM).
    """
    layers_g, _, heads_g, _ = positions.shape
    width = max(physical_len, default=0)
    scores = to_granularity(scores, layers_g, heads_g, num_layers, kv_heads)[..., :width]
    positions = positions[..., :width]
    protected = protected_slots(positions, spans_tensor(spans, positions.device))
    return select_keep(scores, physical_len, protected, config)


class OverflowNotice:
    """Warns once per owner (a cache, a vLLM worker) when protected tokens alone exceed a compaction's keep quota."""

    def __init__(self) -> None:
        self.warned = False

    def check(self, overflow: Sequence[bool]) -> None:
        if self.warned or not any(overflow):
            return
        self.warned = True
        warnings.warn(
            "dynts: protected tokens (prompt / answer) exceed the keep quota of a compaction; all of them are kept, "
            "so the row holds more than the budget: it is next compacted after the usual growth "
            "(budget - compacted length) (warned once per cache)",
            RuntimeWarning, stacklevel=3,
        )

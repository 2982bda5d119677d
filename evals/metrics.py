"""Fidelity metrics of a compressed cache, from the positions it holds: critical-token recall at a compaction,
the mean and peak resident tokens of a row (so methods are compared at equal average KV), and the policy's
resident-token schedule simulated from lengths alone (which budget gives a wanted mean resident KV).

Positions are logical token positions of one row (what ``DynTSCache.resident_positions(row)`` returns). A task
that knows its decision-critical tokens gives them; on the synthetic task a word index ``w`` of
``Problem.critical_positions`` / ``Problem.value_copies`` is token ``prompt_tokens + w`` (``<bos>`` and the
prompt's words come first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from dynts.config import CompressionConfig
from dynts.policy import compacted_length, next_trigger, quota_overflows


def critical_token_recall(critical: Iterable[int], resident_before: Iterable[int], resident_after: Iterable[int]) -> float | None:
    """Share of the candidate critical tokens that a compaction kept.

    Candidates are the critical tokens resident before the compaction (one evicted earlier is not this
    compaction's choice). To judge the scorer alone, leave out of ``resident_before`` what the policy always
    keeps (the window, protected tokens). None when there is no candidate: such a compaction says nothing.
    """
    before = set(resident_before)
    candidates = set(critical) & before
    if not candidates:
        return None
    after = set(resident_after)
    if not after <= before:
        raise ValueError(f"resident_after holds positions that were not resident before: {sorted(after - before)[:8]}")
    return len(candidates & after) / len(candidates)


def critical_value_recall(copies: Mapping[int, Iterable[int]], resident_before: Iterable[int],
                          resident_after: Iterable[int]) -> float | None:
    """Share of the values (groups of equally correct copies, e.g. ``Problem.value_copies``) that keep at least
    one copy after a compaction, among those that had one before: a scorer keeping any correct copy is not
    punished for dropping the others. None when no value had a copy resident before."""
    before, after = set(resident_before), set(resident_after)
    if not after <= before:
        raise ValueError(f"resident_after holds positions that were not resident before: {sorted(after - before)[:8]}")
    candidates = [set(positions) for positions in copies.values() if before & set(positions)]
    if not candidates:
        return None
    return sum(bool(positions & after) for positions in candidates) / len(candidates)


def resident_tokens(lengths: Sequence[int]) -> tuple[float, int]:
    """(mean, peak) of a row's resident token counts, one per decode step (its physical length after the step)."""
    if not lengths:
        raise ValueError("lengths must hold at least one step's resident token count")
    if min(lengths) < 0:
        raise ValueError(f"resident token counts must be >= 0, got {min(lengths)}")
    return sum(lengths) / len(lengths), max(lengths)


def compaction_recalls(copies: Mapping[int, Sequence[int]], resident_before: Sequence[int], resident_after: Iterable[int],
                       window: int) -> tuple[float | None, float | None]:
    """(critical-token recall, critical-value recall) of one compaction of a row, judging the scorer alone: the
    last ``window`` positions held before it (the policy's window, ``resident_before`` in slot order) are left out
    of the candidates, since the policy keeps them whatever the scores. Critical tokens outside the thinking span
    (prompt, answer: protected) are never among ``copies``."""
    older = list(resident_before)[: max(0, len(resident_before) - window)]
    kept = set(resident_after) & set(older)
    critical = [position for positions in copies.values() for position in positions]
    return critical_token_recall(critical, older, kept), critical_value_recall(copies, older, kept)


@dataclass(frozen=True)
class RowLengths:
    """What the policy's schedule of one row depends on: the prompt tokens it holds, the tokens it generates
    (each one a forward pass: the prompt's, then one per generated token but the last), and the index among the
    generated tokens of the end-of-thinking token (None: it never ends thinking; answer protection never starts)."""

    prompt_tokens: int
    generated_tokens: int
    think_end_index: int | None = None


def resident_schedule(config: CompressionConfig, row: RowLengths) -> list[int]:
    """A row's physical length after each forward pass of one ``generate`` call under ``config``: the prompt's pass,
    then one pass per generated token but the last (the same passes ``DynTSCache.stats.history`` records).
    Compactions follow ``dynts.policy``'s count functions; the prompt is protected (``protect_prompt``) and so is
    everything from the end of thinking on (``protect_answer``). The same schedule holds for every scorer."""
    protected_prompt = row.prompt_tokens if config.protect_prompt else 0
    length, answer_tokens, trigger = 0, 0, config.trigger
    lengths = []
    for step in range(row.generated_tokens):
        if step == 0:
            length = row.prompt_tokens
        else:
            length += 1
            # Pass ``step`` feeds generated token ``step - 1``; from the end-of-thinking token on, it is protected.
            if config.protect_answer and row.think_end_index is not None and step - 1 >= row.think_end_index:
                answer_tokens += 1
        # Compacted again while still at the trigger and shrinking (a prompt longer than the budget), as the cache does.
        while length >= trigger:
            window = min(config.window, length)
            # Resident, in order: the prompt, kept thinking tokens, the answer so far; the window is the tail.
            protected_older = min(protected_prompt, length - window) + max(0, answer_tokens - window)
            compacted = compacted_length(config, length, protected_older)
            trigger = next_trigger(config, compacted, quota_overflows(config, length, protected_older))
            if compacted == length:
                break
            length = compacted
        lengths.append(length)
    return lengths


def mean_resident_share(config: CompressionConfig, rows: Sequence[RowLengths], reference_tokens: float) -> float:
    """Mean over ``rows`` of each row's mean resident tokens (``resident_schedule``), as a share of
    ``reference_tokens`` (the mean thinking length)."""
    means = [resident_tokens(resident_schedule(config, row))[0] for row in rows]
    return sum(means) / len(means) / reference_tokens


def budget_for_resident_share(make_config: Callable[[int], CompressionConfig], rows: Sequence[RowLengths],
                              reference_tokens: float, share: float, smallest_budget: int) -> tuple[int, float]:
    """The budget whose schedule gives ``rows`` a mean resident share of ``reference_tokens`` closest to ``share``,
    and that share. ``make_config(budget)`` builds the settings (mode, window, ratio, buffer) around a budget.

    Searched by bisection between ``smallest_budget`` (the smallest valid one: window + 1) and one that no row
    reaches (no compaction: the full cache's share); the share grows with the budget (up to a token's rounding at a
    compaction's timing).
    Raises ValueError naming the reachable range when the closest share found is off by more than 10% of ``share``."""
    if not rows:
        raise ValueError("rows must hold at least one row's lengths")
    low, high = smallest_budget, max(smallest_budget, max(row.prompt_tokens + row.generated_tokens for row in rows) + 1)
    share_at = {budget: mean_resident_share(make_config(budget), rows, reference_tokens) for budget in (low, high)}
    reachable = (f"these settings give {share_at[low]:.3f} at the smallest budget ({low}) up to {share_at[high]:.3f} "
                 "without compaction (the full cache)")
    while high - low > 1:
        middle = (low + high) // 2
        share_at[middle] = mean_resident_share(make_config(middle), rows, reference_tokens)
        if share_at[middle] < share:
            low = middle
        else:
            high = middle
    budget = min((low, high), key=lambda candidate: abs(share_at[candidate] - share))
    if abs(share_at[budget] - share) > 0.1 * share:
        raise ValueError(f"a mean resident share of {share:g} is out of reach: {reachable}")
    return budget, share_at[budget]

"""Fidelity metrics of a compressed cache, from the positions it holds: critical-token recall at a compaction,
and the mean and peak resident tokens of a row (so methods are compared at equal average KV).

Positions are logical token positions of one row (what ``DynTSCache.resident_positions(row)`` returns). A task
that knows its decision-critical tokens gives them; on the synthetic task a word index ``w`` of
``Problem.critical_positions`` / ``Problem.value_copies`` is token ``prompt_tokens + w`` (``<bos>`` and the
prompt's words come first).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


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

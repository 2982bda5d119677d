"""Fidelity metrics on a hand-built trace whose critical tokens are known, and on a generated problem."""

from __future__ import annotations

import pytest
from dynts.evals.metrics import critical_token_recall, critical_value_recall, resident_tokens
from dynts.evals.synthetic_task import TaskConfig, generate_problems

# A hand-built trace (positions 0..39): save s1's value is written at 8 and re-read at 20, save s2's value at 15;
# 0..3 stand for the prompt. The copies were found by hand, reading the words.
WORDS = ("a 3 + n0 save 6 -> s1 6 | t2 save 1 -> s2 1 | t3 read s1 6 | t4 b + c : 1 + 6 = 7 | a 6 b 7 c 1 ok").split()
COPIES = {1: [8, 20], 2: [15]}


def test_the_hand_built_trace_has_its_copies_where_stated() -> None:
    assert [WORDS[p] for p in (8, 20, 15)] == ["6", "6", "1"]
    assert [WORDS[p - 1] for p in (8, 20, 15)] == ["s1", "s1", "s2"]


def test_token_recall_counts_only_candidates() -> None:
    critical = [p for positions in COPIES.values() for p in positions]
    before = list(range(4, 40))  # the prompt is protected: not a candidate set of this compaction
    assert critical_token_recall(critical, before, [8, 15, 20, 25]) == 1.0
    assert critical_token_recall(critical, before, [8, 25, 26]) == pytest.approx(1 / 3)
    assert critical_token_recall(critical, before, [25, 26]) == 0.0
    # A copy evicted at an earlier compaction (8 not resident before) is not this compaction's choice.
    assert critical_token_recall(critical, [15, 20, 21, 22], [15, 21]) == 0.5
    # No critical token resident before: the compaction says nothing about critical tokens.
    assert critical_token_recall(critical, [21, 22, 23], [21]) is None


def test_value_recall_accepts_any_copy() -> None:
    before = list(range(4, 40))
    # Keeping the restatement (20) instead of the original (8) keeps value s1: no penalty.
    assert critical_value_recall(COPIES, before, [15, 20]) == 1.0
    assert critical_token_recall([8, 15, 20], before, [15, 20]) == pytest.approx(2 / 3)
    assert critical_value_recall(COPIES, before, [20]) == 0.5
    assert critical_value_recall(COPIES, before, [25]) == 0.0
    assert critical_value_recall(COPIES, [20, 21], [21]) == 0.0  # s2 had no copy before: one candidate value
    assert critical_value_recall(COPIES, [21, 22], [21]) is None


def test_after_must_be_a_subset_of_before() -> None:
    with pytest.raises(ValueError, match="resident_after"):
        critical_token_recall([8], [8, 9], [8, 10])
    with pytest.raises(ValueError, match="resident_after"):
        critical_value_recall(COPIES, [8, 9], [8, 10])


def test_recall_on_a_generated_problem_keeping_one_copy_per_value() -> None:
    problem = generate_problems(1, 3, TaskConfig(family="reuse", reuse_every=2))[0]
    copies = problem.value_copies
    before = list(range(problem.trace_length))
    latest = [positions[-1] for positions in copies.values()]
    assert critical_value_recall(copies, before, latest) == 1.0
    assert critical_token_recall(problem.critical_positions, before, latest) == pytest.approx(len(copies) / len(problem.critical_positions))


def test_resident_tokens_mean_and_peak() -> None:
    # A row growing 10 -> 13, compacted to 8, growing again to 9.
    assert resident_tokens([10, 11, 12, 13, 8, 9]) == (pytest.approx(63 / 6), 13)
    with pytest.raises(ValueError, match="at least one"):
        resident_tokens([])
    with pytest.raises(ValueError, match=">= 0"):
        resident_tokens([3, -1])

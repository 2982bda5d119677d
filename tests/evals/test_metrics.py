"""Fidelity metrics on a hand-built trace whose critical tokens are known, and on a generated problem; the eviction
schedule simulated from lengths, against hand arithmetic and a real cache."""

from __future__ import annotations

import pytest
from dynts import CompressionConfig
from dynts.evals.metrics import (
    RowLengths, budget_for_resident_share, compaction_recalls, critical_token_recall, critical_value_recall,
    mean_resident_share, resident_schedule, resident_tokens,
)
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


def test_compaction_recalls_leave_the_window_out() -> None:
    # Held before: positions 4..39; the window (8) is 32..39. Save s3's only copy (35) sits in the window: the
    # policy keeps it whatever the scores, so it is not the scorer's choice.
    copies = {1: [8, 20], 2: [15], 3: [35]}
    before = list(range(4, 40))
    kept = [8, 30, 31, *range(32, 40)]
    token_recall, value_recall = compaction_recalls(copies, before, kept, window=8)
    assert token_recall == pytest.approx(1 / 3)  # 8 of 8, 15, 20
    assert value_recall == 0.5  # s1 kept (8), s2 lost
    assert compaction_recalls({3: [35]}, before, kept, window=8) == (None, None)


def _config(**fields) -> CompressionConfig:
    return CompressionConfig(**fields)


def test_schedule_by_hand_in_both_budget_modes() -> None:
    # dynts mode, budget 10, window 4, keep ratio 0.5, a 3-token protected prompt: the row grows 3, 4, ..., reaches 10
    # at pass 7 and keeps 4 + max(floor(0.5 x 6), 3 protected) = 7; again at pass 10.
    dynts = _config(budget=10, window=4, keep_ratio=0.5)
    assert resident_schedule(dynts, RowLengths(3, 12)) == [3, 4, 5, 6, 7, 8, 9, 7, 8, 9, 7, 8]
    # fixed mode, budget 6, buffer 3, window 2: compacted at 9 down to the budget, 6.
    fixed = _config(budget=6, window=2, budget_mode="fixed", buffer=3)
    assert resident_schedule(fixed, RowLengths(2, 12)) == [2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 6, 7]
    # The protected prompt (5 tokens) exceeds the dynts quota (floor(0.5 x 4) = 2): all 5 stay, 4 + 5 = 9, and the
    # next compaction waits for the usual growth, 10 - compacted_length(10) = 10 - (4 + 3) = 3 tokens: at 12.
    assert resident_schedule(dynts, RowLengths(5, 12)) == [5, 6, 7, 8, 9, 9, 10, 11, 9, 10, 11, 9]
    # From the end of thinking on (generated token 4, fed at pass 5) nothing leaves: at pass 7 the row holds 3
    # answer tokens, none of them older than the window, so the same counts; at pass 10, 6 answer tokens, 2 of them
    # older than the window, count as protected besides the prompt: 4 + max(3, 3 + 2) = 9.
    assert resident_schedule(dynts, RowLengths(3, 12, think_end_index=4)) == [3, 4, 5, 6, 7, 8, 9, 7, 8, 9, 9, 10]


@pytest.mark.filterwarnings("ignore:dynts. protected tokens")  # the short prompts overflow some quotas, by design
def test_schedule_matches_a_real_cache_in_both_modes() -> None:
    """The simulated schedule equals the lengths a DynTSCache records while generating (ragged prompts, answer
    protection from a forced end-of-thinking token)."""
    import torch
    from dynts import DynTSCache
    from tiny_models import ForceToken, left_padded_batch, tiny_model

    think_end, marker_step, new_tokens = 5, 30, 70
    model = tiny_model("llama")
    prompt_lengths = [5, 11]
    ids, mask = left_padded_batch(prompt_lengths, seed=3)
    for config in (_config(budget=24, window=6, keep_ratio=0.4, think_end=(think_end,)),
                   _config(budget=16, window=4, budget_mode="fixed", buffer=5, think_end=(think_end,))):
        cache = DynTSCache(model, config, scorer="h2o", eos_token_id=[])
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False,
                       eos_token_id=None, pad_token_id=0, logits_processor=[ForceToken(marker_step, think_end, only_then=True)])
        history = list(cache.stats.history)
        assert len(history) == new_tokens
        for row, prompt in enumerate(prompt_lengths):
            expected = resident_schedule(config, RowLengths(prompt, new_tokens, think_end_index=marker_step))
            assert [step[row] for step in history] == expected, config
        assert cache.stats.compactions > 2
        torch.testing.assert_close(cache.stats.mean_resident_tokens,
                                   sum(resident_tokens(resident_schedule(config, RowLengths(p, new_tokens, marker_step)))[0]
                                       for p in prompt_lengths) / 2)


def test_budget_for_a_resident_share_is_the_closest_one() -> None:
    rows = [RowLengths(20, 900, 850), RowLengths(24, 1100, 1060)]
    reference = 955.0

    def dynts(budget: int) -> CompressionConfig:
        return _config(budget=budget, window=64, keep_ratio=0.3)

    for share in (0.12, 0.2, 0.3):
        budget, found = budget_for_resident_share(dynts, rows, reference, share, smallest_budget=65)
        assert found == pytest.approx(mean_resident_share(dynts(budget), rows, reference))
        assert abs(found - share) < 0.01
        for neighbour in (budget - 1, budget + 1):
            assert abs(mean_resident_share(dynts(neighbour), rows, reference) - share) >= abs(found - share) - 1e-12
    # Below what the smallest budget keeps (the window and the prompt), or above the full cache: out of reach, said
    # with the reachable range.
    with pytest.raises(ValueError, match=r"out of reach: .* at the smallest budget \(65\)"):
        budget_for_resident_share(dynts, rows, reference, 0.02, smallest_budget=65)
    with pytest.raises(ValueError, match="without compaction"):
        budget_for_resident_share(dynts, rows, reference, 0.9, smallest_budget=65)

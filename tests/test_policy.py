import torch
import pytest

from dynts import CompressionConfig, select_keep
from dynts.policy import protected_slots, request_spans, spans_tensor


def _keep(scores, length, protected=None, **config):
    config = CompressionConfig(**config)
    scores = torch.tensor(scores, dtype=torch.float32).view(1, 1, 1, -1)
    protected = torch.zeros_like(scores, dtype=torch.bool) if protected is None else torch.tensor(protected).view(1, 1, 1, -1)
    plan = select_keep(scores, [length], protected, config)
    (count,), (overflow,) = plan.read()
    return plan.keep_index[0, 0, 0, :count].tolist(), overflow


def test_window_plus_top_k():
    # 10 slots, window 2 -> older 8, keep floor(0.5 * 8) = 4 best of slots 0..7, plus slots 8, 9.
    kept, overflow = _keep([5, 1, 7, 3, 9, 0, 2, 8, 0, 0], 10, budget=10, window=2, keep_ratio=0.5)
    assert kept == [0, 2, 4, 7, 8, 9] and not overflow


def test_ties_go_to_the_more_recent_slot():
    kept, _ = _keep([1, 1, 1, 1, 1, 1], 6, budget=6, window=1, keep_ratio=0.4)  # older 5 -> keep 2
    assert kept == [3, 4, 5]


def test_protected_count_against_the_quota_and_always_stay():
    protected = [True, False, False, False, False, True, False, False]
    kept, overflow = _keep([0, 9, 8, 7, 6, 0, 0, 0], 8, protected, budget=8, window=2, keep_ratio=0.5)  # quota 3
    assert kept == [0, 1, 5, 6, 7] and not overflow  # 2 protected + the single best scored one


def test_protected_overflow_keeps_all_protected_and_flags_the_row():
    protected = [True, True, True, False, False, False]
    kept, overflow = _keep([0, 0, 0, 5, 5, 5], 6, protected, budget=6, window=1, keep_ratio=0.2)  # quota 1
    assert kept == [0, 1, 2, 5] and overflow


def test_keep_ratio_one_keeps_everything():
    kept, _ = _keep([3, 2, 1, 0], 4, budget=4, window=1, keep_ratio=1.0)
    assert kept == [0, 1, 2, 3]


def test_ragged_rows_and_padding_past_the_length():
    config = CompressionConfig(budget=6, window=1, keep_ratio=0.5)
    scores = torch.tensor([[1.0, 5, 2, 4, 3, 0, 9, 9], [9.0, 1, 8, 2, 0, 0, 0, 0]]).view(1, 2, 1, 8)
    plan = select_keep(scores, [6, 4], torch.zeros(1, 2, 1, 8, dtype=torch.bool), config)
    assert plan.keep_count.tolist() == [1 + 2, 1 + 1]
    assert plan.keep_index[0, 0, 0, :3].tolist() == [1, 3, 5]
    assert plan.keep_index[0, 1, 0, :2].tolist() == [0, 3]


def test_per_head_keep_sets_have_equal_counts():
    config = CompressionConfig(budget=5, window=1, keep_ratio=0.5, granularity="per_kv_head")
    scores = torch.tensor([[4.0, 3, 2, 1, 0], [0.0, 1, 2, 3, 4]]).view(1, 1, 2, 5)
    plan = select_keep(scores, [5], torch.zeros(1, 1, 1, 5, dtype=torch.bool), config)
    assert plan.keep_index[0, 0, 0, :3].tolist() == [0, 1, 4]
    assert plan.keep_index[0, 0, 1, :3].tolist() == [2, 3, 4]


def test_nan_scores_are_rejected():
    with pytest.raises(ValueError, match=r"NaN \(compacted rows \[0\]\)"):
        _keep([float("nan"), 1.0, 2.0], 3, budget=3, window=1)
    scores = torch.tensor([[1.0, 2, 3], [1.0, float("nan"), 3]]).view(1, 2, 1, 3)
    plan = select_keep(scores, [3, 2], torch.zeros(1, 2, 1, 3, dtype=torch.bool), CompressionConfig(budget=3, window=1))
    assert plan.nan_scores.tolist() == [False, True]
    with pytest.raises(ValueError, match=r"compacted rows \[1\]"):
        plan.read()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the counts are copied asynchronously)")
def test_reading_a_plan_waits_for_the_planning_only():
    """A kernel queued after the plan (as a compaction's moves are) is still running when ``read`` returns."""
    config = CompressionConfig(budget=6, window=1, keep_ratio=0.5)
    scores = torch.arange(12.0, device="cuda").view(1, 2, 1, 6)
    plan = select_keep(scores, [6, 5], torch.zeros(1, 2, 1, 6, dtype=torch.bool, device="cuda"), config)
    torch.cuda._sleep(500_000_000)  # spins the GPU for well over 100 ms
    counts, overflow = plan.read()
    assert not torch.cuda.current_stream().query(), "read waited for the kernel queued after the plan"
    assert counts == plan.keep_count.tolist() == [3, 3] and overflow == [False, False]


def test_lengths_outside_the_scored_slots_are_rejected():
    config = CompressionConfig(budget=3, window=1)
    scores = torch.zeros(1, 2, 1, 3)
    with pytest.raises(ValueError, match=r"physical_len must be in \[0, 3\]"):
        select_keep(scores, [3, 4], torch.zeros(1, 2, 1, 3, dtype=torch.bool), config)
    with pytest.raises(ValueError, match=r"one length per row \(2\)"):
        select_keep(scores, [3], torch.zeros(1, 2, 1, 3, dtype=torch.bool), config)


def test_protected_slots_from_positions():
    config = CompressionConfig(budget=8, window=1)
    positions = torch.tensor([0, 1, 2, 5, 6, 7, -1]).view(1, 1, 1, -1)
    protected = protected_slots(positions, spans_tensor([request_spans(config, 2, 6)], "cpu"))
    assert protected.view(-1).tolist() == [True, True, False, False, True, True, False]  # -1: a free slot
    unprotected = protected_slots(positions, spans_tensor([request_spans(
        CompressionConfig(budget=8, window=1, protect_prompt=False, protect_answer=False), 2, 6)], "cpu"))
    assert not unprotected.any()


@pytest.mark.parametrize("budget_mode", ["dynts", "fixed"])
def test_the_count_only_twin_agrees_with_plan_compaction(budget_mode: str) -> None:
    """The vLLM scheduler never sees scores or slots: compacted_length(physical, protected tokens before the window),
    with the window taken as the newest logical tokens (all resident) and every protected token resident, must land
    on the count plan_compaction keeps, for any lengths, windows, ratios, modes and protected spans."""
    from dynts.policy import OPEN_END, compacted_length, plan_compaction, protected_count

    generator = torch.Generator().manual_seed(0)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=generator))

    checked = 0
    for trial in range(400):
        window = draw(0, 12)
        budget = window + draw(1, 40)
        extra = {"buffer": draw(1, 9)} if budget_mode == "fixed" else {}
        config = CompressionConfig(budget=budget, window=window, keep_ratio=float(torch.rand(1, generator=generator)) * 0.95 + 0.05,
                                   budget_mode=budget_mode, **extra)
        logical = draw(1, 3 * budget + 30)
        prompt = draw(0, min(15, logical) + 1)
        answer = None if trial % 3 else draw(prompt, logical + 1)
        spans = [(0, prompt)] + ([(answer, OPEN_END)] if answer is not None else [])
        recent = set(range(logical - min(window, logical), logical))
        protected = {p for p in range(logical) if any(a <= p < b for a, b in spans)}
        others = sorted(set(range(logical)) - recent - protected)
        survivors = [others[i] for i in torch.randperm(len(others), generator=generator)[: draw(0, len(others) + 1)].tolist()]
        held = sorted(recent | protected | set(survivors))
        length = len(held)
        if length < min(window, logical):
            continue
        plan = plan_compaction(torch.rand(1, 1, 1, length, generator=generator), torch.tensor(held).view(1, 1, 1, -1),
                               [length], [spans], config, num_layers=1, kv_heads=1)
        twin = compacted_length(config, length, protected_count(spans, logical - min(window, length)))
        (kept,), _ = plan.read()
        assert kept == twin, (config, logical, spans, held)
        checked += 1
    assert checked > 300


@pytest.mark.parametrize("granularity", ["shared", "per_kv_head"])
def test_plans_are_valid_for_the_unchecked_move(granularity: str) -> None:
    """Owners move a plan's slots without checking it on the device (``check_values=False``): for every ragged row
    and head, the first keep_count indices must be strictly increasing slots below the row's length that hold the
    whole window and every protected slot; the kernels' own validator must accept the plan."""
    from dynts.kernels.validation import check_compaction_args
    from dynts.policy import keep_quota

    generator = torch.Generator().manual_seed(1)
    for trial in range(60):
        rows, heads, slots = 1 + trial % 4, 2, 40
        config = CompressionConfig(budget=30, window=int(torch.randint(0, 8, (1,), generator=generator)),
                                   keep_ratio=0.05 + 0.9 * float(torch.rand(1, generator=generator)), granularity=granularity)
        heads_g = heads if granularity == "per_kv_head" else 1
        lengths = torch.randint(0, slots + 1, (rows,), generator=generator).tolist()
        scores = torch.randn(1, rows, heads_g, slots, generator=generator).round(decimals=1)  # ties too
        protected = torch.rand(1, rows, 1, slots, generator=generator) < 0.2
        plan = select_keep(scores, lengths, protected, config)
        counts, overflow = plan.read()
        cache = torch.zeros(1, rows, heads, slots, 1)
        check_compaction_args([cache], torch.arange(rows), plan.keep_index, plan.keep_count)  # raises if invalid
        for row, (length, count) in enumerate(zip(lengths, counts)):
            window = min(config.window, length)
            must = set(range(length - window, length)) | {s for s in range(length) if protected[0, row, 0, s]}
            older_protected = sum(1 for s in must if s < length - window)
            quota = keep_quota(config, length - window)
            assert count == window + max(quota, older_protected) and overflow[row] == (older_protected > quota)
            for head in range(heads_g):
                kept = plan.keep_index[0, row, head, :count].tolist()
                assert kept == sorted(set(kept)) and all(0 <= s < length for s in kept), (trial, row, kept)
                assert must <= set(kept), (trial, row, must - set(kept))

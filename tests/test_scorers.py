"""Each scorer on a small case computed by hand, driven through the integration-independent DenseCompressor."""

from __future__ import annotations

import math

import pytest
import torch

from dynts import CompressionConfig
from dynts.compressor import DenseCompressor
from dynts.scorers import (
    SCORERS, ExternalScorer, H2OScorer, RandomScorer, RKVScorer, SepLLMScorer, SnapKVScorer, StreamingLLMScorer,
    TOVAScorer, WindowScorer, get_scorer,
)

LN2 = math.log(2.0)


def _step(compressor: DenseCompressor, keys: list[float], queries: list[float] | None = None,
          ids: list[int] | None = None, hidden: torch.Tensor | None = None) -> None:
    """One forward pass of a 1-layer, 1-head, head_dim-1 model adding len(keys) tokens to a single row."""
    new = len(keys)
    key = torch.tensor(keys, dtype=torch.float32).view(1, 1, new, 1)
    input_ids = None if ids is None else torch.tensor([ids])
    compressor.begin_step(batch_size=1, num_new=new, input_ids=input_ids)
    compressor.write(0, key, key.clone())
    if queries is not None:
        compressor.observe_queries(0, torch.tensor(queries, dtype=torch.float32).view(1, 1, new, 1))
    compressor.end_step(hidden)


def _compressor(scorer, budget=100, window=3, keep_ratio=0.5, **config) -> DenseCompressor:
    config = CompressionConfig(budget=budget, window=window, keep_ratio=keep_ratio, protect_prompt=False, **config)
    return DenseCompressor(config, scorer, num_layers=1, query_heads=1, scale=1.0, eos_token_ids=())


def _scores(compressor: DenseCompressor) -> list[float]:
    length = compressor.slots.physical_len_host[0]
    return compressor.scorer.score(torch.tensor([0]))[..., :length].reshape(-1).tolist()


def test_h2o_accumulates_attention_over_all_steps_and_follows_compaction():
    compressor = _compressor(H2OScorer(), budget=4, window=1, keep_ratio=0.7)
    # Prefill keys [0, 0, ln2], every query 1: causal softmax rows [1], [1/2, 1/2], [1/4, 1/4, 1/2].
    _step(compressor, [0.0, 0.0, LN2], queries=[1.0, 1.0, 1.0])
    assert _scores(compressor) == pytest.approx([1.75, 0.75, 0.5])
    # Decode key 0 with query 1: softmax over [0, 0, ln2, 0] = [1/5, 1/5, 2/5, 1/5] is added.
    compressor.begin_step(batch_size=1, num_new=1)
    key = torch.zeros(1, 1, 1, 1)
    compressor.write(0, key, key)
    compressor.observe_queries(0, torch.ones(1, 1, 1, 1))
    before = compressor.scorer.score(torch.tensor([0]))[..., :4].reshape(-1).tolist()
    assert before == pytest.approx([1.95, 0.95, 0.9, 0.2])
    compressor.end_step()  # length 4 = budget: keep window 1 + floor(0.7 * 3) = 2 best -> slots 0, 1, 3
    assert compressor.resident_positions(0)[0].tolist() == [0, 1, 3]
    assert _scores(compressor) == pytest.approx([1.95, 0.95, 0.2])


def test_snapkv_sums_the_observation_window_then_max_pools():
    compressor = _compressor(SnapKVScorer(observation_window=2, kernel_size=3), window=3)
    _step(compressor, [0.0, LN2, 0.0, 0.0], queries=[1.0, 1.0, 1.0, 1.0])
    # Query at slot 2 sees [0, ln2, 0] -> [1/4, 1/2, 1/4]; query at slot 3 sees 4 keys -> [1/5, 2/5, 1/5, 1/5].
    summed = [0.25 + 0.2, 0.5 + 0.4, 0.25 + 0.2, 0.2]
    pooled = [max(summed[max(i - 1, 0) : i + 2]) for i in range(4)]
    assert _scores(compressor) == pytest.approx(pooled)


def test_tova_uses_the_last_query_only():
    compressor = _compressor(TOVAScorer())
    _step(compressor, [0.0, LN2, 0.0], queries=[5.0, 5.0, 1.0])
    assert _scores(compressor) == pytest.approx([0.25, 0.5, 0.25])


def test_rkv_redundancy_retains_the_most_recent_of_similar_keys():
    """R-KV's worked example (official cal_similarity): keys e1, e1, e1, e2. Each key's similarity to its most recent
    highly similar key is not counted: column means [2/4, 1/4, 0, 0], softmax over the 4 keys."""
    compressor = DenseCompressor(
        CompressionConfig(budget=100, window=0, protect_prompt=False),
        RKVScorer(observation_window=1, kernel_size=1, lam=0.0), num_layers=1, query_heads=1, scale=1.0,
    )
    compressor.begin_step(batch_size=1, num_new=4)
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).view(1, 1, 4, 2)
    compressor.write(0, keys, keys)
    compressor.observe_queries(0, torch.zeros(1, 1, 4, 2))
    compressor.end_step()
    means = torch.tensor([0.5, 0.25, 0.0, 0.0])
    redundancy = torch.softmax(means, dim=0).tolist()
    assert redundancy == pytest.approx([0.3342, 0.2603, 0.2027, 0.2027], abs=1e-4)
    assert _scores(compressor) == pytest.approx([-r for r in redundancy])  # lam 0: score = -redundancy
    # lam = 1: pure importance; query 0 gives uniform attention over the non-window keys (all 4: window 0).
    compressor.scorer.lam = 1.0
    assert _scores(compressor) == pytest.approx([0.25] * 4)


def test_rkv_importance_takes_the_max_of_the_group_logits_over_the_non_window_keys():
    """Two query heads share one KV head: the logits are reduced by their max over the group, then one softmax over
    the keys outside the window (the window key gets nothing)."""
    compressor = DenseCompressor(
        CompressionConfig(budget=100, window=1, protect_prompt=False),
        RKVScorer(observation_window=1, kernel_size=1, lam=1.0), num_layers=1, query_heads=2, scale=1.0,
    )
    compressor.begin_step(batch_size=1, num_new=3)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).view(1, 1, 3, 2)
    compressor.write(0, keys, keys)
    queries = torch.zeros(1, 2, 3, 2)
    queries[0, 0, -1] = torch.tensor([3.0, 0.0])  # head a: logits [3, 0 | 3]
    queries[0, 1, -1] = torch.tensor([0.0, 1.0])  # head b: logits [0, 1 | 1]
    compressor.observe_queries(0, queries)
    compressor.end_step()
    e = math.e
    assert _scores(compressor) == pytest.approx([e**3 / (e**3 + e), e / (e**3 + e), 0.0])  # softmax([3, 1]), window 0


def test_streamingllm_keeps_sinks_then_recent():
    compressor = _compressor(StreamingLLMScorer(sinks=2), budget=8, window=2, keep_ratio=0.5)
    _step(compressor, [0.0] * 8)  # reaches the budget: older 6 -> keep 3: the 2 sinks and the most recent older
    assert compressor.resident_positions(0)[0].tolist() == [0, 1, 5, 6, 7]


def test_sepllm_keeps_sinks_then_separators_then_recent():
    compressor = _compressor(SepLLMScorer([9], sinks=1), budget=8, window=2, keep_ratio=0.5)
    _step(compressor, [0.0] * 8, ids=[4, 9, 4, 4, 9, 4, 4, 4])
    assert compressor.resident_positions(0)[0].tolist() == [0, 1, 4, 6, 7]


def test_window_keeps_the_most_recent():
    compressor = _compressor(WindowScorer(), budget=8, window=2, keep_ratio=0.5)
    _step(compressor, [0.0] * 8)
    assert compressor.resident_positions(0)[0].tolist() == [3, 4, 5, 6, 7]


def test_random_is_seeded_and_uniform():
    first = _compressor(RandomScorer(seed=7))
    second = _compressor(RandomScorer(seed=7))
    for compressor in (first, second):
        _step(compressor, [0.0] * 50)
    assert _scores(first) == _scores(second)
    values = torch.tensor(_scores(first))
    assert 0.0 <= float(values.min()) and float(values.max()) < 1.0 and values.std() > 0.2


def test_external_scores_are_stored_per_token_and_follow_compaction():
    seen = []

    def score_fn(hidden, input_ids):
        seen.append(hidden.shape)
        return hidden[..., 0] * 10

    compressor = _compressor(ExternalScorer(score_fn), budget=6, window=1, keep_ratio=0.5)
    hidden = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0]).view(1, 5, 1)
    _step(compressor, [0.0] * 5, hidden=hidden)
    assert seen == [torch.Size([1, 5, 1])]
    assert _scores(compressor) == pytest.approx([30, 10, 40, 10, 50])
    _step(compressor, [0.0], hidden=torch.tensor([[[9.0]]]))  # length 6: keep window 1 + floor(0.5 * 5) = 2 best
    assert compressor.resident_positions(0)[0].tolist() == [2, 4, 5]
    assert _scores(compressor) == pytest.approx([40, 50, 90])


def test_external_score_shape_is_checked():
    compressor = _compressor(ExternalScorer(lambda hidden, ids: hidden.sum(-1, keepdim=True)))
    with pytest.raises(ValueError, match=r"score_fn returned shape \(1, 3, 1\); expected \[rows, new tokens\] = \(1, 3\)"):
        _step(compressor, [0.0] * 3, hidden=torch.zeros(1, 3, 4))


def test_registry_and_argument_checks():
    assert set(SCORERS) == {"external", "h2o", "snapkv", "rkv", "tova", "streamingllm", "sepllm", "window", "random",
                            "predictor"}
    assert isinstance(get_scorer("snapkv", observation_window=4), SnapKVScorer)
    with pytest.raises(ValueError, match="unknown scorer 'h3o'; allowed:"):
        get_scorer("h3o")
    with pytest.raises(ValueError, match="kernel_size must be an odd number >= 1, got 4"):
        SnapKVScorer(kernel_size=4)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\], got 2"):
        RKVScorer(lam=2)
    with pytest.raises(ValueError, match="sinks must be >= 0, got -1"):
        StreamingLLMScorer(sinks=-1)
    with pytest.raises(ValueError, match="separator_ids must name at least one token id"):
        SepLLMScorer([])
    with pytest.raises(ValueError, match="observation_window must be >= 1, got 0"):
        SnapKVScorer(observation_window=0)

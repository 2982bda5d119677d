"""The bundled tiny reasoner as a testbed (reduced, on the shipped model and predictor head): the full cache, the
learned predictor and the baselines at a budget of 25% of the mean thinking length on every task family.

One batch holds held-out problems of the three families (frequent reuse, dormant, abandoned branches), so that
each method runs one ``generate`` call; every method follows the same eviction schedule (budget mode dynts, one
budget), so they compare at equal mean resident KV, which the test checks from the caches' own lengths. Left out
to keep the module within a few minutes on 2 cores: the oracle (the README's tables show it) and StreamingLLM,
which here keeps exactly what ``window`` keeps (its sinks lie in the protected prompt).
"""

from __future__ import annotations

import json
import statistics

import pytest
from dynts.cli import load_model
from dynts.evals.demo import family_samples, family_scores
from dynts.evals.harness import FULL, PREDICTOR, Sampling, Setting, attention_methods, evaluate
from dynts.evals.synthetic_task import bundled_reasoner_path

PROBLEMS = 5  # per family
FAMILIES = {"reuse": {"family": "reuse", "reuse_every": 2}, "dormant": {"family": "dormant"},
            "branches": {"family": "branches"}}
BUDGET_FRACTION = 0.25
# The scorers that read attention (as opposed to position, separators or chance).
ATTENTION_SCORERS = ("h2o", "snapkv", "rkv", "tova")
BASELINES = tuple(method for method in attention_methods() if method != "streamingllm")


@pytest.fixture(scope="module")
def scores(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """{family: {method: {"pass@1", "partial_credit", "mean_resident_tokens", "compactions", ...}}} from one
    evaluation of every method over the three families in one batch."""
    from dynts.predictor import PredictorScorer

    samples = family_samples(PROBLEMS, FAMILIES)
    mean_trace = statistics.mean(sample.meta["trace_length"] for sample in samples)
    budget = round(BUDGET_FRACTION * mean_trace)
    assert 220 <= budget <= 300  # 25% of ~1,000 thinking tokens in every family
    model, tokenizer = load_model(bundled_reasoner_path(), "cpu")
    head = bundled_reasoner_path() / "predictor"
    methods = [FULL, *BASELINES, PREDICTOR]
    settings = [Setting(FULL)] + [Setting(method, budget, 64, 0.3, "dynts") for method in methods[1:]]
    sampling = Sampling(max_new_tokens=max(s.meta["completion_tokens"] for s in samples) + 64, batch_size=len(samples))
    path = tmp_path_factory.mktemp("testbed") / "results.jsonl"
    with open(path, "w") as out_file:
        summaries = evaluate(model, tokenizer, samples, settings, sampling, dataset="synthetic", out_file=out_file,
                             predictor=lambda: PredictorScorer(head, model=model), progress=False, save_completions=False)
    assert [s["method"] for s in summaries] == methods
    table = family_scores(path)
    print(json.dumps(table, indent=1))  # shown with -s, and on failure
    return table


def best_baseline(results: dict[str, dict[str, float]], methods: tuple[str, ...] | list[str]) -> tuple[str, float]:
    return max(((method, results[method]["partial_credit"]) for method in methods), key=lambda item: item[1])


def test_every_method_compacts_and_keeps_the_same_mean_kv(scores) -> None:
    for family, results in scores.items():
        assert set(results) == {FULL, PREDICTOR, *BASELINES}, family
        compressed = {method: r for method, r in results.items() if method != FULL}
        assert all(r["compactions"] > 0 for r in compressed.values())
        kv = [r["mean_resident_tokens"] for r in compressed.values()]
        # One schedule for every scorer: the mean resident KV differs only where traces differ in length.
        assert max(kv) <= 1.05 * min(kv), (family, kv)
        assert max(kv) < 0.5 * results[FULL]["mean_resident_tokens"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_cache_solves_every_family(scores, family: str) -> None:
    assert scores[family][FULL]["pass@1"] >= 0.9


def test_frequent_reuse_discriminates_the_attention_baselines(scores) -> None:
    """Re-read values draw attention, so attention scorers keep some of them: clearly above the floor, clearly below
    the full cache."""
    results = scores["reuse"]
    method, per_save = best_baseline(results, ATTENTION_SCORERS)
    assert per_save > 0.2, (method, per_save)
    assert per_save <= results[FULL]["partial_credit"] - 0.3, (method, per_save)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_predictor_is_at_least_the_best_baseline(scores, family: str) -> None:
    results = scores[family]
    method, per_save = best_baseline(results, BASELINES)
    assert results[PREDICTOR]["partial_credit"] >= per_save - 0.05, (method, per_save, results[PREDICTOR])

"""The bundled tiny reasoner as a testbed: full cache, the attention baselines and dynts at a 25% budget.

One reduced ``dynts demo`` run (12 held-out problems, every method at a budget of 25% of the mean thinking
length) feeds every assertion below.
"""

from __future__ import annotations

import argparse
import json

import pytest
from dynts.evals import demo
from dynts.evals.harness import DYNTS, FULL, ORACLE, attention_methods

PROBLEMS = 12


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("demo")
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--problems", str(PROBLEMS), "--batch-size", str(PROBLEMS), "--out", str(out), "--no-progress", "--device", "cpu"])
    assert demo.run(args) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summaries = {r["method"]: r for r in records if r["type"] == "summary"}
    assert (out / "accuracy_by_method.png").is_file() and (out / "step_profile.png").is_file()
    return summaries


def test_every_method_ran_at_a_quarter_of_the_thinking_length(results: dict[str, dict]) -> None:
    expected = {FULL, ORACLE, DYNTS, *attention_methods()}
    assert set(results) == expected
    budgets = {s["budget"] for s in results.values() if s["method"] != FULL}
    assert len(budgets) == 1 and 200 <= budgets.pop() <= 300  # 25% of ~1,000 thinking tokens
    assert all(s["compactions"] > 0 for s in results.values() if s["method"] != FULL)


def test_full_cache_solves_the_task(results: dict[str, dict]) -> None:
    assert results[FULL]["pass@1"] >= 0.9


def test_window_only_is_clearly_worse(results: dict[str, dict]) -> None:
    assert results["window"]["pass@1"] <= results[FULL]["pass@1"] - 0.3


def test_an_ideal_scorer_keeps_full_cache_accuracy(results: dict[str, dict]) -> None:
    # The oracle keeps exactly the decision-critical tokens: the task is solvable at this budget.
    assert results[ORACLE]["pass@1"] >= 0.95 * results[FULL]["pass@1"]


def test_dynts_keeps_accuracy_and_beats_every_attention_baseline(results: dict[str, dict]) -> None:
    dynts = results[DYNTS]["pass@1"]
    assert dynts >= 0.95 * results[FULL]["pass@1"]
    assert dynts >= max(results[method]["pass@1"] for method in attention_methods())

"""Grading: real answer formats of every dataset, majority voting over equivalent answers, pass@k."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from dynts.evals.datasets import MATH_SOURCES, default_data_dir, gsm8k_final_answer, load_samples
from dynts.evals.grading import get_grader, majority_answer
from dynts.evals.harness import pass_at_k

math_grader = get_grader("math")

# (dataset, reference exactly as stored in the dataset file, a correct model output, a wrong model output)
REAL_FORMATS = [
    ("math500", r"\left( 3, \frac{\pi}{2} \right)", r"So the point is \boxed{(3, \frac{\pi}{2})}.", r"\boxed{(3, \pi)}"),
    ("math500", r"\frac{11}{2}", r"The answer is \boxed{5.5}", r"\boxed{\frac{11}{3}}"),
    ("math500", r"(3,4]", r"\boxed{(3,4]}", r"\boxed{[3,4]}"),
    ("math500", r"(-\infty, 2) \cup (3, \infty)", r"\boxed{(-\infty,2)\cup(3,\infty)}", r"\boxed{(-\infty,2)\cup[3,\infty)}"),
    ("math500", r"x \in [-2,7]", r"\boxed{[-2,7]}", r"\boxed{[-2,7)}"),
    ("math500", r"90^\circ", r"\boxed{90}", r"\boxed{45^\circ}"),
    ("math500", r"5.4 \text{ cents}", r"\boxed{5.4}", r"\boxed{54}"),
    ("math500", r"\$18.90", r"\boxed{\$18.90}", r"\boxed{18.09}"),
    ("math500", r"10,\!080", r"\boxed{10080}", r"\boxed{10008}"),
    ("math500", r"1 \pm \sqrt{19}", r"\boxed{1+\sqrt{19}, 1-\sqrt{19}}", r"\boxed{1+\sqrt{19}}"),
    ("math500", r"\text{(C)}", r"\boxed{C}", r"\boxed{B}"),
    ("math500", r"\text{Evelyn}", r"\boxed{\text{Evelyn}}", r"\boxed{\text{Navin}}"),
    ("math500", r"\frac{270}7\text{ degrees}", r"\boxed{\frac{270}{7}}", r"\boxed{\frac{270}{8}}"),
    ("aime24", "033", r"\boxed{33}", r"\boxed{34}"),
    ("aime25", "70", r"</think> The sum is \boxed{70}.", r"\boxed{7}"),
    ("amc23", "27", r"They meet \boxed{27} miles from A.", r"\boxed{18}"),
    ("gaokao2023en", r"$\{x|-2\leq x < 1\}$", r"\boxed{[-2,1)}", r"\boxed{[-2,1]}"),
    ("gaokao2023en", r"$\frac{\pi}{3}$", r"\boxed{\frac{\pi}{3}}", r"\boxed{\frac{\pi}{6}}"),
    ("gaokao2023en", r"$5$ or $9$", r"\boxed{5, 9}", r"\boxed{5}"),
    ("gaokao2023en", r"$1-i$", r"\boxed{1-i}", r"\boxed{1+i}"),
    ("gaokao2023en", r"$\{x|-2\leq x < 1\}$", r"\boxed{\{x \mid -2 \le x < 1\}}", r"\boxed{\{x|-2<x<1\}}"),
    ("gaokao2023en", r"$145$solution:", r"\boxed{145}", r"\boxed{154}"),
    ("gaokao2023en", "D", r"\boxed{D}", r"\boxed{C}"),
    ("gsm8k", "18", "She makes 9 * 2 = $18 every day.\n#### 18", "#### 16"),
    ("gsm8k", "2125", r"The total is \boxed{2,125}.", r"\boxed{2152}"),
]


@pytest.mark.parametrize("dataset, reference, right, wrong", REAL_FORMATS)
def test_math_grader_on_real_answer_formats(dataset: str, reference: str, right: str, wrong: str) -> None:
    parsed = math_grader.parse_reference(reference)
    assert math_grader.is_correct(math_grader.extract(right), parsed), (dataset, reference, right)
    assert not math_grader.is_correct(math_grader.extract(wrong), parsed), (dataset, reference, wrong)


def test_math_grader_reads_only_the_answer_after_thinking() -> None:
    parsed = math_grader.parse_reference("12")
    assert math_grader.is_correct(math_grader.extract(r"<think>maybe \boxed{11}</think> so \boxed{12}"), parsed)
    assert not math_grader.is_correct(math_grader.extract(r"<think>maybe \boxed{12}</think> so \boxed{11}"), parsed)
    assert math_grader.extract("no answer at all") is None
    assert not math_grader.is_correct(None, parsed)


def test_gsm8k_and_amc23_references_become_plain_answers() -> None:
    solution = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert gsm8k_final_answer(solution) == "18"
    assert gsm8k_final_answer("... so in total\n#### 114,200") == "114200"
    with pytest.raises(ValueError, match="####"):
        gsm8k_final_answer("no final answer")


def test_choice_grader() -> None:
    grader = get_grader("choice")
    assert grader.extract(r"Thinking... </think> The answer is \boxed{C}.") == "C"
    assert grader.extract("Answer: (B)") == "B"
    assert grader.extract(r"\boxed{\text{(D)}}") == "D"
    assert grader.extract("I am not sure.") is None
    assert grader.is_correct("C", grader.parse_reference("C")) and not grader.is_correct("A", "C")
    with pytest.raises(ValueError, match="A-D"):
        grader.parse_reference("E")


def test_synthetic_grader_needs_every_save_in_order() -> None:
    grader = get_grader("synthetic")
    reference = grader.parse_reference("6 1")
    assert grader.is_correct(grader.extract("t1 ... </think> s1 6 s2 1"), reference)
    assert not grader.is_correct(grader.extract("</think> s1 6 s2 2"), reference)
    assert grader.extract("</think> s2 1 s1 6") is None  # out of order: malformed
    assert grader.extract("</think>") is None


def test_synthetic_partial_credit_is_the_share_of_saves_answered_right() -> None:
    grader = get_grader("synthetic")
    reference = grader.parse_reference("6 1 4 0")

    def credit(completion: str) -> float:
        return grader.partial_credit(grader.extract(completion), reference)

    assert credit("</think> s1 6 s2 1 s3 4 s4 0") == 1.0
    assert credit("</think> s1 6 s2 2 s3 4 s4 9") == 0.5  # saves 1 and 3 right
    assert credit("</think> s1 5 s2 1 s3 3 s4 1") == 0.25
    assert credit("</think> s1 6 s2 1") == 0.5  # saves 3 and 4 missing count as wrong
    assert credit("</think> s1 6 s2 1 s3 4 s4 0 s5 7") == 0.8  # an extra save is a wrong one: credit 1 only when correct
    assert credit("</think> s2 1 s1 6") == 0.0  # malformed (not s1 first): no answer
    assert credit("no answer at all") == 0.0
    # The reasoning before </think> is not graded, only the answer after it.
    assert credit("s1 6 s2 1 s3 4 s4 0 </think> s1 0 s2 1 s3 0 s4 0") == 0.5
    # Credit 1 exactly when the exact-match grade is correct.
    for completion in ("</think> s1 6 s2 1 s3 4 s4 0", "</think> s1 6 s2 1 s3 4", "</think> s1 6 s2 1 s3 4 s4 0 s5 0"):
        extracted = grader.extract(completion)
        assert (grader.partial_credit(extracted, reference) == 1.0) == grader.is_correct(extracted, reference)


def test_other_graders_give_all_or_nothing_credit() -> None:
    parsed = math_grader.parse_reference("12")
    assert math_grader.partial_credit(math_grader.extract(r"\boxed{12}"), parsed) == 1.0
    assert math_grader.partial_credit(math_grader.extract(r"\boxed{13}"), parsed) == 0.0
    choice = get_grader("choice")
    assert choice.partial_credit("C", "C") == 1.0 and choice.partial_credit(None, "C") == 0.0


def test_majority_votes_over_equivalent_answers_not_correctness() -> None:
    answers = [math_grader.extract(text) for text in (r"\boxed{0.5}", r"\boxed{\frac{1}{2}}", r"\boxed{3}", "none", r"\boxed{3}", r"\boxed{1/2}")]
    winner = majority_answer(math_grader, answers)
    assert math_grader.is_correct(winner, math_grader.parse_reference(r"\frac12"))
    assert majority_answer(math_grader, [None, None]) is None
    # A tie goes to the answer seen first.
    synthetic = get_grader("synthetic")
    assert majority_answer(synthetic, ["1 2", "3 4", "3 4", "1 2"]) == "1 2"


def test_pass_at_k_unbiased_estimator() -> None:
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    assert pass_at_k(10, 3, 10) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


DATA_DIR = default_data_dir()
needs_files = pytest.mark.skipif(
    DATA_DIR is None, reason="needs the benchmark JSONL files (math500.jsonl, aime24.jsonl, ...): set DYNTS_DATA_DIR to a folder holding them"
)

# References whose own boxed form the grader cannot read back as equal (listed, so a new failure is a real
# one): units written in math mode, which math-verify reads as a product of variables (20*c*m**2).
KNOWN_UNREADABLE = {"20 $cm^{2}$"}
# References with text after the math, whose boxed answer (145) is a REAL_FORMATS case above.
NOT_BOXABLE = {"$145$solution:"}


@needs_files
@pytest.mark.parametrize("dataset", sorted(MATH_SOURCES))
def test_every_reference_in_the_local_files_grades_its_own_boxed_form(dataset: str) -> None:
    if dataset == "gaokao2023en":
        with pytest.warns(UserWarning, match=r"skipped 2 record\(s\) without a reference answer: \[167, 192\]"):
            samples = load_samples(dataset, data_dir=DATA_DIR)
    else:
        samples = load_samples(dataset, data_dir=DATA_DIR)
    assert len(samples) == {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "gaokao2023en": 383, "gsm8k": 1319}[dataset]
    failures = []
    for sample in samples:
        if sample.reference in KNOWN_UNREADABLE | NOT_BOXABLE:
            continue
        parsed = math_grader.parse_reference(sample.reference)
        answer = sample.reference.strip().strip("$")
        if not math_grader.is_correct(math_grader.extract(f"so the answer is \\boxed{{{answer}}}"), parsed):
            failures.append(sample.reference)
    assert not failures, f"{len(failures)} references do not grade their own boxed form: {failures[:10]}"


@needs_files
def test_local_files_load_with_their_question_and_answer_fields() -> None:
    aime = load_samples("aime24", data_dir=DATA_DIR, limit=3)
    assert [s.grader for s in aime] == ["math"] * 3 and all(s.question and s.reference for s in aime)
    amc = load_samples("amc23", data_dir=DATA_DIR)
    assert all("." not in s.reference for s in amc)  # 27.0 -> 27
    gsm = load_samples("gsm8k", data_dir=DATA_DIR, limit=5)
    assert all(s.reference.lstrip("-").isdigit() for s in gsm)
    first = json.loads(Path(DATA_DIR, "math500.jsonl").read_text().splitlines()[0])
    assert load_samples("math500", data_dir=DATA_DIR, limit=1)[0].question == first["problem"]

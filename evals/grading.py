"""Answer extraction and grading: math-verify for math datasets, exact match for the synthetic task, letters for
multiple choice.

Every grader answers four questions about a completion: which answer it gives (``extract``; None when it
gives none), whether that answer equals the reference (``is_correct``), how much of it is right
(``partial_credit``, in [0, 1]: per saved value on the synthetic task, all or nothing elsewhere), and whether
two extracted answers are the same (``same_answer``, used by majority voting, so ``maj@k`` votes over answers,
not over correctness).
Only the text after the last ``</think>`` is graded when a completion has one (a reasoning model's answer).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

THINK_END = "</think>"


def answer_segment(completion: str) -> str:
    """The part of a completion that holds its answer: after the last ``</think>``, else all of it."""
    return completion.rsplit(THINK_END, 1)[-1] if THINK_END in completion else completion


class Grader(Protocol):
    name: str

    def parse_reference(self, reference: str) -> Any: ...

    def extract(self, completion: str) -> Any | None: ...

    def is_correct(self, extracted: Any | None, reference: Any) -> bool: ...

    def partial_credit(self, extracted: Any | None, reference: Any) -> float: ...

    def same_answer(self, first: Any, second: Any) -> bool: ...

    def display(self, extracted: Any | None) -> str | None: ...


# Set-builder notation such as ``\{x|-2\leq x < 1\}``: math-verify reads it as the number 1, so the grader
# rewrites it to its condition (``-2\leq x < 1``), which math-verify matches against intervals.
_SET_BUILDER = re.compile(r"\\\{\s*[a-zA-Z]\s*(?:\||\\mid)\s*(?P<condition>.+?)\s*\\\}")


_MATH_DELIMITER = re.compile(r"(?<!\\)\$")  # a $ that is not an escaped dollar sign (\$18.90)


def _rewrite_set_builder(text: str) -> str:
    return _SET_BUILDER.sub(lambda match: match.group("condition"), text)


class MathGrader:
    """math-verify: extracts the last ``\\boxed{}`` (else the last expression) and compares symbolically
    (fractions vs decimals, intervals, sets, ``\\pm``, degrees, units and ``\\text{}`` wrappers, thousands separators)."""

    name = "math"

    def __init__(self) -> None:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig

        self._extraction = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def parse_reference(self, reference: str) -> list[Any]:
        from math_verify import parse

        text = _rewrite_set_builder(reference.strip())
        delimiters = len(_MATH_DELIMITER.findall(text))
        if delimiters == 2 and text.startswith("$") and text.endswith("$"):
            text, delimiters = text[1:-1].strip(), 0
        # Math already delimited inside other text (gaokao's "$145$solution:"): let math-verify find it.
        parsed = parse(text if delimiters else f"${text}$", extraction_config=self._extraction)
        if not parsed:
            raise ValueError(f"reference answer {reference!r} could not be parsed by math-verify")
        return parsed

    def extract(self, completion: str) -> list[Any] | None:
        from math_verify import parse

        parsed = parse(_rewrite_set_builder(answer_segment(completion)), extraction_config=self._extraction)
        return parsed or None

    def is_correct(self, extracted: list[Any] | None, reference: list[Any]) -> bool:
        from math_verify import verify

        return extracted is not None and bool(verify(reference, extracted))

    def partial_credit(self, extracted: list[Any] | None, reference: list[Any]) -> float:
        return float(self.is_correct(extracted, reference))

    def same_answer(self, first: list[Any], second: list[Any]) -> bool:
        from math_verify import verify

        return bool(verify(first, second))

    def display(self, extracted: list[Any] | None) -> str | None:
        return None if extracted is None else str(extracted[-1])


class _ExactMatch:
    """Answers that are equal only when their strings are."""

    def is_correct(self, extracted: str | None, reference: str) -> bool:
        return extracted is not None and extracted == reference

    def partial_credit(self, extracted: str | None, reference: str) -> float:
        return float(self.is_correct(extracted, reference))

    def same_answer(self, first: str, second: str) -> bool:
        return first == second

    def display(self, extracted: str | None) -> str | None:
        return extracted


class SyntheticGrader(_ExactMatch):
    """The synthetic task: the saved digits listed after ``</think>``, compared exactly; partial credit is the
    share of saved values answered right."""

    name = "synthetic"

    def parse_reference(self, reference: str) -> str:
        return " ".join(reference.split())

    def extract(self, completion: str) -> str | None:
        from .synthetic_task import extract_answer

        return extract_answer(completion)

    def partial_credit(self, extracted: str | None, reference: str) -> float:
        """Share of the saves whose value the answer gives right (save ``k`` is the ``k``-th listed value). Values
        listed beyond the reference's count as wrong saves, so the credit is 1 exactly when the answer is
        correct; an answer without the ``s1 v1 s2 v2 ...`` form (None) gets 0."""
        if extracted is None:
            return 0.0
        given, expected = extracted.split(), reference.split()
        right = sum(value == wanted for value, wanted in zip(given, expected))
        return right / max(len(given), len(expected))


_CHOICE_PATTERNS = (
    re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-D])\)?\s*\}?\s*\}"),
    re.compile(r"(?i)answer\s*(?:is|:)?\s*:?\s*\(?\$?\\?(?:text\{)?([A-D])\b"),
)


class ChoiceGrader(_ExactMatch):
    """Multiple choice (GPQA): the letter in the last ``\\boxed{X}``, else the last "answer is X" / "Answer: X"."""

    name = "choice"

    def parse_reference(self, reference: str) -> str:
        letter = reference.strip().strip("()").upper()
        if letter not in ("A", "B", "C", "D"):
            raise ValueError(f"multiple-choice reference must be one of A-D, got {reference!r}")
        return letter

    def extract(self, completion: str) -> str | None:
        segment = answer_segment(completion)
        for pattern in _CHOICE_PATTERNS:
            found = pattern.findall(segment)
            if found:
                return found[-1].upper()
        return None


_GRADERS: dict[str, type] = {"math": MathGrader, "synthetic": SyntheticGrader, "choice": ChoiceGrader}


def get_grader(name: str) -> Grader:
    if name not in _GRADERS:
        raise ValueError(f"grader must be one of {sorted(_GRADERS)}, got {name!r}")
    return _GRADERS[name]()


def majority_answer(grader: Grader, answers: list[Any | None]) -> Any | None:
    """The most frequent extracted answer (answers grouped by ``same_answer``; ties: the first seen; None if none)."""
    groups: list[tuple[Any, int]] = []
    for answer in answers:
        if answer is None:
            continue
        for index, (representative, count) in enumerate(groups):
            if grader.same_answer(representative, answer):
                groups[index] = (representative, count + 1)
                break
        else:
            groups.append((answer, 1))
    if not groups:
        return None
    return max(groups, key=lambda group: group[1])[0]

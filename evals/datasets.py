"""Evaluation datasets: the synthetic task, math benchmarks (local JSONL files or the HF hub), GPQA-Diamond.

``load_samples(name, data_dir=..., limit=...)`` returns ``Sample``s (id, question, reference answer, grader
name). Math sets are read from ``<data_dir>/<name>.jsonl`` when that file exists (one JSON object per line, as
in the project's shared dataset folder), otherwise through ``datasets.load_dataset`` from the hub; GPQA-Diamond
only through the hub (its authors ask that it not be redistributed in plain text).
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "DYNTS_DATA_DIR"


@dataclass
class Sample:
    id: str
    question: str
    reference: str
    grader: str  # a name for grading.get_grader
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MathSource:
    """Where a math benchmark lives and which fields hold the question and the answer."""

    file: str
    hub_path: str
    hub_config: str | None
    hub_split: str
    question_fields: tuple[str, ...]
    answer_field: str
    id_field: str | None = None


def _plain(value: Any) -> str:
    """An answer field as text: floats that are integers lose their ``.0`` (amc23 stores ``27.0``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def gsm8k_final_answer(solution: str) -> str:
    """The number after ``####`` in a GSM8K worked solution, thousands separators removed."""
    if "####" not in solution:
        raise ValueError(f"GSM8K answer has no '####' final answer: {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


MATH_SOURCES: dict[str, MathSource] = {
    "math500": MathSource("math500.jsonl", "HuggingFaceH4/MATH-500", None, "test", ("problem",), "answer", "unique_id"),
    "aime24": MathSource("aime24.jsonl", "HuggingFaceH4/aime_2024", None, "train", ("problem", "question"), "answer", "id"),
    "aime25": MathSource("aime25.jsonl", "math-ai/aime25", None, "test", ("problem", "question"), "answer", "id"),
    "amc23": MathSource("amc23.jsonl", "math-ai/amc23", None, "test", ("problem", "question"), "answer", "id"),
    "gaokao2023en": MathSource(
        "gaokao2023en.jsonl", "MARIO-Math-Reasoning/Gaokao2023-Math-En", None, "train", ("question",), "answer"
    ),
    "gsm8k": MathSource("gsm8k.jsonl", "openai/gsm8k", "main", "test", ("question",), "answer", "idx"),
}
_ANSWER_TRANSFORMS: dict[str, Callable[[str], str]] = {"gsm8k": gsm8k_final_answer}

GPQA_HUB = ("Idavidrein/gpqa", "gpqa_diamond", "train")
DATASETS: tuple[str, ...] = ("synthetic", *MATH_SOURCES, "gpqa_d")


def default_data_dir() -> Path | None:
    """``$DYNTS_DATA_DIR``, else the ``shared/datasets`` folder beside the source checkout, if it exists."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    beside_checkout = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
    return beside_checkout if beside_checkout.is_dir() else None


def load_samples(
    name: str,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    synthetic: Any = None,
    seed: int = 0,
) -> list[Sample]:
    """The first ``limit`` samples of dataset ``name`` (all of them if None).

    data_dir:  folder of ``<name>.jsonl`` files, which must hold the file; default: ``default_data_dir()``,
               where a missing file falls back to the HF hub through ``datasets``.
    synthetic: a ``TaskConfig`` for ``synthetic`` (default: the task's default), drawn from the evaluation
               seed of the task; ``limit`` is then the number of problems (default 100).
    seed:      shuffles the choices of ``gpqa_d`` (the correct one's letter).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if name == "synthetic":
        return _synthetic_samples(limit or 100, synthetic)
    if name == "gpqa_d":
        return _gpqa_samples(limit, seed)
    source = MATH_SOURCES[name]
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir is not None and not (folder / source.file).is_file():
        # A folder named explicitly must hold the file: falling back to the hub would hide a typo.
        raise ValueError(f"dataset {name!r}: {folder} has no {source.file}")
    if folder is not None and (folder / source.file).is_file():
        records = read_jsonl(folder / source.file)
        origin = str(folder / source.file)
    else:
        records = _hub_records(name, source.hub_path, source.hub_config, source.hub_split, folder, source.file)
        origin = f"hf://{source.hub_path}"
    samples = []
    without_answer = []
    for index, record in enumerate(records):
        question = next((record[key] for key in source.question_fields if record.get(key)), None)
        if question is None:
            raise ValueError(f"{origin} record {index + 1} has none of the question fields {source.question_fields}")
        if source.answer_field not in record:
            raise ValueError(f"{origin} record {index + 1} has no answer field {source.answer_field!r}")
        reference = _plain(record[source.answer_field])
        if not reference:
            without_answer.append(index)
            continue
        reference = _ANSWER_TRANSFORMS.get(name, lambda text: text)(reference)
        sample_id = str(record.get(source.id_field, index)) if source.id_field else str(index)
        samples.append(Sample(id=f"{name}/{sample_id}", question=question, reference=reference, grader="math"))
        if limit and len(samples) == limit:
            break
    if without_answer:
        # gaokao2023en has two records with an empty answer: nothing to grade them against.
        warnings.warn(f"{origin}: skipped {len(without_answer)} record(s) without a reference answer: {without_answer}", stacklevel=2)
    return samples


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-empty line. A line that is not a JSON object raises
    ValueError naming the file and the line (``path:line: ...``)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def _hub_records(name: str, path: str, config: str | None, split: str, folder: Path | None, file: str) -> list[dict]:
    try:
        import datasets
    except ImportError as error:
        raise RuntimeError(
            f"dataset {name!r}: no local file {file} (data_dir={folder}) and the `datasets` package is not "
            "installed (pip install 'dynts[eval]')"
        ) from error
    try:
        return list(datasets.load_dataset(path, config, split=split))
    except Exception as error:  # network, authentication or hub errors: say what was tried
        raise RuntimeError(
            f"dataset {name!r}: no local file {file} in data_dir={folder} (set --data-dir or ${DATA_DIR_ENV}) and "
            f"the hub copy {path!r} could not be loaded: {type(error).__name__}: {error}"
        ) from error


def _synthetic_samples(count: int, config: Any) -> list[Sample]:
    from .synthetic_task import EVAL_SEED, TaskConfig, generate_problems

    config = config or TaskConfig()
    return [
        Sample(
            id=f"synthetic/{index}",
            question=problem.prompt,
            reference=problem.answer,
            grader="synthetic",
            meta={"trace_length": problem.trace_length, "completion_tokens": len(problem.completion.split()), **problem.meta},
        )
        for index, problem in enumerate(generate_problems(count, EVAL_SEED, config))
    ]


GPQA_TEMPLATE = (
    "Answer the following multiple choice question. Think step by step, then give the letter of the correct "
    "choice as \\boxed{{X}}.\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
)


def _gpqa_samples(limit: int | None, seed: int) -> list[Sample]:
    path, config, split = GPQA_HUB
    try:
        import datasets

        records = list(datasets.load_dataset(path, config, split=split))
    except Exception as error:
        raise RuntimeError(
            f"dataset 'gpqa_d' is loaded only from the HF hub ({path}, config {config}; gated: accept its terms "
            f"and log in with `hf auth login`), and that failed: {type(error).__name__}: {error}"
        ) from error
    samples = []
    for index, record in enumerate(records[:limit] if limit else records):
        choices = [record["Correct Answer"]] + [record[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
        order = list(range(4))
        random.Random(f"{seed}-{index}").shuffle(order)
        letters = "ABCD"
        shown = {letters[slot]: choices[choice].strip() for slot, choice in enumerate(order)}
        correct = letters[order.index(0)]
        question = GPQA_TEMPLATE.format(question=record["Question"].strip(), **shown)
        samples.append(Sample(id=f"gpqa_d/{index}", question=question, reference=correct, grader="choice"))
    return samples

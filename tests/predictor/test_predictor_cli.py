"""The command line end to end on a tiny model saved to disk: label -> train-predictor -> generate --predictor,
the distribution-shift script, and trace generation with a grader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dynts.cli import main, run_module
from dynts.evals.grading import get_grader
from dynts.evals.synthetic_task import TaskConfig, generate_problems
from dynts.predictor import ImportancePredictor
from dynts.training.predictor.dataset import LabelSet
from dynts.training.predictor.labels import label_sequence
from dynts.training.predictor.traces import generate_traces, read_traces


def _write_reference_traces(path: Path, count: int) -> None:
    with open(path, "w") as handle:
        for problem in generate_problems(count, 5, TaskConfig(steps=(4, 6), saves=2, noise=2)):
            handle.write(json.dumps({"prompt": problem.prompt, "completion": problem.completion, "reference": problem.answer}) + "\n")


def _last_json(text: str) -> dict:
    start = text.rindex("\n{") + 1 if "\n{" in text else text.index("{")
    return json.loads(text[start:])


def test_label_train_generate(saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_reference_traces(tmp_path / "traces.jsonl", 8)
    assert main(["label", "--model", str(saved_model), "--traces", str(tmp_path / "traces.jsonl"),
                 "--out", str(tmp_path / "labels"), "--query-chunk", "16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["labelled"] == 8 and summary["no_think_end"] == 0
    labels = LabelSet(tmp_path / "labels")
    assert labels.settings["mode"] == "answer" and labels.hidden_size == 32
    # The stored rows are the thinking tokens of each trace, with the hidden states and labels of a direct call.
    model = AutoModelForCausalLM.from_pretrained(saved_model, attn_implementation="sdpa").eval()
    trace = read_traces(tmp_path / "labels" / "traces.jsonl")[0]
    shard = labels.shard(0)
    rows = shard["trace"] == trace.index
    sequence = trace.prompt_ids + trace.completion_ids
    marker = sequence.index(5)  # </think>
    assert shard["position"][rows].tolist() == list(range(len(trace.prompt_ids), marker))
    direct = label_sequence(model, sequence, mode="answer", answer_start=marker + 1)
    torch.testing.assert_close(shard["attention"][rows], direct.attention[len(trace.prompt_ids) : marker])
    torch.testing.assert_close(shard["hidden"][rows], direct.hidden[len(trace.prompt_ids) : marker])

    assert main(["train-predictor", "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "head"),
                 "--epochs", "2", "--batch-size", "64", "--val-fraction", "0.25", "--device", "cpu"]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["val_traces"] == 2 and result["train_traces"] == 6
    report = json.loads((tmp_path / "head" / "report.json").read_text())
    assert len(report["history"]) == 2
    ImportancePredictor.load(tmp_path / "head", model=model)  # the head knows its base model

    assert main(["generate", "--model", str(saved_model), "--predictor", str(tmp_path / "head"), "--device", "cpu",
                 "--prompt", "a 3 + b 7 - c 1 + n2 s1 t3 s2 t5 <think>", "--max-new-tokens", "40",
                 "--budget", "40", "--window", "4", "--keep-ratio", "0.5"]) == 0
    stats = _last_json(capsys.readouterr().out)
    assert stats["compactions"] >= 1 and stats["scoring_seconds"] > 0


def test_label_future_mode_and_argument_errors(saved_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_reference_traces(tmp_path / "traces.jsonl", 2)
    common = ["label", "--model", str(saved_model), "--traces", str(tmp_path / "traces.jsonl")]
    assert main([*common, "--out", str(tmp_path / "a"), "--mode", "future"]) == 2
    assert "--mode future needs --horizon" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "a"), "--horizon", "4"]) == 2
    assert "--horizon is only used with --mode future" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "future"), "--mode", "future", "--horizon", "8"]) == 0
    assert LabelSet(tmp_path / "future").settings == {"mode": "future", "horizon": 8, "think_end": [5], "query_chunk": 128}


def test_label_generates_and_grades_traces_from_a_question_file(saved_model: Path, tmp_path: Path) -> None:
    problems = generate_problems(3, 9, TaskConfig(steps=(4, 6), saves=2, noise=1))
    with open(tmp_path / "questions.jsonl", "w") as handle:
        for problem in problems:
            handle.write(json.dumps({"problem": problem.prompt, "answer": problem.answer}) + "\n")
    common = ["label", "--model", str(saved_model), "--data", str(tmp_path / "questions.jsonl"), "--grader", "synthetic",
              "--greedy", "--max-new-tokens", "12", "--mode", "future", "--horizon", "4"]
    # The random model answers nothing correctly: every trace is dropped, nothing is labelled (exit status 1).
    assert main([*common, "--out", str(tmp_path / "graded")]) == 1
    assert main([*common, "--out", str(tmp_path / "all"), "--keep-incorrect"]) == 0
    traces = read_traces(tmp_path / "all" / "traces.jsonl")
    assert [trace.correct for trace in traces] == [False] * 3 and [len(t.completion_ids) for t in traces] == [12] * 3
    assert LabelSet(tmp_path / "all").meta["traces"] == 3


def test_shift_script_measures_nothing_without_eviction_and_a_shift_with_it(saved_model: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(saved_model)
    from dynts.predictor import ModelIdentity

    torch.manual_seed(0)
    ImportancePredictor.for_model(model).save(tmp_path / "head", ModelIdentity.of(model))
    common = ["--model", str(saved_model), "--predictor", str(tmp_path / "head"), "--synthetic", "3", "--device", "cpu",
              "--mode", "future", "--horizon", "8", "--max-new-tokens", "48", "--window", "4", "--batch-size", "2"]
    shift = "dynts.training.predictor.shift"
    assert run_module(shift, [*common, "--budget", "400", "--out", str(tmp_path / "none.json")]) == 0
    assert run_module(shift, [*common, "--budget", "44", "--keep-ratio", "0.6", "--out", str(tmp_path / "evict.json")]) == 0
    none = json.loads((tmp_path / "none.json").read_text())["summary"]
    evict = json.loads((tmp_path / "evict.json").read_text())["summary"]
    assert none["traces"] == evict["traces"] == 3 and none["evicted_traces"] == 0 and evict["evicted_traces"] == 3
    # Without eviction the decode-time hidden states are the full-cache ones (up to float noise).
    assert none["hidden_cosine"] > 0.9999 and none["recall_with_eviction"] == none["recall_full_cache"]
    assert none["predicted_top_overlap"] == 1.0
    assert evict["hidden_cosine_after_first_eviction"] < 0.999
    assert 0.0 <= evict["recall_with_eviction"] <= 1.0


class AcceptAll:
    """A grader that accepts every answer (to see graded traces kept)."""

    def parse_reference(self, reference: str) -> str:
        return reference

    def extract(self, completion: str) -> str:
        return completion

    def is_correct(self, extracted: str, reference: str) -> bool:
        return True


def test_generate_traces_keeps_only_correct_ones_when_graded(saved_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(saved_model, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_model)
    problems = generate_problems(3, 7, TaskConfig(steps=(4, 6), saves=2, noise=1))
    questions, references = [p.prompt for p in problems], [p.answer for p in problems]
    common = dict(samples=2, batch_size=4, max_new_tokens=10, sampling={"do_sample": False})
    # A random model never answers correctly: the synthetic grader drops every trace, unless asked to keep them.
    assert generate_traces(model, tokenizer, questions, references, grader=get_grader("synthetic"), **common) == []
    kept = generate_traces(model, tokenizer, questions, references, grader=get_grader("synthetic"), keep_incorrect=True, **common)
    assert len(kept) == 6 and all(trace.correct is False for trace in kept)
    accepted = generate_traces(model, tokenizer, questions, references, grader=AcceptAll(), **common)
    assert [trace.question_index for trace in accepted] == [0, 0, 1, 1, 2, 2]
    assert all(trace.correct and len(trace.completion_ids) <= 10 for trace in accepted)
    # Prompts are the tokenizer's ids (with <bos>); completions are what the model generated, greedy = identical.
    assert accepted[0].prompt_ids == tokenizer(questions[0])["input_ids"]
    assert accepted[0].completion_ids == accepted[1].completion_ids
    with pytest.raises(ValueError, match="a grader needs a reference answer for every question"):
        generate_traces(model, tokenizer, questions, None, grader=AcceptAll(), **common)

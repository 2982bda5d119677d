"""``dynts eval`` end to end on a tiny random model (answers wrong, pipeline right) and its metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dynts.evals.datasets import default_data_dir
from dynts.evals.grading import get_grader
from dynts.evals.harness import (
    FULL, ORACLE, PREDICTOR, CompactionLog, Sampling, Setting, attention_methods, evaluate, generate_batch, summarize,
)

from dynts.cli import main as cli_main

# The shared benchmark files when present; otherwise the first records of math500 and aime24, copied as fixtures.
DATA_DIR = default_data_dir() or Path(__file__).parent / "data"


def tiny_byte_model(directory: Path) -> Path:
    """A random 2-layer Llama with a byte-level tokenizer and a chat template that opens <think>, saved to disk."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<think>", "</think>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials[:3])
    backend.add_tokens(specials[3:])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = "{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}assistant: <think>"
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny_byte_model(tmp_path_factory.mktemp("tiny-byte-llama"))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("dataset", ["math500", "aime24"])
def test_eval_runs_end_to_end_on_real_benchmarks_with_a_random_model(dataset: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    code = cli_main([
        "eval", "--model", str(tiny_model_dir), "--dataset", dataset, "--data-dir", str(DATA_DIR), "--limit", "2",
        "--methods", "full,h2o,window", "--budget", "40", "--window", "8", "--max-new-tokens", "24",
        "--batch-size", "2", "--out", str(out), "--no-progress", "--device", "cpu",
    ])
    assert code == 0
    records = read(out / "results.jsonl")
    samples = [r for r in records if r["type"] == "sample"]
    summaries = {r["method"]: r for r in records if r["type"] == "summary"}
    batches = [r for r in records if r["type"] == "batch"]
    assert set(summaries) == {"full", "h2o", "window"}
    assert len(samples) == 3 * 2 and len(batches) == 3
    assert all(not s["correct"] for s in samples), "a random model should not solve competition math"
    assert all(s["reference"] and s["id"].startswith(dataset) for s in samples)
    for summary in summaries.values():
        assert summary["pass@1"] == 0.0 and summary["maj@1"] == 0.0 and summary["problems"] == 2
        assert summary["tokens_per_second"] > 0 and summary["kv_bytes_source"] == "cache_accounting"
    for batch in batches:
        assert len(batch["step_seconds"]) == batch["steps"] == len(batch["step_kv_bytes"]) > 0
    full, window = summaries["full"], summaries["window"]
    assert window["compactions"] > 0 and window["peak_kv_bytes"] < full["peak_kv_bytes"]
    for sample in samples:
        assert sample["partial_credit"] == 0.0 and sample["prompt_tokens"] > 0
        if sample["method"] == "full":  # the full cache holds the prompt, then one more token per pass
            assert sample["mean_resident_tokens"] == sample["prompt_tokens"] + (sample["new_tokens"] - 1) / 2
            assert sample["peak_resident_tokens"] == sample["prompt_tokens"] + sample["new_tokens"] - 1
    assert window["mean_resident_tokens"] < full["mean_resident_tokens"]
    assert "critical_token_recall" not in full and window["critical_token_recall"] is None  # math500 knows none
    for name in ("accuracy_vs_resident_kv.png", "step_profile.png", "tables.md"):
        assert (out / name).stat().st_size > 0


def test_sampling_reports_pass_at_k_and_majority(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dynts.evals.datasets import Sample
    from dynts.evals.harness import load_model

    model, tokenizer = load_model(str(tiny_model_dir), "cpu", None)
    samples = [Sample(id="toy/0", question="What is 1+1?", reference="2", grader="math"),
               Sample(id="toy/1", question="What is 2+2?", reference="4", grader="math")]
    sampling = Sampling(max_new_tokens=8, do_sample=True, samples=4, batch_size=8, seed=3)
    with open(tmp_path / "r.jsonl", "w") as handle:
        summaries = evaluate(model, tokenizer, samples, [Setting(FULL), Setting("tova", 24, 4, 0.5)], sampling,
                             dataset="toy", out_file=handle, chat_template=True, progress=False)
    assert [s["method"] for s in summaries] == ["full", "tova"]
    for summary in summaries:
        assert set(summary["pass@k"]) == {"1", "2", "4"} and "maj@4" in summary and summary["samples"] == 4
    rows = [r for r in read(tmp_path / "r.jsonl") if r["type"] == "sample"]
    assert sorted({r["sample_index"] for r in rows}) == [0, 1, 2, 3]
    assert rows[0]["completion"] != rows[1]["completion"] or rows[0]["completion"] != rows[2]["completion"]


def test_summary_metrics_from_known_outcomes() -> None:
    grader = get_grader("synthetic")
    rows = []
    for problem, outcomes in {"p0": ["1 2", "1 2", "2 2", None], "p1": ["3 5", "4 5", "4 5", "4 5"]}.items():
        reference = {"p0": "1 2", "p1": "3 5"}[problem]
        for index, answer in enumerate(outcomes):
            rows.append({"id": problem, "correct": answer == reference, "_extracted": answer, "_reference": reference,
                         "partial_credit": grader.partial_credit(answer, reference), "new_tokens": 10, "finished": True,
                         "mean_resident_tokens": 40.0 + index, "peak_resident_tokens": 50 + index,
                         "token_recalls": [1.0, 0.5] if problem == "p0" else [], "value_recalls": [1.0, 1.0]})
    batches = [{"seconds": 2.0, "new_tokens": 80, "ms_per_step": 5.0, "peak_kv_bytes": 100, "kv_bytes_source": "cache_accounting"}]
    summary = summarize(Setting(FULL), rows, batches, grader, samples_per_problem=4)
    assert summary["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert summary["pass@k"]["4"] == 1.0
    assert summary["maj@4"] == 0.5  # p0 votes "1 2" (right), p1 votes "4 5" (wrong)
    assert summary["tokens_per_second"] == 40.0
    # Per save: p0 1, 1, 1/2, 0; p1 1, 1/2, 1/2, 1/2.
    assert summary["partial_credit"] == pytest.approx((1 + 1 + 0.5 + 0 + 1 + 0.5 + 0.5 + 0.5) / 8)
    assert summary["mean_resident_tokens"] == 41.5 and summary["peak_resident_tokens"] == 53
    assert "critical_token_recall" not in summary  # the full cache never compacts
    compressed = summarize(Setting("h2o", 40, 8, 0.3, "dynts"), rows, batches, grader, samples_per_problem=4)
    # Pooled over every compaction with a candidate: 4 rows x [1.0, 0.5] of p0; p1's rows had none.
    assert compressed["critical_token_recall"] == 0.75 and compressed["recall_compactions"] == 8
    assert compressed["critical_value_recall"] == 1.0 and compressed["budget_mode"] == "dynts"


def test_sampling_settings_are_checked() -> None:
    # The command line's errors (one line, exit status 2, before any model) are tested in tests/test_cli.py.
    with pytest.raises(ValueError, match="samples > 1 needs do_sample"):
        Sampling(max_new_tokens=4, samples=2)
    assert PREDICTOR not in attention_methods() and "external" not in attention_methods()


# ------------------------------------------------------------------------- the bundled reasoner, short problems

SHORT = ["--synthetic-family", "reuse", "--synthetic-steps", "8-10", "--synthetic-saves", "3", "--limit", "4"]


@pytest.fixture(scope="module")
def bundled():
    from dynts.cli import load_model
    from dynts.evals.synthetic_task import bundled_reasoner_path

    return load_model(bundled_reasoner_path(), "cpu")


def test_recall_is_measured_at_each_compaction_against_what_the_scorer_chose(bundled) -> None:
    """The oracle keeps every copy of every saved value it can (recall 1); a scorer ranking exactly those tokens
    last keeps none of them (recall 0): the recall reads the positions the compactions chose from and kept."""
    from dynts import resolve_think_end
    from dynts.evals.datasets import load_samples
    from dynts.evals.harness import critical_copies_finder, scorer_factory
    from dynts.evals.synthetic_task import TaskConfig, oracle_scorer
    from dynts.scorers import ExternalScorer

    model, tokenizer = bundled
    samples = load_samples("synthetic", limit=4, synthetic=TaskConfig(family="reuse", steps=(8, 10), saves=3))
    # Budget 120, window 32, keep ratio 0.5: 44 older tokens stay, the ~20-token prompt first, then ~24 scored ones,
    # fewer than the non-critical candidates and more than the critical ones.
    setting = Setting("custom", 120, 32, 0.5, "dynts")
    sampling = Sampling(max_new_tokens=400, batch_size=4)

    def anti_oracle() -> ExternalScorer:
        oracle = oracle_scorer()
        return ExternalScorer(lambda hidden, ids: -oracle.score_fn(hidden, ids))

    outcomes = {}
    for name, new_scorer in (("oracle", scorer_factory(ORACLE, tokenizer, None, True)), ("anti", anti_oracle)):
        outcomes[name] = generate_batch(model, tokenizer, [s.question for s in samples], True, setting, sampling,
                                        resolve_think_end(tokenizer), new_scorer, 0, critical_copies_finder("synthetic"))
    for row in outcomes["oracle"].rows:
        assert row["token_recalls"] and set(row["token_recalls"]) == {1.0} and set(row["value_recalls"]) == {1.0}
    for row in outcomes["anti"].rows:
        assert row["token_recalls"] and set(row["token_recalls"]) == {0.0} and set(row["value_recalls"]) == {0.0}


def test_the_compaction_log_checks_its_rebuilt_positions_against_the_cache() -> None:
    class Cache:
        class compressor:
            logical_len = 6

    log = CompactionLog(Cache(), torch.tensor([[0, 1, 1, 1]]))  # one padding column, then 3 prompt tokens
    log([0], [torch.arange(1, 6)], [torch.tensor([1, 2, 5])])  # held before: columns 1-3 and the generated 4, 5
    assert log.events == [(0, [1, 2, 3, 4, 5], [1, 2, 5])]
    Cache.compressor.logical_len = 9
    with pytest.raises(RuntimeError, match="held 3 positions before a compaction, the log rebuilt 6 .a different"):
        log([0], [torch.tensor([1, 2, 5])], [torch.tensor([1])])
    with pytest.raises(RuntimeError, match="held 6 positions before a compaction, the log rebuilt 6 .others"):
        log([0], [torch.tensor([1, 2, 5, 6, 7, 9])], [torch.tensor([1])])


def test_resident_fraction_runs_every_mode_at_the_same_mean_kv(tmp_path: Path) -> None:
    """--resident-fraction picks, per budget mode, the budget that holds the wanted share of the thinking length on
    average; the caches' own lengths confirm it."""
    out = tmp_path / "eval"
    code = cli_main(["eval", *SHORT, "--resident-fraction", "0.3", "--budget-mode", "dynts,fixed", "--buffer", "16",
                     "--window", "32", "--methods", "full,window,oracle", "--batch-size", "4", "--out", str(out),
                     "--no-progress", "--device", "cpu", "--no-plots"])
    assert code == 0
    records = read(out / "results.jsonl")
    run = next(r for r in records if r["type"] == "run")
    assert run["task"]["family"] == "reuse" and run["budget_modes"] == ["dynts", "fixed"] and run["buffer"] == 16
    summaries = [r for r in records if r["type"] == "summary"]
    full = next(s for s in summaries if s["method"] == FULL)
    assert full["partial_credit"] >= 0.9  # short problems: the reasoner solves them
    compressed = [s for s in summaries if s["method"] != FULL]
    assert {(s["budget_mode"], s["method"]) for s in compressed} == {(m, x) for m in ("dynts", "fixed") for x in ("window", "oracle")}
    budgets = {s["budget_mode"]: s["budget"] for s in compressed}
    assert budgets["fixed"] < budgets["dynts"]  # fixed mode holds budget..budget + 16; dynts mode drops to ~half
    for s in compressed:
        assert s["resident_fraction"] == 0.3
        assert s["mean_resident_tokens"] / run["trace_tokens"] == pytest.approx(0.3, rel=0.1), s["label"] if "label" in s else s
        assert s["compactions"] > 0
    oracle = [s for s in compressed if s["method"] == ORACLE]
    assert all(s["critical_value_recall"] == 1.0 for s in oracle)
    tables = (out / "tables.md").read_text()
    assert "| 30% | dynts, " in tables and "| 30% | fixed, " in tables and "oracle" in tables


def test_a_sweep_split_over_runs_merges_into_the_one_run_results(tmp_path: Path, capsys) -> None:
    """Each setting runs on its own, so a sweep split by --methods and --budget-mode and merged by
    ``python -m dynts.evals.plots`` gives the one-run results; mismatched or overlapping parts are refused by name."""
    from dynts.cli import run_module

    def sweep(name: str, *options: str) -> Path:
        out = tmp_path / name
        assert cli_main(["eval", *SHORT, "--resident-fraction", "0.3", "--window", "32", "--batch-size", "4",
                         "--out", str(out), "--no-progress", "--device", "cpu", "--no-plots", *options]) == 0
        return out

    def summaries(path: Path) -> dict[tuple, dict]:
        drop = ("tokens_per_second", "latency_s_per_batch", "ms_per_step", "eviction_seconds", "scoring_seconds")
        return {(s["method"], s["budget_mode"], s["budget"]): {k: v for k, v in s.items() if k not in drop}
                for s in read(path) if s["type"] == "summary"}

    whole = sweep("whole", "--methods", "full,window,oracle", "--budget-mode", "dynts,fixed", "--buffer", "16")
    parts = [sweep("part1", "--methods", "full,oracle", "--budget-mode", "dynts"),
             sweep("part2", "--methods", "window", "--budget-mode", "dynts"),
             sweep("part3", "--methods", "window,oracle", "--budget-mode", "fixed", "--buffer", "16")]
    merged = tmp_path / "merged"
    assert run_module("dynts.evals.plots", [*map(str, parts), "--out", str(merged)]) == 0
    assert summaries(merged / "results.jsonl") == summaries(whole / "results.jsonl")
    run = next(r for r in read(merged / "results.jsonl") if r["type"] == "run")
    assert set(run["methods"]) == {"full", "window", "oracle"} and run["budget_modes"] == ["dynts", "fixed"]
    assert run["buffer"] == 16
    assert (merged / "tables.md").read_text().count("| 30% |") == 4  # both modes, both tables
    assert (merged / "accuracy_vs_resident_kv.png").is_file()
    capsys.readouterr()
    assert run_module("dynts.evals.plots", [str(parts[1]), str(parts[1]), "--out", str(tmp_path / "twice")]) == 2
    assert "method window, budget mode dynts" in capsys.readouterr().err
    other = sweep("other", "--methods", "oracle", "--budget-mode", "fixed", "--buffer", "16", "--synthetic-family", "dormant")
    assert run_module("dynts.evals.plots", [str(parts[1]), str(other), "--out", str(tmp_path / "mixed")]) == 2
    assert "different runs: task" in capsys.readouterr().err


BAD_EVAL_INPUTS = [
    (["--budget", "100", "--buffer", "16"], ["--buffer", "--budget-mode fixed"]),
    (["--budget", "100", "--budget-mode", "dynts,nope"], ["--budget-mode", "nope", "fixed"]),
    (["--resident-fraction", "0.02"], ["--resident-fraction 0.02", "dynts", "out of reach", "smallest budget (65)"]),
    (["--resident-fraction", "0.3", "--budget-mode", "fixed", "--buffer", "128", "--resident-fraction", "0.05"],
     ["--resident-fraction 0.05", "fixed", "out of reach"]),
    (["--budget", "100", "--synthetic-reuse-every", "5"], ["--synthetic-reuse-every", "--synthetic-family", "reuse"]),
    (["--budget", "100", "--synthetic-family", "reuse", "--synthetic-reuse-every", "3"], ["--synthetic-reuse-every", "3", "2, 5, 10"]),
    (["--dataset", "math500", "--methods", "full", "--synthetic-family", "reuse"], ["--synthetic-family", "synthetic"]),
    (["--methods", "dynts", "--budget", "100"], ["--methods", "dynts", "predictor"]),
    (["--resident-fraction", "0.3", "--keep-ratio", "1.5"], ["--keep-ratio", "1.5"]),
]


@pytest.mark.parametrize("arguments, named", BAD_EVAL_INPUTS, ids=[" ".join(a) for a, _ in BAD_EVAL_INPUTS])
def test_bad_eval_settings_are_one_line_naming_them_before_any_model(arguments, named, capsys, monkeypatch) -> None:
    import transformers

    def refuse(self, *args, **kwargs) -> None:
        raise AssertionError("a model was built")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", refuse)
    assert cli_main(["eval", *arguments]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynts eval: error: "), lines
    for text in named:
        assert text in lines[0], lines[0]

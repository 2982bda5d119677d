"""``dynts eval`` end to end on a tiny random model (answers wrong, pipeline right) and its metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dynts.evals.datasets import default_data_dir
from dynts.evals.grading import get_grader
from dynts.evals.harness import FULL, Sampling, Setting, attention_methods, evaluate, summarize

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
    assert (out / "accuracy_vs_budget.png").stat().st_size > 0 and (out / "step_profile.png").stat().st_size > 0


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
    for problem, outcomes in {"p0": ["1", "1", "2", None], "p1": ["3", "4", "4", "4"]}.items():
        reference = {"p0": "1", "p1": "3"}[problem]
        for answer in outcomes:
            rows.append({"id": problem, "correct": answer == reference, "_extracted": answer, "_reference": reference,
                         "new_tokens": 10, "finished": True})
    batches = [{"seconds": 2.0, "new_tokens": 80, "ms_per_step": 5.0, "peak_kv_bytes": 100, "kv_bytes_source": "cache_accounting"}]
    summary = summarize(Setting(FULL), rows, batches, grader, samples_per_problem=4)
    assert summary["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert summary["pass@k"]["4"] == 1.0
    assert summary["maj@4"] == 0.5  # p0 votes "1" (right), p1 votes "4" (wrong)
    assert summary["tokens_per_second"] == 40.0


def test_sampling_settings_are_checked() -> None:
    # The command line's errors (one line, exit status 2, before any model) are tested in tests/test_cli.py.
    with pytest.raises(ValueError, match="samples > 1 needs do_sample"):
        Sampling(max_new_tokens=4, samples=2)
    assert "dynts" not in attention_methods() and "predictor" not in attention_methods()

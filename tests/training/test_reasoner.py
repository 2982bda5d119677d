"""The reasoner's training script at toy scale on CPU: batches, masks, schedule, a loss that falls, the files."""

from __future__ import annotations

import json
import random

import pytest
import torch
from dynts.cli import run_module
from dynts.evals.synthetic_task import EVAL_SEED, FAMILIES, THINK_END, VOCAB, TaskConfig, find_value_copies, generate_problem
from dynts.training.reasoner import (
    PAD,
    Augmentation,
    ModelShape,
    ProblemBatches,
    TrainingSequence,
    attention_mask_for,
    batch_loss,
    build_model,
    draw_config,
    learning_rate,
    make_optimizer,
    parse_buckets,
    parse_families,
    train_step,
)

TOY = ModelShape(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)


def test_batches_weigh_trace_answer_and_retrievals() -> None:
    batch = ProblemBatches(0, 2048, ((3, 6),), retrieval_weight=4.0).make_batch(random.Random(0), (3, 6))
    ids, weights = batch["input_ids"], batch["weights"]
    assert ids.shape[1] % 16 == 0 and "visible_key" not in batch
    words = [VOCAB[int(token)] for token in ids[0] if token != PAD]
    think, end = words.index("<think>"), words.index("</think>")
    row = weights[0]
    assert (row[:think] == 0).all(), "no loss on the prompt"
    assert (row[end : len(words) - 1] == 4.0).all(), "answer tokens weigh retrieval_weight"
    assert (row[len(words) - 1 :] == 0).all(), "no loss past the last token"
    upweighted_trace = [words[k + 1] for k in range(think, end) if row[k] == 4.0]
    assert upweighted_trace and all(word.isdigit() for word in upweighted_trace)


def test_masked_batches_hide_only_redundant_far_keys() -> None:
    augmentation = Augmentation(fraction=1.0, window=(48, 48), keep_probability=(0.0, 0.0), hide_copy_probability=(0.0, 0.0))
    batch = ProblemBatches(0, 4096, ((20, 24),), augmentation=augmentation).make_batch(random.Random(1), (20, 24))
    mask = attention_mask_for(batch, "cpu")[0, 0]
    length = mask.shape[0]
    assert not mask.triu(1).any(), "causal"
    near = torch.ones(length, length, dtype=torch.bool).tril() & ~torch.ones(length, length, dtype=torch.bool).tril(-48)
    assert mask[near].all(), "the window is always visible"
    visible = batch["visible_key"][0]
    words = [VOCAB[int(token)] for token in batch["input_ids"][0]]
    prompt_len = words.index("<think>") + 1
    assert visible[:prompt_len].all()
    far_visible = [words[k - 1] for k in range(prompt_len, length) if visible[k]]
    assert far_visible and all(word.startswith("s") for word in far_visible), "only save values stay beyond the window"
    assert attention_mask_for({"input_ids": batch["input_ids"]}, "cpu") is None


def _reads_and_copies(words: list[str]) -> tuple[list[tuple[int, int]], dict[int, list[int]]]:
    """Reads (index, save) and copies of one row, found from its words (restatement ``+ sK v``, re-read
    ``read sK v`` and answer ``sK v`` digits), independently of the training code's annotation."""
    think_end = words.index(THINK_END)
    prompt_len = words.index("<think>") + 1
    trace = words[prompt_len:]
    copies = {save: [prompt_len + p for p in positions] for save, positions in find_value_copies(trace).items()}
    reads = [(k, int(words[k - 1][1:])) for k in range(prompt_len, len(words))
             if words[k].isdigit() and words[k - 1] in {f"s{i}" for i in range(1, 9)}
             and (k > think_end or words[k - 2] in ("+", "read"))]
    return reads, copies


def test_masks_hide_copies_and_reads_without_a_visible_copy_get_no_loss() -> None:
    augmentation = Augmentation(fraction=1.0, window=(40, 40), keep_probability=(0.0, 0.0), hide_copy_probability=(0.6, 0.6))
    batches = ProblemBatches(3, 8192, ((30, 40),), retrieval_weight=4.0, augmentation=augmentation, families=("reuse",))
    batch = batches.make_batch(random.Random(2), (30, 40))
    mask = attention_mask_for(batch, "cpu")[:, 0]
    hidden_originals = readable = unreadable = 0
    for row in range(batch["input_ids"].shape[0]):
        words = [VOCAB[int(token)] for token in batch["input_ids"][row] if token != PAD]
        reads, copies = _reads_and_copies(words)
        for positions in copies.values():
            hidden_originals += not bool(batch["visible_key"][row, positions[0]])
        for position, save in reads:
            # What the attention mask really lets the query predicting `position` see.
            sees_a_copy = any(bool(mask[row, position - 1, copy]) for copy in copies[save] if copy < position)
            weight = float(batch["weights"][row, position - 1])
            assert weight == (4.0 if sees_a_copy else 0.0), (row, position, save)
            readable += sees_a_copy
            unreadable += not sees_a_copy
    assert hidden_originals > 0, "original copies are hidden too"
    assert readable > 0 and unreadable > 0


def test_the_mixture_draws_every_family_and_period() -> None:
    rng = random.Random(0)
    configs = [draw_config(rng, (10, 20), FAMILIES) for _ in range(300)]
    assert {c.family for c in configs} == set(FAMILIES)
    assert {c.reuse_every for c in configs if c.family == "reuse"} == {2, 5, 10}
    assert all(1 <= c.saves <= min(8, c.step_range[0]) for c in configs)
    assert {draw_config(rng, (10, 20), ("branches",)).family for _ in range(20)} == {"branches"}
    assert parse_families("reuse,dormant") == ("reuse", "dormant")
    for bad in ("reuse,reuse", "loops"):
        with pytest.raises(Exception, match="distinct names"):
            parse_families(bad)


def test_training_sequence_carries_the_annotation_into_sequence_indices() -> None:
    problem = generate_problem(random.Random(5), TaskConfig(family="reuse", reuse_every=5))
    sequence = TrainingSequence.from_problem(problem)
    words = [VOCAB[token] for token in sequence.ids]
    assert words[0] == "<bos>" and words[-1] == "<eos>" and words[sequence.think_end] == THINK_END
    for save, positions in sequence.copies.items():
        assert all(words[p - 1] == f"s{save}" and words[p] == problem.answer.split()[save - 1] for p in positions)
    assert sorted(sequence.reads) == sorted(_reads_and_copies(words)[0])


def test_masking_starts_after_the_warm_start_batches() -> None:
    stream = iter(ProblemBatches(0, 512, ((3, 4),), augmentation=Augmentation(fraction=1.0, start_batch=3)))
    masked = ["visible_key" in next(stream) for _ in range(6)]
    assert masked == [False, False, False, True, True, True]


def test_schedule_and_bucket_parsing() -> None:
    assert learning_rate(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert learning_rate(100, 100, 1.0, 10) == pytest.approx(0.05)
    assert learning_rate(55, 100, 1.0, 10) < learning_rate(30, 100, 1.0, 10)
    assert parse_buckets("4-40,40-80") == ((4, 40), (40, 80))
    with pytest.raises(Exception, match="LOW-HIGH"):
        parse_buckets("40-4")


def test_a_toy_model_learns() -> None:
    model = build_model(TOY, seed=0)
    optimizer = make_optimizer(model, 1e-2, 0.0, "cpu")
    batches = ProblemBatches(0, 1024, ((3, 5),), augmentation=Augmentation(fraction=0.5))
    rng = random.Random(0)
    held_out = batches.make_batch(random.Random(99), (3, 5))
    with torch.no_grad():
        before = batch_loss(model, held_out, "cpu").item()
    for _ in range(60):
        train_step(model, batches.make_batch(rng, (3, 5)), optimizer, "cpu")
    with torch.no_grad():
        after = batch_loss(model, held_out, "cpu").item()
    assert after < 0.5 * before, (before, after)


def test_training_command_writes_checkpoint_tokenizer_log_and_predictor_problems(tmp_path) -> None:
    out = tmp_path / "reasoner"
    code = run_module("dynts.training.reasoner", [
        "--out", str(out), "--steps", "3", "--hidden-size", "32", "--layers", "1", "--intermediate-size", "64",
        "--buckets", "3-4", "--batch-tokens", "512", "--workers", "0", "--eval-steps", "3-3", "--eval-saves", "1",
        "--eval-problems", "2", "--eval-batch", "2", "--proxy-problems", "2", "--no-sweep", "--device", "cpu",
        "--augment", "0.5", "--predictor-problems", "10",
    ])
    assert code == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "train_log.txt"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["seed"] == 0
    # One held-out set per family and re-read period, each with exact and per-save accuracy.
    heldout = [(r["config"]["family"], r["config"]["reuse_every"]) for r in summary["heldout"]]
    assert heldout == [("dormant", None), ("reuse", 2), ("reuse", 5), ("reuse", 10), ("branches", None)]
    assert all(0.0 <= r["accuracy"] <= r["per_save_accuracy"] <= 1.0 for r in summary["heldout"])
    assert len(summary["heldout_teacher_forced"]) == 5
    assert "rebuild exactly" in (out / "train_log.txt").read_text()
    records = [json.loads(line) for line in (out / "predictor_problems.jsonl").read_text().splitlines()]
    assert len(records) == 10 and {r["family"] for r in records} == set(FAMILIES)
    assert all(r["problem"].endswith("<think>") and r["answer"] for r in records)


@pytest.mark.parametrize("arguments", [
    ["--steps", "zero"],
    ["--augment", "1.5"],
    ["--hide-copies", "-0.1"],
    ["--families", "dormant,loops"],
    ["--predictor-seed", str(EVAL_SEED)],
])
def test_bad_arguments_are_refused(tmp_path, arguments: list[str]) -> None:
    assert run_module("dynts.training.reasoner", ["--out", str(tmp_path), *arguments]) == 2

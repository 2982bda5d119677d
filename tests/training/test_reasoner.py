"""The reasoner's training script at toy scale on CPU: batches, masks, schedule, a loss that falls, the files."""

from __future__ import annotations

import json
import random

import pytest
import torch
from dynts.evals.synthetic_task import VOCAB
from dynts.training.reasoner import (
    PAD,
    Augmentation,
    ModelShape,
    ProblemBatches,
    attention_mask_for,
    batch_loss,
    build_model,
    learning_rate,
    main,
    make_optimizer,
    parse_buckets,
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
    augmentation = Augmentation(fraction=1.0, window=(48, 48), keep_probability=(0.0, 0.0))
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


def test_training_command_writes_checkpoint_tokenizer_and_log(tmp_path) -> None:
    out = tmp_path / "reasoner"
    code = main([
        "--out", str(out), "--steps", "3", "--hidden-size", "32", "--layers", "1", "--intermediate-size", "64",
        "--buckets", "3-4", "--batch-tokens", "512", "--workers", "0", "--eval-steps", "3-3", "--eval-saves", "1",
        "--eval-problems", "2", "--eval-batch", "2", "--no-sweep", "--device", "cpu",
    ])
    assert code == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "train_log.txt"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["seed"] == 0 and len(summary["heldout"]) == 1
    assert "rebuild exactly" in (out / "train_log.txt").read_text()


def test_bad_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--steps", "zero"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--augment", "1.5"])

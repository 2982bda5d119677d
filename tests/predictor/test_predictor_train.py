"""Training on a small synthetic label set: validation loss falls and the ranking beats random by far."""

from __future__ import annotations

import pytest
import torch

from dynts.training.predictor.dataset import LabelSet, LabelSetWriter
from dynts.predictor.head import ModelIdentity
from dynts.training.predictor.labels import normalise
from dynts.training.predictor.train import TrainConfig, evaluate, recall_at, split_traces, train_predictor

HIDDEN = 16


def _identity() -> ModelIdentity:
    return ModelIdentity(name="synthetic", model_type="none", hidden_size=HIDDEN, num_layers=1, vocab_size=2,
                         fingerprint=torch.zeros(4))


def synthetic_label_set(directory, traces: int = 40, tokens: int = 60, seed: int = 0) -> LabelSet:
    """Hidden states ~ N(0, 1); importance relative to uniform = exp(2 * sin(h . w) + noise): a planted,
    nonlinear signal the head can learn but a constant cannot."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(HIDDEN, generator=generator)
    direction /= direction.norm()
    writer = LabelSetWriter(directory, _identity(), {"mode": "synthetic"}, shard_tokens=500)
    for trace in range(traces):
        hidden = torch.randn(tokens, HIDDEN, generator=generator)
        uniform = torch.full((tokens,), 1.0 / (100 + trace))
        relative = torch.exp(2.0 * torch.sin(hidden @ direction) + 0.1 * torch.randn(tokens, generator=generator))
        writer.add(trace, torch.arange(tokens), hidden, relative * uniform, uniform)
    writer.close()
    return LabelSet(directory)


def test_training_lowers_validation_loss_and_ranks_far_better_than_random(tmp_path) -> None:
    labels = synthetic_label_set(tmp_path)
    assert len(labels.shards) > 1, "the set should span several shards (streamed per epoch)"
    config = TrainConfig(epochs=12, batch_size=64, lr=3e-3, val_fraction=0.2, seed=0)
    head, report = train_predictor(labels, config)
    assert report.final.traces == 8 and report.train_traces == 32
    assert report.final.mse < 0.25 * report.initial.mse
    assert report.final.mse < 0.5 * report.mean_baseline_mse
    assert report.final.recall > 0.8 and report.random_recall == 0.3
    assert [entry["epoch"] for entry in report.history] == list(range(1, 13))
    # The returned head reproduces the reported figures.
    held_out = split_traces(labels.trace_ids(), config.val_fraction, config.seed)
    again = evaluate(head, labels, held_out, config)
    assert again.mse == pytest.approx(report.final.mse, rel=1e-5)


def test_rank_loss_option_and_rank_normalisation_train_too(tmp_path) -> None:
    labels = synthetic_label_set(tmp_path, traces=20)
    config = TrainConfig(epochs=8, batch_size=64, lr=3e-3, val_fraction=0.25, rank_weight=0.5, normalisation="rank")
    _, report = train_predictor(labels, config)
    assert report.final.recall > 0.7
    assert report.final.mse < report.initial.mse


def test_recall_at() -> None:
    target = torch.arange(10.0)
    assert recall_at(target, target) == 1.0
    assert recall_at(-target, target) == 0.0  # top 3 = {9, 8, 7}; reversed predicts {0, 1, 2}
    assert recall_at(torch.tensor([5.0, 0, 0, 0, 0, 0, 0, 9, 8, 0]), target) == pytest.approx(2 / 3)
    generator = torch.Generator().manual_seed(0)
    random = [recall_at(torch.rand(200, generator=generator), torch.rand(200, generator=generator)) for _ in range(200)]
    assert sum(random) / len(random) == pytest.approx(0.3, abs=0.02)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        recall_at(target, target, fraction=0.0)


def test_split_and_config_checks(tmp_path) -> None:
    ids = torch.arange(10)
    held = split_traces(ids, 0.2, seed=1)
    assert held.numel() == 2 and torch.equal(held, split_traces(ids, 0.2, seed=1))
    with pytest.raises(ValueError, match="at least 2 labelled traces"):
        split_traces(torch.tensor([4]), 0.5, 0)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        TrainConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="normalisation must be one of"):
        TrainConfig(normalisation="x1e4")
    with pytest.raises(FileNotFoundError, match="not a label directory"):
        LabelSet(tmp_path)


def test_writer_keeps_traces_whole_and_checks_sizes(tmp_path) -> None:
    writer = LabelSetWriter(tmp_path, _identity(), {}, shard_tokens=5)
    for trace, count in enumerate((3, 4, 2)):
        writer.add(trace, torch.arange(count), torch.zeros(count, HIDDEN), torch.ones(count), torch.ones(count))
    with pytest.raises(ValueError, match="the model's hidden size is 16"):
        writer.add(9, torch.arange(2), torch.zeros(2, 8), torch.ones(2), torch.ones(2))
    writer.close()
    labels = LabelSet(tmp_path)
    traces_per_shard = [set(shard["trace"].tolist()) for shard in labels.iter_shards()]
    assert traces_per_shard == [{0, 1}, {2}]
    assert labels.trace_ids().tolist() == [0, 1, 2]
    assert normalise(torch.ones(2), torch.ones(2)).tolist() == pytest.approx([0.6931472] * 2)
    with pytest.raises(FileExistsError, match="label into an empty directory"):
        LabelSetWriter(tmp_path, _identity(), {})

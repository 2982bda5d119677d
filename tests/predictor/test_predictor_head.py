"""The predictor head: shape, save/load round trip, and refusal of a model it was not trained for."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dynts.predictor import ImportancePredictor, ModelIdentity, PredictorScorer
from dynts.scorers import get_scorer
from tiny_models import tiny_model


def test_layers_follow_the_model_config() -> None:
    model = tiny_model("qwen3")  # hidden size 64
    head = ImportancePredictor.for_model(model)
    linears = [module for module in head.modules() if isinstance(module, nn.Linear)]
    assert [tuple(layer.weight.shape) for layer in linears] == [(128, 64), (32, 128), (1, 32)]
    assert all(layer.bias is None for layer in linears)
    assert sum(isinstance(module, nn.Softplus) for module in head.modules()) == 2  # + the output softplus in forward
    scores = head(torch.randn(3, 5, 64) * 10)
    assert scores.shape == (3, 5) and bool((scores > 0).all())
    assert head.flops_per_token() == 2 * (64 * 128 + 128 * 32 + 32)
    with pytest.raises(ValueError, match="hidden states have size 32; this predictor head reads hidden size 64"):
        head(torch.randn(2, 32))
    with pytest.raises(ValueError, match="hidden_size must be an int >= 2"):
        ImportancePredictor(1)


def test_save_load_round_trip(tmp_path) -> None:
    model = tiny_model("llama")
    torch.manual_seed(3)
    head = ImportancePredictor.for_model(model)
    head.save(tmp_path / "head", ModelIdentity.of(model), extra={"labels": {"mode": "answer"}})
    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    assert meta["base_model"]["hidden_size"] == 64 and meta["base_model"]["model_type"] == "llama"
    assert "name" in meta["base_model"] and meta["labels"] == {"mode": "answer"}
    loaded = ImportancePredictor.load(tmp_path / "head", model=model)
    hidden = torch.randn(4, 7, 64)
    assert torch.equal(loaded(hidden), head(hidden))


def test_a_different_model_is_refused(tmp_path) -> None:
    model = tiny_model("llama", seed=0)
    ImportancePredictor.for_model(model).save(tmp_path, ModelIdentity.of(model))
    # The same checkpoint in another dtype is accepted (bf16 rounding is within the fingerprint tolerance).
    ImportancePredictor.load(tmp_path, model=tiny_model("llama", seed=0).to(torch.bfloat16))
    with pytest.raises(ValueError, match="same sizes but different weights"):
        ImportancePredictor.load(tmp_path, model=tiny_model("llama", seed=1))
    with pytest.raises(ValueError, match="model_type is qwen3, the head needs llama"):
        ImportancePredictor.load(tmp_path, model=tiny_model("qwen3", seed=0))
    with pytest.raises(ValueError, match="num_layers is 3, the head needs 2"):
        ImportancePredictor.load(tmp_path, model=tiny_model("llama", layers=3))
    with pytest.raises(ValueError, match="same sizes but different weights"):
        PredictorScorer(tmp_path, model=tiny_model("llama", seed=1))
    with pytest.raises(FileNotFoundError, match="head.json not found"):
        ImportancePredictor.load(tmp_path / "missing")


def test_hidden_size_mismatch_is_refused(tmp_path) -> None:
    from predictor_support import synthetic_vocab_model

    model = synthetic_vocab_model(hidden_size=32)
    ImportancePredictor.for_model(model).save(tmp_path, ModelIdentity.of(model))
    with pytest.raises(ValueError, match="hidden_size is 48, the head needs 32"):
        ImportancePredictor.load(tmp_path, model=synthetic_vocab_model(hidden_size=48))
    with pytest.raises(ValueError, match="the predictor head reads hidden size 32; the model's is 48"):
        PredictorScorer(ImportancePredictor(32), model=synthetic_vocab_model(hidden_size=48))


def test_registry_builds_the_scorer_and_explains_what_it_needs(tmp_path) -> None:
    model = tiny_model("llama")
    ImportancePredictor.for_model(model).save(tmp_path, ModelIdentity.of(model))
    assert isinstance(get_scorer("predictor", predictor=tmp_path, model=model), PredictorScorer)
    with pytest.raises(ValueError, match="the predictor scorer needs predictor=PATH"):
        get_scorer("predictor")
    with pytest.raises(TypeError, match="predictor must be an ImportancePredictor or a head directory"):
        PredictorScorer(42)

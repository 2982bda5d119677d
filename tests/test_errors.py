"""Bad input to the user-facing constructors: a clear error naming the parameter (or file) and what is allowed,
raised when the object is built, never at the first forward pass; accepted spellings of good input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dynts import CompressionConfig, DynTSCache, get_scorer
from dynts.predictor import ImportancePredictor, ModelIdentity
from tiny_models import tiny_model


def test_numpy_scalars_and_a_bare_think_end_id_are_accepted() -> None:
    config = CompressionConfig(budget=np.int64(40), window=np.int32(8), keep_ratio=np.float32(0.5), think_end=5)
    assert (config.budget, config.window, config.think_end) == (40, 8, (5,))
    assert type(config.budget) is int and type(config.keep_ratio) is float


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(think_end="</think>"), TypeError, r"think_end must be token ids \(ints\), got the string '</think>'"),
    (dict(think_end=[5, "6"]), TypeError, r"think_end must hold int token ids, got str '6'"),
    (dict(think_end=1.5), TypeError, r"think_end must be a token id or a sequence of token ids, got float"),
    (dict(budget="40"), TypeError, r"budget must be an int, got str '40'"),
    (dict(keep_ratio="0.3"), TypeError, r"keep_ratio must be a float in \(0, 1\], got str"),
    (dict(buffer=8), ValueError, r"buffer is used by budget_mode='fixed' only"),
])
def test_config_errors_name_the_field(kwargs, error, message) -> None:
    values = {"budget": 40, "window": 8, **kwargs}
    with pytest.raises(error, match=message):
        CompressionConfig(**values)


def test_cache_arguments_are_checked_when_the_cache_is_built() -> None:
    model = tiny_model("llama")
    config = CompressionConfig(budget=16, window=4)
    with pytest.raises(TypeError, match=r"eos_token_id must be token ids \(ints\), got the string '2'"):
        DynTSCache(model, config, scorer="window", eos_token_id="2")
    with pytest.raises(ValueError, match=r"pad_token_id must be >= 0, got -1"):
        DynTSCache(model, config, scorer="window", pad_token_id=-1)
    with pytest.raises(ValueError, match=r"snapkv: observation_window \(32\) must be <= the CompressionConfig window \(4\)"):
        DynTSCache(model, config, scorer="snapkv")  # at construction, not at the first forward pass
    with pytest.raises(TypeError, match=r"scorer 'sepllm': .*unexpected keyword argument 'separators'"):
        DynTSCache(model, config, scorer="sepllm", scorer_kwargs={"separators": [3]})
    with pytest.raises(TypeError, match=r"sinks must be an int, got str '4'"):
        get_scorer("streamingllm", sinks="4")
    with pytest.raises(ValueError, match=r"history_limit must be an int >= 0, got -3"):
        DynTSCache(model, config, scorer="window", history_limit=-3)


def test_a_scorer_serves_one_cache() -> None:
    model = tiny_model("llama")
    scorer = get_scorer("window")
    for _ in range(2):
        cache = DynTSCache(model, CompressionConfig(budget=16, window=4), scorer=scorer, eos_token_id=[])
        if _ == 1:
            with pytest.raises(ValueError, match="scorer 'window' is already bound to a cache; create one scorer per cache"):
                model(torch.tensor([[3, 4]]), past_key_values=cache)
        else:
            model(torch.tensor([[3, 4]]), past_key_values=cache)


def test_corrupted_predictor_files_are_named(tmp_path) -> None:
    model = tiny_model("llama")
    head_dir = ImportancePredictor.for_model(model).save(tmp_path / "head", ModelIdentity.of(model))
    weights, meta = head_dir / "head.safetensors", head_dir / "head.json"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"predictor head: cannot read {weights}"):
        ImportancePredictor.load(head_dir)
    meta.write_text("{not json")
    with pytest.raises(ValueError, match=rf"predictor head: {meta} is not valid JSON"):
        ImportancePredictor.load(head_dir)
    meta.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match=rf"predictor head: {meta} is not a dynts predictor head"):
        ImportancePredictor.load(head_dir)
    with pytest.raises(FileNotFoundError, match=r"predictor head: .*missing.*head.json not found"):
        ImportancePredictor.load(tmp_path / "missing")

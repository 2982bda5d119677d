"""Labels: equal to an eager-attention reference (full L x L probabilities) on tiny models; normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from dynts.training.predictor.labels import label_sequence, normalise, row_weights
from dynts.tracking import find_marker
from tiny_models import VOCAB, tiny_model


def eager_reference(model, ids: torch.Tensor, mode: str, answer_start: int | None = None, horizon: int | None = None):
    """Labels from the full eager attention matrices: zero the diagonal, then answer: mean over heads and answer
    rows; future: mean over the rows j+1 .. j+horizon of each key; then mean over layers. Also the final hidden."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model(ids.view(1, -1), output_attentions=True, output_hidden_states=True)
    finally:
        model.config._attn_implementation = previous
    length = ids.numel()
    rows, keys = torch.arange(length).view(-1, 1), torch.arange(length).view(1, -1)
    per_layer = []
    for attention in out.attentions:
        probs = attention[0].double().clone()  # [heads, L, L]
        probs[:, torch.arange(length), torch.arange(length)] = 0.0
        if mode == "answer":
            per_layer.append(probs[:, answer_start:].mean(dim=(0, 1)))
        else:
            band = (rows > keys) & (rows <= keys + horizon)
            count = band.sum(0).double()
            received = (probs * band).sum(1).mean(0)
            per_layer.append(torch.where(count > 0, received / count.clamp(min=1), torch.zeros_like(received)))
    return torch.stack(per_layer).mean(0), out.hidden_states[-1][0]


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2"])
@pytest.mark.parametrize("query_chunk", [1, 7, 512])
def test_answer_labels_equal_eager_reference(arch: str, query_chunk: int) -> None:
    model = tiny_model(arch, "sdpa", kv_heads=2)
    ids = _ids(53)
    result = label_sequence(model, ids, mode="answer", answer_start=41, query_chunk=query_chunk)
    expected, hidden = eager_reference(model, ids, "answer", answer_start=41)
    torch.testing.assert_close(result.attention.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.hidden, hidden, atol=1e-5, rtol=1e-5)
    # Tokens after the last answer row receive nothing; the labels are not trivially uniform.
    assert float(result.attention[-1]) == 0.0
    assert float(result.attention[:41].std()) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("horizon", [1, 6, 100])
def test_future_labels_equal_eager_reference(arch: str, horizon: int) -> None:
    model = tiny_model(arch, "sdpa", kv_heads=1)
    ids = _ids(37, seed=1)
    result = label_sequence(model, ids, mode="future", horizon=horizon, query_chunk=5)
    expected, _ = eager_reference(model, ids, "future", horizon=horizon)
    torch.testing.assert_close(result.attention.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode,answer_start,horizon", [("answer", 30, None), ("future", None, 4)])
def test_uniform_reference_is_the_same_average_of_uniform_attention(mode, answer_start, horizon) -> None:
    length = 40
    rows, keys = torch.arange(length).view(-1, 1), torch.arange(length).view(1, -1)
    uniform_probs = torch.where(keys <= rows, 1.0 / (rows.double() + 1.0), 0.0)
    uniform_probs.fill_diagonal_(0.0)
    if mode == "answer":
        expected = uniform_probs[answer_start:].mean(0)
    else:
        band = (rows > keys) & (rows <= keys + horizon)
        count = band.sum(0).double()
        received = (uniform_probs * band).sum(0)
        expected = torch.where(count > 0, received / count.clamp(min=1), torch.zeros_like(received))
    _, uniform = row_weights(length, mode, answer_start, horizon)
    torch.testing.assert_close(uniform, expected, atol=1e-12, rtol=0)


def test_normalise_log_uniform_and_rank() -> None:
    uniform = torch.tensor([0.1, 0.1, 0.05, 0.05])
    attention = torch.tensor([0.1, 0.3, 0.0, 0.05])
    targets = normalise(attention, uniform)
    expected = torch.log1p(torch.tensor([1.0, 3.0, 0.0, 1.0]))
    torch.testing.assert_close(targets, expected)
    ranks = normalise(attention, uniform, torch.tensor([0, 0, 1, 1]), method="rank")
    assert ranks.tolist() == [0.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="normalisation must be one of"):
        normalise(attention, uniform, method="x1e4")
    with pytest.raises(ValueError, match="uniform must be > 0"):
        normalise(attention, torch.zeros(4))
    with pytest.raises(ValueError, match="rank normalisation needs the sequence index"):
        normalise(attention, uniform, method="rank")


def test_log_uniform_labels_do_not_depend_on_sequence_length_for_uniform_attention() -> None:
    # Uniform attention gives log(2) whatever the length: the point of dividing by the uniform reference.
    for length, answer_start in ((20, 15), (400, 300)):
        _, uniform = row_weights(length, "answer", answer_start, None)
        assert normalise(uniform[:answer_start].float(), uniform[:answer_start].float()).sub(math.log(2)).abs().max() < 1e-6


def test_bad_arguments_name_the_parameter() -> None:
    model = tiny_model("llama")
    ids = _ids(12)
    with pytest.raises(ValueError, match=r"answer mode needs answer_start in \[1, 11\]"):
        label_sequence(model, ids, mode="answer", answer_start=12)
    with pytest.raises(ValueError, match="future mode needs horizon >= 1"):
        label_sequence(model, ids, mode="future")
    with pytest.raises(ValueError, match="horizon is only used by the future mode"):
        label_sequence(model, ids, mode="answer", answer_start=5, horizon=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        label_sequence(model, ids, mode="past", answer_start=5)
    with pytest.raises(ValueError, match="query_chunk must be >= 1"):
        label_sequence(model, ids, mode="answer", answer_start=5, query_chunk=0)
    with pytest.raises(ValueError, match="input_ids must be one sequence"):
        label_sequence(model, torch.zeros(2, 5, dtype=torch.long), mode="answer", answer_start=3)
    with pytest.raises(ValueError, match="the model is in training mode"):
        label_sequence(model.train(), ids, mode="answer", answer_start=5)


def test_find_marker() -> None:
    assert find_marker([5, 1, 2, 7, 1, 2], (1, 2)) == 1
    assert find_marker([5, 1, 2, 7, 1, 2], (1, 2), start=2) == 4
    assert find_marker([5, 1, 7], (1, 2)) is None

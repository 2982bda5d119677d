"""The predictor inside HF generate: after every step the cache holds exactly
protected + window + top-k(predicted score), replayed independently from the hidden states the model produced."""

from __future__ import annotations

import warnings

import torch
from transformers import LogitsProcessorList

from dynts import CompressionConfig, DynTSCache
from dynts.modeling import decoder_module
from dynts.policy import keep_quota
from dynts.predictor import ImportancePredictor, PredictorScorer
from tiny_models import ForceToken, left_padded_batch, tiny_model

THINK_END = 5


def _replay(config: CompressionConfig, head: ImportancePredictor, steps: list[torch.Tensor], row: int, pad: int,
            prompt_end: int, answer_start: int) -> list[list[int]]:
    """The policy replayed in plain Python for one row: the resident positions after every forward pass."""
    resident: list[int] = []
    score: dict[int, float] = {}
    history = []
    position = 0
    for hidden in steps:
        with torch.no_grad():
            values = head(hidden)[row].tolist()  # the same call on the same tensor as the scorer's
        for value in values:
            if position >= pad:
                resident.append(position)
                score[position] = value
            position += 1
        if len(resident) >= config.budget:
            window = resident[-config.window:]
            older = resident[: -config.window]
            quota = keep_quota(config, len(older))
            protected = [p for p in older if p < prompt_end or (p >= answer_start and position > answer_start)]
            candidates = [p for p in older if p not in protected]
            # best score first; ties to the more recent token
            ranked = sorted(candidates, key=lambda p: (-score[p], -p))
            chosen = ranked[: max(quota - len(protected), 0)]
            resident = sorted(set(protected) | set(chosen)) + window
        history.append(list(resident))
    return history


def test_generate_keeps_exactly_protected_window_and_top_predicted() -> None:
    model = tiny_model("llama", "sdpa")
    ids, mask = left_padded_batch([6, 9], seed=2)
    # The answer stays short enough that protected tokens never exceed a keep quota (no overflow regime).
    width, new_tokens, marker_step = ids.shape[1], 160, 148
    torch.manual_seed(11)
    head = ImportancePredictor.for_model(model)
    config = CompressionConfig(budget=40, window=6, keep_ratio=0.5, think_end=(THINK_END,))
    cache = DynTSCache(model, config, scorer=PredictorScorer(head, model=model), eos_token_id=[])
    steps: list[torch.Tensor] = []
    resident_after: list[list[list[int]]] = []

    def record(module, args, kwargs, output):  # runs after the cache's own hook (compaction included)
        if kwargs.get("past_key_values") is cache:
            steps.append(output.last_hidden_state.detach().clone())
            resident_after.append([held.tolist() for held in cache.resident_positions(0)])

    handle = decoder_module(model).register_forward_hook(record, with_kwargs=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a protected-overflow warning would fail the test
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, past_key_values=cache, do_sample=False,
                           eos_token_id=None, pad_token_id=0,
                           logits_processor=LogitsProcessorList([ForceToken(marker_step, THINK_END, only_then=True)]))
    finally:
        handle.remove()
    assert cache.stats.compactions >= 2 * 6
    answer_start = width + marker_step  # logical position of the marker, fed at step marker_step + 1
    for row, pad in enumerate((width - 6, 0)):
        expected = _replay(config, head, steps, row, pad, width, answer_start)
        got = [step[row] for step in resident_after]
        assert got == expected, f"row {row}"
        final = set(got[-1])
        assert set(range(pad, width)) <= final and set(range(answer_start, width + new_tokens - 1)) <= final


def test_predictor_scorer_by_name_inside_generate(tmp_path) -> None:
    from dynts.predictor import ModelIdentity

    model = tiny_model("qwen3", "sdpa")
    ImportancePredictor.for_model(model).save(tmp_path, ModelIdentity.of(model))
    config = CompressionConfig(budget=24, window=4, keep_ratio=0.5)
    cache = DynTSCache(model, config, scorer="predictor", scorer_kwargs={"predictor": tmp_path, "model": model}, eos_token_id=[])
    model.generate(torch.tensor([[7, 8, 9, 10]]), max_new_tokens=40, past_key_values=cache, do_sample=False,
                   eos_token_id=None, pad_token_id=0)
    assert cache.stats.compactions >= 2
    assert max(max(row) for row in cache.stats.history) <= 24
    assert cache.stats.scoring_seconds > 0.0

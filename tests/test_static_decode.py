"""The fast path (StaticDecoder: fixed-shape steps, CUDA graph on GPU) against the plain DynTSCache generate path."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from dynts import CompressionConfig, DynTSCache
from dynts.integrations.hf_static import StaticDecoder
from dynts.scorers import ExternalScorer
from tiny_models import left_padded_batch, tiny_model

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="CUDA not available: the CUDA-graph + Triton path runs on the GPU machine")),
]


def _scorer(model) -> ExternalScorer:
    """A fixed random projection of the hidden state: deterministic scores that differ per token."""
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(model.device)
    return ExternalScorer(lambda hidden, ids: hidden.float() @ direction)


def _models(device: str, dtype: torch.dtype):
    model = tiny_model("llama", "sdpa", layers=2).to(device=device, dtype=dtype)
    ids, mask = left_padded_batch([19, 7, 12], seed=2)
    return model, ids.to(device), mask.to(device)


class _Logits(LogitsProcessor):
    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


@pytest.mark.parametrize("device", DEVICES)
def test_static_path_matches_plain_path_greedy_fp32(device: str) -> None:
    model, ids, mask = _models(device, torch.float32)
    config = CompressionConfig(budget=48, window=8, keep_ratio=0.5, think_end=(5,))
    new_tokens = 90
    plain_cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[2])
    plain = model.generate(ids, attention_mask=mask, past_key_values=plain_cache, max_new_tokens=new_tokens,
                           do_sample=False, eos_token_id=2, pad_token_id=0)
    fast_cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[2])
    fast = StaticDecoder(model, fast_cache).generate(ids, attention_mask=mask, max_new_tokens=new_tokens)
    assert plain_cache.stats.compactions >= 6
    assert torch.equal(fast[:, : plain.shape[1]], plain)
    assert list(fast_cache.stats.history) == list(plain_cache.stats.history)
    for layer in range(2):
        for a, b in zip(fast_cache.resident_positions(layer), plain_cache.resident_positions(layer)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_static_path_logits_within_bf16_tolerance(device: str) -> None:
    """bf16, teacher-forced on the plain path's tokens: every step's logits agree within bf16 precision. (Eager
    static steps: forcing tokens needs a host copy per step, which a captured graph cannot take; the next test
    shows the graph replays these very steps.)"""
    model, ids, mask = _models(device, torch.bfloat16)
    config = CompressionConfig(budget=48, window=8, keep_ratio=0.5)
    recorder = _Logits()
    plain_cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[])
    plain = model.generate(ids, attention_mask=mask, past_key_values=plain_cache, max_new_tokens=60, do_sample=False,
                           eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([recorder]))
    decoder = StaticDecoder(model, DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[]), use_cuda_graph=False)
    forced = iter(plain[:, ids.shape[1]:].T.tolist())
    fast_logits = []

    def choose(logits):
        fast_logits.append(logits.float().clone())
        return torch.tensor(next(forced), device=logits.device)

    decoder._choose = choose
    decoder.generate(ids, attention_mask=mask, max_new_tokens=60)
    assert len(fast_logits) == len(recorder.steps) == 60
    assert plain_cache.stats.compactions >= 5
    scale = max(float(step.float().abs().max()) for step in recorder.steps)
    worst = max(float((a - b.float()).abs().max()) for a, b in zip(fast_logits, recorder.steps))
    print(f"max |fast - plain| logit difference: {worst:.4f} (max |logit| {scale:.2f})")
    # bf16 carries 8 significant bits: a few units of its epsilon (2**-7) of the logit scale.
    assert worst <= 4 * 2**-7 * scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: CUDA graphs run on the GPU machine")
def test_cuda_graph_replays_the_eager_static_steps_bf16() -> None:
    model, ids, mask = _models("cuda", torch.bfloat16)
    config = CompressionConfig(budget=48, window=8, keep_ratio=0.5)
    runs = []
    for use_graph in (False, True):
        logits = []
        cache = DynTSCache(model, config, scorer=_scorer(model), eos_token_id=[])
        tokens = StaticDecoder(model, cache, use_cuda_graph=use_graph).generate(
            ids, attention_mask=mask, max_new_tokens=60, logits_callback=lambda x: logits.append(x.float().clone()))
        runs.append((tokens, torch.stack(logits), list(cache.stats.history)))
    assert runs[1][2] == runs[0][2]
    assert torch.equal(runs[1][0], runs[0][0])
    torch.testing.assert_close(runs[1][1], runs[0][1], atol=1e-3, rtol=0)


def test_static_path_rejects_query_scorers() -> None:
    model, ids, mask = _models("cpu", torch.float32)
    cache = DynTSCache(model, CompressionConfig(budget=32, window=8), scorer="h2o", eos_token_id=[])
    with pytest.raises(ValueError, match="static decoding supports scorers that need no attention queries, not 'h2o'"):
        StaticDecoder(model, cache).generate(ids, attention_mask=mask, max_new_tokens=4)

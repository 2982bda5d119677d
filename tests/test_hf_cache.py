"""DynTSCache inside HF generate: exactness without eviction, masked-reference equality with eviction,
bounded memory, ragged batches, exact kept sets."""

from __future__ import annotations

import pytest
import torch
from reference_attention import REFERENCE, REFERENCE_VISIBLE
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from dynts import CompressionConfig, DynTSCache
from dynts.scorers import Scorer
from tiny_models import ARCHITECTURES, VOCAB, ForceToken, left_padded_batch, tiny_model

# Generation never stops at EOS in these tests, so the caches are told there is no EOS either.
GENERATE = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
NO_EOS: list[int] = []


# ---------------------------------------------------------------------- no eviction: identical to plain generate
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", [[11], [11, 5, 8, 11]], ids=["batch1", "batch4-left-padded"])
def test_identical_to_plain_generate_within_budget(arch: str, attn: str, lengths: list[int]) -> None:
    model = tiny_model(arch, attn)
    ids, mask = left_padded_batch(lengths)
    new_tokens = 24
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **GENERATE)
    config = CompressionConfig(budget=ids.shape[1] + new_tokens, window=4)
    cache = DynTSCache(model, config, scorer="h2o", eos_token_id=NO_EOS)
    compressed = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, past_key_values=cache, **GENERATE)
    assert torch.equal(plain, compressed)
    assert cache.stats.compactions == 0
    # Padding is not held: each row holds exactly its own tokens.
    assert cache.physical_len == [length + new_tokens - 1 for length in lengths]


# ---------------------------------------------------------------------- with eviction: equal to a masked full cache


class _Recorder(LogitsProcessor):
    """After each forward: the raw logits and, per layer, the positions the cache holds for the next step."""

    def __init__(self, cache: DynTSCache, layers: int) -> None:
        self.cache, self.layers = cache, layers
        self.logits: list[torch.Tensor] = []
        self.resident: list[list[list[torch.Tensor]]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.logits.append(scores.clone())
        self.resident.append([[p.clone() for p in self.cache.resident_positions(layer)] for layer in range(self.layers)])
        return scores


class PerHeadScorer(Scorer):
    """Deterministic scores that differ per layer and KV head (to tell granularities apart)."""

    name = "per-head-test"

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        positions = self.slots.positions[:, rows].float()  # [layers_g, R, heads_g, S]
        layers = torch.arange(self.geometry.num_layers).view(-1, 1, 1, 1).float()
        heads = torch.arange(self.geometry.kv_heads).view(1, 1, -1, 1).float()
        return torch.sin(positions.mean(dim=(0, 2), keepdim=True) * 1.7 + layers * 0.9 + heads * 2.3)


def _check_against_masked_full_cache(model, ids, mask, cache: DynTSCache, new_tokens: int) -> int:
    """Generate with ``cache``; then teacher-force the same tokens through a full cache whose attention hides
    exactly the evicted positions; compare the logits of every step. Returns the number of evicting steps."""
    layers = model.config.num_hidden_layers
    recorder = _Recorder(cache, layers)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, past_key_values=cache,
        logits_processor=LogitsProcessorList([recorder]), **GENERATE,
    )
    prompt_len = ids.shape[1]
    model.config._attn_implementation = REFERENCE
    try:
        full = DynamicCache(config=model.config)
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], new_tokens, dtype=mask.dtype)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        REFERENCE_VISIBLE.clear()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, past_key_values=full, position_ids=positions[:, :prompt_len]).logits
        torch.testing.assert_close(logits[:, -1], recorder.logits[0], atol=1e-4, rtol=0)
        for step in range(1, new_tokens):
            column = prompt_len + step - 1  # position of the token fed at this step
            for layer in range(layers):
                resident = recorder.resident[step - 1][layer]
                heads = resident[0].shape[0] if resident[0].dim() == 2 else 1
                visible = torch.zeros(ids.shape[0], heads, column + 1, dtype=torch.bool)
                for row, held in enumerate(resident):
                    visible[row].scatter_(-1, held.view(heads, -1), True)
                visible[:, :, column] = True
                REFERENCE_VISIBLE[layer] = visible
            with torch.no_grad():
                logits = model(
                    out[:, column : column + 1], attention_mask=full_mask[:, : column + 1], past_key_values=full,
                    position_ids=positions[:, column : column + 1],
                ).logits
            torch.testing.assert_close(logits[:, -1], recorder.logits[step], atol=1e-4, rtol=0, msg=f"step {step}")
    finally:
        model.config._attn_implementation = "sdpa"
        REFERENCE_VISIBLE.clear()
    return cache.stats.compactions


@pytest.mark.parametrize("scorer", ["h2o", "snapkv", "rkv", "tova", "streamingllm", "window", "random"])
def test_logits_equal_masked_full_cache(scorer: str) -> None:
    model = tiny_model("llama", "sdpa")
    ids, mask = left_padded_batch([10, 6])
    config = CompressionConfig(budget=32, window=6, keep_ratio=0.5)
    kwargs = {"observation_window": 4} if scorer in ("snapkv", "rkv") else None
    cache = DynTSCache(model, config, scorer=scorer, scorer_kwargs=kwargs, eos_token_id=NO_EOS)
    evictions = _check_against_masked_full_cache(model, ids, mask, cache, new_tokens=40)
    assert evictions >= 4


@pytest.mark.parametrize("granularity", ["shared", "per_layer", "per_kv_head"])
@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_logits_equal_masked_full_cache_per_granularity(granularity: str, arch: str) -> None:
    model = tiny_model(arch, "eager")
    ids, mask = left_padded_batch([9, 5])
    config = CompressionConfig(budget=24, window=4, keep_ratio=0.5, granularity=granularity)
    cache = DynTSCache(model, config, scorer=PerHeadScorer(), eos_token_id=NO_EOS)
    assert _check_against_masked_full_cache(model, ids, mask, cache, new_tokens=30) >= 4
    held = cache.resident_positions(1)
    if granularity == "per_kv_head":
        assert held[0].shape[0] == 2 and not torch.equal(held[0][0], held[0][1])
    elif granularity == "per_layer":
        assert not torch.equal(cache.resident_positions(0)[0], held[0])


def test_sampling_runs_and_stays_bounded() -> None:
    model = tiny_model("qwen2", "sdpa")
    ids, mask = left_padded_batch([8, 8, 3])
    cache = DynTSCache(model, CompressionConfig(budget=32, window=8, keep_ratio=0.4), scorer="snapkv", eos_token_id=NO_EOS,
                       scorer_kwargs={"observation_window": 8})
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=True, temperature=0.8, top_p=0.95,
                         past_key_values=cache, eos_token_id=None, pad_token_id=0)
    assert out.shape == (3, 8 + 60)
    assert max(max(row) for row in list(cache.stats.history)) <= 32


# ---------------------------------------------------------------------- memory bound over a long decode
def test_long_decode_physical_length_and_allocation_bounded() -> None:
    model = tiny_model("llama", "sdpa")
    ids, mask = left_padded_batch([40, 17])
    budget, window = 256, 64
    config = CompressionConfig(budget=budget, window=window, keep_ratio=0.3)
    cache = DynTSCache(model, config, scorer="h2o", eos_token_id=NO_EOS)
    allocated: list[int] = []

    class Probe(LogitsProcessor):
        def __call__(self, input_ids, scores):
            allocated.append(cache.stats.allocated_kv_bytes)
            return scores

    model.generate(ids, attention_mask=mask, max_new_tokens=2000, past_key_values=cache,
                   logits_processor=LogitsProcessorList([Probe()]), **GENERATE)
    history = list(cache.stats.history)
    assert len(history) == 2000
    # Documented bound: the physical length never exceeds the budget (no protected overflow here).
    assert max(max(row) for row in history) <= budget
    # Saw-tooth: right after a compaction a row holds window + floor(keep_ratio * (budget - window)) tokens.
    assert min(row[0] for row in history[300:]) == window + int(0.3 * (budget - window))
    assert cache.stats.compactions >= 2 * 10
    assert len(set(allocated)) == 1, "the buffers were reallocated during decoding"
    assert cache.stats.reallocations == 0


# ---------------------------------------------------------------------- ragged rows, finished rows
class ForceEos(LogitsProcessor):
    def __init__(self, row: int, step: int, eos: int) -> None:
        self.row, self.step, self.eos, self.calls = row, step, eos, 0

    def __call__(self, input_ids, scores):
        if self.calls == self.step:
            scores[self.row] = float("-inf")
            scores[self.row, self.eos] = 0.0
        self.calls += 1
        return scores


def test_ragged_rows_evict_independently_and_finished_row_stops_growing() -> None:
    model = tiny_model("llama", "sdpa")
    ids, mask = left_padded_batch([30, 12, 21])
    config = CompressionConfig(budget=48, window=8, keep_ratio=0.5, protect_prompt=False)
    cache = DynTSCache(model, config, scorer="h2o", eos_token_id=2)
    model.generate(ids, attention_mask=mask, max_new_tokens=120, past_key_values=cache, do_sample=False,
                   pad_token_id=0, eos_token_id=2, logits_processor=LogitsProcessorList([ForceEos(2, 70, 2)]))
    history = list(cache.stats.history)
    drops = {row: [step for step in range(1, len(history)) if history[step][row] < history[step - 1][row]]
             for row in range(3)}
    assert drops[0] and drops[1]
    assert drops[0][0] != drops[1][0], "rows of different lengths must reach the budget at different steps"
    # Row 2 emitted EOS at step 70: the EOS is fed at step 71 and stored; after that the row holds still.
    frozen = [row[2] for row in history[72:]]
    assert len(set(frozen)) == 1
    assert history[71][2] == history[70][2] + 1


# ---------------------------------------------------------------------- exact kept set
@pytest.mark.parametrize("granularity", ["shared", "per_layer", "per_kv_head"])
def test_prompt_and_answer_tokens_are_never_evicted(granularity: str) -> None:
    model = tiny_model("llama", "sdpa")
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    think_end, marker_step = 5, 150
    config = CompressionConfig(budget=40, window=5, keep_ratio=0.5, think_end=(think_end,), granularity=granularity)
    cache = DynTSCache(model, config, scorer=PerHeadScorer(), eos_token_id=NO_EOS)
    model.generate(prompt, max_new_tokens=170, past_key_values=cache,
                   logits_processor=LogitsProcessorList([ForceToken(marker_step, think_end)]), **GENERATE)
    assert cache.stats.compactions >= 5
    answer_start = 6 + marker_step  # logical position of the marker
    last = 6 + 170 - 2  # the last generated token is never fed back
    for layer in range(2):
        held = cache.resident_positions(layer)[0]
        for head_positions in (held if held.dim() == 2 else held.unsqueeze(0)):
            kept = set(head_positions.tolist())
            assert set(range(6)) <= kept, "prompt tokens must stay"
            assert set(range(answer_start, last + 1)) <= kept, "everything from the end of thinking on must stay"


def test_kept_set_exact_after_one_compaction() -> None:
    """One compaction, checked slot by slot: protected + window + top-k(score) for each layer and head."""
    for granularity in ("shared", "per_layer", "per_kv_head"):
        model = tiny_model("llama", "sdpa")
        prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
        budget, window, ratio = 30, 4, 0.5
        config = CompressionConfig(budget=budget, window=window, keep_ratio=ratio, granularity=granularity)
        scorer = PerHeadScorer()
        cache = DynTSCache(model, config, scorer=scorer, eos_token_id=NO_EOS)
        # 5 prompt tokens + 25 decode steps reach the budget: exactly one compaction, of positions 0..29.
        model.generate(prompt, max_new_tokens=budget - 5 + 1, past_key_values=cache, **GENERATE)
        assert cache.stats.compactions == 1
        positions = torch.arange(budget).float()
        layers = torch.arange(2).view(-1, 1, 1).float()
        heads = torch.arange(2).view(1, -1, 1).float()
        expected_scores = torch.sin(positions * 1.7 + layers * 0.9 + heads * 2.3)  # [layer, head, pos]
        if granularity == "shared":
            expected_scores = expected_scores.mean(dim=(0, 1), keepdim=True).expand(2, 2, -1)
        elif granularity == "per_layer":
            expected_scores = expected_scores.mean(dim=1, keepdim=True).expand(2, 2, -1)
        quota = int(ratio * (budget - window))
        for layer in range(2):
            held = cache.resident_positions(layer)[0]
            held = held if held.dim() == 2 else held.unsqueeze(0).expand(2, -1)
            for head in range(2):
                older_scores = expected_scores[layer, head, 5 : budget - window]
                top = (older_scores.topk(quota - 5).indices + 5).tolist()
                expected = set(range(5)) | set(range(budget - window, budget)) | set(top)
                got = held[head].tolist()
                assert got == sorted(expected), (granularity, layer, head)


# ---------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_parameter() -> None:
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        DynTSCache(model, CompressionConfig(budget=16, window=4), scorer="nope", eos_token_id=NO_EOS)
    with pytest.raises(ValueError, match=r"think_end token id 500 is not in the vocabulary \(allowed range 0..96\)"):
        DynTSCache(model, CompressionConfig(budget=16, window=4, think_end=(500,)), eos_token_id=NO_EOS)
    with pytest.raises(ValueError, match="observation_window"):
        cache = DynTSCache(model, CompressionConfig(budget=16, window=4), scorer="snapkv", eos_token_id=NO_EOS)
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, past_key_values=cache, **GENERATE)


def test_padding_anywhere_is_skipped_like_plain_generate() -> None:
    """Padding is not only on the left (a right-padded prompt, padding between turns): the cache keeps only the real
    columns and gives the tokens plain generate gives, which stores the padding but masks it."""
    model = tiny_model("llama", "sdpa")
    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 14, 15]])
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GENERATE)
    cache = DynTSCache(model, CompressionConfig(budget=16, window=4), scorer="h2o", eos_token_id=NO_EOS)
    compressed = model.generate(ids, attention_mask=mask, max_new_tokens=6, past_key_values=cache, **GENERATE)
    assert torch.equal(plain, compressed)
    assert cache.physical_len == [4 + 5, 4 + 5]  # the real prompt columns and the fed generated ones


class WrongShapeScorer(Scorer):
    name = "wrong-shape"

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros(3, rows.numel(), 1, self.slots.capacity)


def test_scorer_shape_mismatch_is_reported() -> None:
    model = tiny_model("llama", "sdpa")
    cache = DynTSCache(model, CompressionConfig(budget=8, window=2), scorer=WrongShapeScorer(), eos_token_id=NO_EOS)
    with pytest.raises(ValueError, match=r"scorer output has 3 layers x 1 heads; expected 1 or 2 layers"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=12, past_key_values=cache, **GENERATE)


class NaNInRowOneScorer(Scorer):
    """Recency, but NaN for every slot of row 1."""

    name = "nan-in-row-one"

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        scores = self.slots.positions[:, rows].double()
        scores[:, rows == 1] = float("nan")
        return scores


def test_nan_scores_raise_and_the_compaction_moves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compaction queues its moves before it reads the plan back; with NaN scores in one row, the error comes
    from that read, and no row (not the clean one either) lost or moved anything: K/V, positions and lengths are
    as they were."""
    from dynts.compressor import DenseCompressor

    model = tiny_model("llama", "sdpa")
    cache = DynTSCache(model, CompressionConfig(budget=8, window=2), scorer=NaNInRowOneScorer(), eos_token_id=NO_EOS)
    before = []
    compact = DenseCompressor.compact

    def state(compressor: DenseCompressor) -> list:
        tensors = (compressor.kv.keys, compressor.kv.values, compressor.slots.positions, compressor.slots.physical_len)
        return [tensor.clone() for tensor in tensors] + [list(compressor.slots.physical_len_host)]

    def compact_after_snapshot(self, rows, ahead=None):
        before.append((rows, state(self)))
        return compact(self, rows, ahead)

    monkeypatch.setattr(DenseCompressor, "compact", compact_after_snapshot)
    with pytest.raises(ValueError, match=r"NaN \(compacted rows \[1\]\)"):
        model.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), max_new_tokens=12, past_key_values=cache, **GENERATE)
    [(rows, snapshot)] = before
    assert rows == [0, 1]
    for old, now in zip(snapshot, state(cache.compressor)):
        assert torch.equal(old, now) if isinstance(old, torch.Tensor) else old == now


def test_hooks_do_not_affect_other_caches() -> None:
    model = tiny_model("llama", "sdpa")
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = model.generate(ids, max_new_tokens=10, **GENERATE)
    cache = DynTSCache(model, CompressionConfig(budget=6, window=2), scorer="h2o", eos_token_id=NO_EOS)
    model.generate(ids, max_new_tokens=10, past_key_values=cache, **GENERATE)
    assert torch.equal(model.generate(ids, max_new_tokens=10, **GENERATE), plain)
    cache.detach()
    assert torch.equal(model.generate(ids, max_new_tokens=10, **GENERATE), plain)


def test_protected_overflow_warns_once_and_keeps_every_protected_token() -> None:
    model = tiny_model("llama", "sdpa")
    prompt = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(5))
    cache = DynTSCache(model, CompressionConfig(budget=16, window=4), scorer="window", eos_token_id=NO_EOS)
    with pytest.warns(RuntimeWarning, match="protected tokens") as record:
        model.generate(prompt, max_new_tokens=30, past_key_values=cache, **GENERATE)
    assert sum("protected tokens" in str(warning.message) for warning in record) == 1
    held = cache.resident_positions(0)[0].tolist()
    assert held[:20] == list(range(20))
    # Bounded all the same: protected + window + the usual growth between compactions (16 - (4 + 3)).
    history = [row[0] for row in list(cache.stats.history)]
    assert max(history) <= 20 + 4 + 9
    assert cache.stats.compactions == sum(1 for a, b in zip(history, history[1:]) if b < a) + 1  # + the prefill one
    assert cache.stats.compactions <= 1 + 29 // 9 + 1
    with pytest.raises(ValueError, match=r"layer_idx 5 is not a compressed full-attention layer; allowed: \[0, 1\]"):
        cache.resident_positions(5)

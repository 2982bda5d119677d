"""DynTSCache across the ways generate is really called: its own EOS ids, several calls on one cache (multi-turn),
chunked prefill, loops without torch.no_grad, and the bound on a row's physical length in every configuration.

The reference is always plain HF: ``generate`` with a ``DynamicCache`` (reused across calls for multi-turn), where
nothing is evicted; where something is evicted, what the cache must hold is stated explicitly."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from dynts import CompressionConfig, DynTSCache
from dynts.policy import compacted_length
from tiny_models import VOCAB, left_padded_batch, tiny_model

EOS, PAD = 2, 0
BIG = CompressionConfig(budget=512, window=4)  # never reached: the cache must then equal plain generate


class ForceRowToken(LogitsProcessor):
    """Makes row ``row`` emit ``token`` at generation step ``step`` (other rows and steps untouched)."""

    def __init__(self, row: int, step: int, token: int) -> None:
        self.row, self.step, self.token, self.calls = row, step, token, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.calls == self.step:
            scores[self.row] = float("-inf")
            scores[self.row, self.token] = 0.0
        self.calls += 1
        return scores


def _generate(model, ids, mask, cache, new_tokens, **kwargs):
    kwargs.setdefault("pad_token_id", PAD)
    return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False,
                          **kwargs)


# ---------------------------------------------------------------------- EOS ids follow the generate call
@pytest.mark.parametrize("call_eos", [None, [7]], ids=["eos-none-forces-length", "narrower-list"])
def test_cache_follows_the_eos_ids_of_the_generate_call(call_eos) -> None:
    """The model's generation config says EOS = 2; this call stops on other ids. A row that emits 2 goes on in
    generate, so the cache must go on storing it: same tokens as plain generate (nothing evicted)."""
    model = tiny_model("llama")
    assert model.generation_config.eos_token_id == EOS
    ids, mask = left_padded_batch([9, 6])
    processors = lambda: LogitsProcessorList([ForceRowToken(0, 3, EOS)])  # noqa: E731
    plain = _generate(model, ids, mask, None, 16, eos_token_id=call_eos, logits_processor=processors())
    cache = DynTSCache(model, BIG, scorer="h2o")
    ours = _generate(model, ids, mask, cache, 16, eos_token_id=call_eos, logits_processor=processors())
    assert (plain[0, ids.shape[1]:] == EOS).any()
    assert torch.equal(plain, ours)
    assert cache.physical_len == [9 + 15, 6 + 15] and not any(cache.compressor.tracker.finished)


def test_rows_finish_exactly_when_generate_finishes_them() -> None:
    model = tiny_model("llama")
    ids, mask = left_padded_batch([9, 6])
    processors = lambda: LogitsProcessorList([ForceRowToken(1, 4, EOS)])  # noqa: E731
    plain = _generate(model, ids, mask, None, 12, logits_processor=processors())
    cache = DynTSCache(model, BIG, scorer="window")
    ours = _generate(model, ids, mask, cache, 12, logits_processor=processors())
    assert torch.equal(plain, ours)
    assert cache.compressor.tracker.finished == [False, True]
    assert cache.physical_len[1] == 6 + 5  # the prompt, 4 tokens, and the EOS fed after them: nothing after it


def test_a_cache_eos_that_contradicts_the_call_is_refused_at_the_call_start() -> None:
    model = tiny_model("llama")
    ids, mask = left_padded_batch([5])
    cache = DynTSCache(model, BIG, scorer="window", eos_token_id=[EOS])
    with pytest.raises(ValueError, match=r"DynTSCache\(eos_token_id=\[2\]\) but this generate call stops rows on "
                                         r"eos_token_id=None"):
        _generate(model, ids, mask, cache, 4, eos_token_id=None)
    assert cache.compressor.tracker is None  # refused before anything ran


def test_a_finished_row_fed_a_real_token_is_an_error_in_a_manual_loop() -> None:
    model = tiny_model("llama")
    cache = DynTSCache(model, BIG, scorer="window", eos_token_id=[EOS], pad_token_id=PAD)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), past_key_values=cache)
        model(torch.tensor([[EOS]]), past_key_values=cache)  # the row finishes on its EOS
        model(torch.tensor([[PAD]]), past_key_values=cache)  # padding is fine
        with pytest.raises(ValueError, match=r"row 0 finished .* fed token 9 at column 5, not the pad token \(0\)"):
            model(torch.tensor([[9]]), past_key_values=cache)


# ---------------------------------------------------------------------- several generate calls on one cache
def _two_turns(model, cache, first_processors=None, second_tokens=None, first_len=8, second_len=8):
    """Turn 1 on a ragged batch; turn 2 on (turn 1's output + new tokens), masking turn 1's padding (after EOS)."""
    ids, mask = left_padded_batch([9, 6, 7], seed=2)
    out1 = _generate(model, ids, mask, cache, first_len, logits_processor=first_processors or LogitsProcessorList())
    generated = out1[:, ids.shape[1]:]
    after_eos = (generated == EOS).long().cumsum(1) - (generated == EOS).long() > 0  # columns after a row's EOS
    mask1 = torch.cat([mask, (~after_eos).long()], dim=1)
    if second_tokens is None:
        second_tokens = torch.randint(3, VOCAB, (ids.shape[0], 5), generator=torch.Generator().manual_seed(5))
    ids2 = torch.cat([out1, second_tokens], dim=1)
    mask2 = torch.cat([mask1, torch.ones_like(second_tokens)], dim=1)
    out2 = _generate(model, ids2, mask2, cache, second_len)
    return out1, out2, ids2.shape[1]


@pytest.mark.parametrize("finish", [False, True], ids=["no-eos-in-turn-1", "a-row-ends-turn-1-with-eos"])
def test_a_second_generate_call_equals_a_reused_dynamic_cache(finish: bool) -> None:
    model = tiny_model("llama")
    processors = (lambda: LogitsProcessorList([ForceRowToken(1, 2, EOS)])) if finish else (lambda: None)  # noqa: E731
    ref1, ref2, _ = _two_turns(model, DynamicCache(config=model.config), processors())
    cache = DynTSCache(model, BIG, scorer="h2o")
    out1, out2, input_len = _two_turns(model, cache, processors())
    assert torch.equal(ref1, out1) and torch.equal(ref2, out2)
    assert (out1[1, -6:] == EOS).any() == finish
    assert not any(cache.compressor.tracker.finished)  # the finished row continued in turn 2
    assert cache.compressor.tracker.calls == 2


def test_an_end_of_turn_eos_inside_the_new_input_does_not_finish_the_row() -> None:
    """Chat templates end each turn with the EOS id: inside a call's input it is text, not the end."""
    model = tiny_model("llama")
    second = torch.tensor([[EOS, 8, 9, 10, 11]] * 3)
    ref1, ref2, _ = _two_turns(model, DynamicCache(config=model.config), second_tokens=second)
    cache = DynTSCache(model, BIG, scorer="window")
    out1, out2, input_len = _two_turns(model, cache, second_tokens=second)
    assert torch.equal(ref2, out2)
    assert cache.physical_len[0] == input_len + 7  # every real column of both calls, the new EOS included


def test_each_call_input_is_protected_like_a_prompt_under_eviction() -> None:
    model = tiny_model("llama")
    config = CompressionConfig(budget=40, window=4, keep_ratio=0.25)
    cache = DynTSCache(model, config, scorer="window")
    out1, out2, input_len = _two_turns(model, cache, first_len=30, second_len=40)
    tracker = cache.compressor.tracker
    for row, resident in enumerate(cache.resident_positions(0)):
        held = set(resident.tolist())
        turn2_input = set(range(out1.shape[1], input_len))
        assert turn2_input <= held, f"row {row}: the second call's input was evicted"
        assert (out1.shape[1], input_len) in tracker.protected_spans[row] or any(
            start <= out1.shape[1] and input_len <= stop for start, stop in tracker.protected_spans[row])
    assert cache.stats.compactions >= 3


def test_a_mask_that_unmasks_columns_the_cache_never_kept_is_refused() -> None:
    """A row's tokens after its EOS are never kept; a next call whose mask marks them real cannot be served exactly."""
    model = tiny_model("llama")
    cache = DynTSCache(model, BIG, scorer="window")
    ids, mask = left_padded_batch([6, 6])
    out1 = _generate(model, ids, mask, cache, 6, logits_processor=LogitsProcessorList([ForceRowToken(0, 1, EOS)]))
    ids2 = torch.cat([out1, torch.tensor([[8, 9], [8, 9]])], dim=1)
    with pytest.raises(ValueError, match=r"marks as real some earlier columns this cache never kept .* row 0: columns \[8"):
        _generate(model, ids2, torch.ones_like(ids2), cache, 3)  # generate drops an all-ones mask: None is all real


# ---------------------------------------------------------------------- chunked prefill
def test_chunked_prefill_protects_the_whole_prompt_and_ignores_eos_inside_it() -> None:
    model = tiny_model("llama")
    ids, mask = left_padded_batch([13, 10], seed=7)
    ids[:, -4] = EOS  # an EOS id inside the prompt (an earlier turn's end, say)
    plain = _generate(model, ids, mask, None, 8)
    cache = DynTSCache(model, BIG, scorer="h2o")
    chunked = _generate(model, ids, mask, cache, 8, prefill_chunk_size=4)
    assert torch.equal(plain, chunked)
    assert not any(cache.compressor.tracker.finished)
    assert [spans[0] for spans in cache.compressor.tracker.protected_spans] == [(0, 13), (3, 13)]

    small = CompressionConfig(budget=20, window=4, keep_ratio=0.25)
    cache = DynTSCache(model, small, scorer="window")
    _generate(model, ids, mask, cache, 24, prefill_chunk_size=4)
    for row, resident in enumerate(cache.resident_positions(0)):
        prompt = set(range(13)) & set(torch.nonzero(mask[row]).flatten().tolist())
        assert prompt <= set(resident.tolist()), f"row {row} lost prompt tokens"


# ---------------------------------------------------------------------- gradients enabled
@pytest.mark.parametrize("scorer", ["h2o", "snapkv", "predictor-like"])
def test_a_manual_loop_without_no_grad_gives_the_no_grad_logits(scorer: str) -> None:
    from dynts.scorers import ExternalScorer, get_scorer

    def make():
        if scorer == "predictor-like":
            weights = torch.nn.Linear(64, 1)  # has parameters that require grad
            return ExternalScorer(lambda hidden, ids: weights(hidden).squeeze(-1))
        return get_scorer(scorer, **({"observation_window": 2} if scorer == "snapkv" else {}))

    model = tiny_model("llama")
    config = CompressionConfig(budget=12, window=3, keep_ratio=0.5)
    runs = []
    for grad in (True, False):
        cache = DynTSCache(model, config, scorer=make(), eos_token_id=[])
        with torch.set_grad_enabled(grad):
            logits = model(torch.tensor([[4, 5, 6, 7]]), past_key_values=cache).logits
            steps = [logits[:, -1]]
            for _ in range(20):
                logits = model(logits[:, -1:].argmax(-1), past_key_values=cache).logits
                steps.append(logits[:, -1])
        runs.append(torch.stack(steps).detach())
        assert cache.stats.compactions >= 2
    torch.testing.assert_close(runs[0], runs[1])


# ---------------------------------------------------------------------- the bound on the physical length
@pytest.mark.parametrize("protect_prompt", [False, True])
def test_the_documented_bound_holds_with_a_prompt_longer_than_the_budget(protect_prompt: bool) -> None:
    """After every forward pass a row holds fewer than ``budget`` tokens, unless its protected tokens alone exceed the
    keep quota; then fewer than window + protected + the usual gap (docs/ARCHITECTURE.md, dynts.policy)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch([49, 30, 80], seed=1)
    config = CompressionConfig(budget=40, window=8, keep_ratio=0.5, protect_prompt=protect_prompt)
    cache = DynTSCache(model, config, scorer="h2o", eos_token_id=[])
    with pytest.warns(RuntimeWarning, match="exceed the keep quota") if protect_prompt else _no_warning():
        _generate(model, ids, mask, cache, 60, eos_token_id=None)
    gap = config.budget - compacted_length(config, config.budget)
    prompts = mask.sum(1).tolist()
    for step, lengths in enumerate(cache.stats.history):
        for row, length in enumerate(lengths):
            bound = config.budget if not protect_prompt or prompts[row] <= 16 else config.window + prompts[row] + gap
            assert length < bound, f"step {step}, row {row}: {length} tokens held, bound {bound}"
    assert len(cache.stats.history) == 60


class _no_warning:
    def __enter__(self):
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)
        return False


def test_stats_history_is_a_bounded_ring() -> None:
    model = tiny_model("llama")
    cache = DynTSCache(model, CompressionConfig(budget=16, window=4), scorer="window", eos_token_id=[], history_limit=5)
    _generate(model, torch.tensor([[3, 4, 5]]), None, cache, 30, eos_token_id=None)
    assert len(cache.stats.history) == 5 and cache.stats.steps == 30
    assert cache.stats.peak_resident_tokens < 16 and 0 < cache.stats.mean_resident_tokens < 16


def test_fixed_budget_mode_holds_at_most_budget_plus_buffer_and_compacts_down_to_budget() -> None:
    """R-KV / kvpress style: a row grows to budget + buffer, then is brought back to exactly the budget."""
    model = tiny_model("llama")
    config = CompressionConfig(budget=20, window=4, budget_mode="fixed", buffer=6, protect_prompt=False)
    cache = DynTSCache(model, config, scorer="h2o", eos_token_id=[])
    _generate(model, torch.tensor([[3, 4, 5, 6]]), None, cache, 60, eos_token_id=None)
    lengths = [row[0] for row in cache.stats.history]
    assert max(lengths) == 25 and cache.stats.compactions >= 7
    after = [b for a, b in zip(lengths, lengths[1:]) if b < a]
    assert after and set(after) == {20}

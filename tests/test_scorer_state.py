"""Every stateful scorer's state, at every step of a run with several compactions and ragged left padding, against an
independent reference: a full HF cache with eager attention that hides exactly the evicted tokens.

The logits of such a run can stay exact while a keep-set is wrong (a scorer reading stale state still produces a
valid, only worse, keep-set), so this checks the state itself:

* the state each resident token carries (H2O: the attention it received since it entered, from the reference's
  ``output_attentions``; per-token scores: the score of its own hidden state; SepLLM: whether it is a separator);
* the query-window scorers (SnapKV, TOVA, R-KV) keep no per-token state: their scores at each compaction are
  recomputed from the reference's raw attention logits (and, for R-KV's redundancy, the full cache's keys) over the
  tokens resident then;
* at each compaction, the kept set equals protected + window + the top of the reference scores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference_attention import REFERENCE, REFERENCE_LOGITS, REFERENCE_VISIBLE
from transformers import DynamicCache

from dynts import CompressionConfig, DynTSCache
from dynts.policy import keep_quota
from dynts.scorers import ExternalScorer, get_scorer
from tiny_models import VOCAB, left_padded_batch, tiny_model

LENGTHS = [9, 4, 7]  # ragged rows, left padded
CONFIG = CompressionConfig(budget=24, window=6, keep_ratio=0.5)  # compacted length 6 + 9 = 15: a gap of 9 steps
STEPS = 44  # each row is compacted 3-4 times
OBSERVATION = 4
RKV_THRESHOLD = 0.1  # below R-KV's 0.5, so that this tiny model's keys have near-duplicates to retain
SEPARATORS = [5, 11, 17, 23, 29, 31, 37, 41, 43, 47]
HIDDEN_WEIGHTS = torch.linspace(-1.0, 1.0, 64)  # the external scorer: a fixed linear function of the hidden state


class ReferenceRun:
    """The same model on a full DynamicCache with the masked eager reference attention; records, per logical
    column, what every layer's attention did and the final-norm hidden state."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, total: int) -> None:
        self.model, self.rows = model, ids.shape[0]
        config = model.config
        self.layers, self.q_heads, self.kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
        self.cache = DynamicCache(config=config)
        self.received = torch.zeros(self.layers, self.rows, self.kv_heads, total, dtype=torch.float64)
        self.logits = torch.full((self.layers, self.rows, self.q_heads, total, total), float("nan"), dtype=torch.float64)
        self.hidden = torch.zeros(self.rows, total, config.hidden_size, dtype=torch.float64)
        self.tokens = torch.zeros(self.rows, total, dtype=torch.long)
        self.real = torch.zeros(self.rows, total, dtype=torch.bool)

    def step(self, ids, mask, positions, first: int, visible: list[list[int]] | None) -> None:
        """Feed columns [first, first + new): ``visible`` (per row, the earlier columns it may see) or None (all)."""
        new = ids.shape[1]
        REFERENCE_VISIBLE.clear()
        if visible is not None:
            table = torch.zeros(self.rows, 1, first + new, dtype=torch.bool)
            for row, columns in enumerate(visible):
                table[row, 0, columns] = True
            table[:, :, first:] = True
            for layer in range(self.layers):
                REFERENCE_VISIBLE[layer] = table
        saved = self.model.config._attn_implementation
        self.model.config._attn_implementation = REFERENCE
        try:
            with torch.no_grad():
                out = self.model(ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                                 output_attentions=True, output_hidden_states=True)
        finally:
            self.model.config._attn_implementation = saved
            REFERENCE_VISIBLE.clear()
        real = mask[:, first:].bool()
        group = self.q_heads // self.kv_heads
        for layer, probs in enumerate(out.attentions):  # [rows, q_heads, new, first + new]
            counted = probs.double() * real.view(self.rows, 1, new, 1)  # padding queries are not queries
            per_kv = counted.view(self.rows, self.kv_heads, group, new, -1).sum(dim=(2, 3))
            self.received[layer, :, :, : first + new] += per_kv
            self.logits[layer, :, :, first : first + new, : first + new] = REFERENCE_LOGITS[layer].double()
        self.hidden[:, first : first + new] = out.hidden_states[-1].double()
        self.tokens[:, first : first + new] = ids
        self.real[:, first : first + new] = real

    # ------------------------------------------------------------------ reference scores over a resident set
    def window_attention(self, row: int, resident: list[int], queries: list[int]) -> torch.Tensor:
        """[layers, kv_heads, len(resident)]: the softmax attention each of ``queries`` pays over the resident
        columns it can see (causal), summed over the queries, averaged over each GQA group."""
        group = self.q_heads // self.kv_heads
        columns = torch.tensor(resident)
        total = torch.zeros(self.layers, self.kv_heads, len(resident), dtype=torch.float64)
        for query in queries:
            logits = self.logits[:, row, :, query][:, :, columns]  # [layers, q_heads, n]
            logits = logits.masked_fill(columns.view(1, 1, -1) > query, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            total += probs.view(self.layers, self.kv_heads, group, -1).mean(dim=2)
        return total


def _reference_scores(name: str, run: ReferenceRun, row: int, resident: list[int]) -> torch.Tensor:
    """[len(resident)] the score the policy ranks by (averaged over layers and KV heads: granularity 'shared')."""
    columns = torch.tensor(resident)
    if name == "h2o":
        return run.received[:, row, :, columns].mean(dim=(0, 1))
    if name == "external":
        return run.hidden[row, columns] @ HIDDEN_WEIGHTS.double()
    if name == "sepllm":
        start = int(run.real[row].float().argmax())
        is_sink = columns < start + 4
        is_separator = torch.isin(run.tokens[row, columns], torch.tensor(SEPARATORS))
        return (is_sink.double() * 2 + is_separator.double()) * 2.0**40 + columns.double()
    if name.startswith("rkv"):
        return _rkv_reference(run, row, resident, lam=0.0 if name == "rkv-redundancy" else 0.1)
    real_columns = [column for column in resident if run.real[row, column]]
    window = OBSERVATION if name == "snapkv" else 1
    queries = real_columns[-window:]
    attention = run.window_attention(row, resident, queries)  # [layers, kv_heads, n]
    if name == "tova":
        return attention.mean(dim=(0, 1))
    pooled = F.max_pool1d(attention.reshape(-1, 1, len(resident)), 7, stride=1, padding=3).view_as(attention)
    return pooled.mean(dim=(0, 1))  # snapkv


def _rkv_reference(run: ReferenceRun, row: int, resident: list[int], lam: float = 0.1) -> torch.Tensor:
    """R-KV as its paper and code define it (see dynts/scorers/rkv.py), written out plainly over the reference's
    raw logits and the full cache's own keys."""
    length = len(resident)
    older = length - min(CONFIG.window, length)
    group = run.q_heads // run.kv_heads
    queries = [column for column in resident if run.real[row, column]][-OBSERVATION:]
    total = torch.zeros(length, dtype=torch.float64)
    for layer in range(run.layers):
        keys = run.cache.layers[layer].keys[row, :, resident].double()  # [kv_heads, n, dim]
        for head in range(run.kv_heads):
            importance = torch.zeros(length, dtype=torch.float64)
            for query in queries:
                logits = run.logits[layer, row, head * group : (head + 1) * group, query][:, resident].amax(dim=0)
                importance[:older] += torch.softmax(logits[:older], dim=0) / len(queries)
            pooled = torch.zeros(length, dtype=torch.float64)
            for slot in range(older):
                pooled[slot] = importance[max(0, slot - 3) : min(older, slot + 4)].max()
            unit = keys[head] / keys[head].norm(dim=-1, keepdim=True)
            similarity = unit @ unit.T
            similarity.fill_diagonal_(0.0)
            for i in range(length):
                similar = [j for j in range(length) if similarity[i, j] > RKV_THRESHOLD]
                if similar:
                    similarity[i, max(similar)] = 0.0
            redundancy = torch.softmax(similarity.mean(dim=0), dim=0)
            total += lam * pooled - (1 - lam) * redundancy
    return total / (run.layers * run.kv_heads)


def _expected_keep(scores: torch.Tensor, resident: list[int], protected: set[int], config: CompressionConfig) -> set[int]:
    """protected + window + the top of the scores among the other older tokens (ties: the more recent)."""
    length = len(resident)
    window = min(config.window, length)
    older = resident[: length - window]
    quota = keep_quota(config, len(older))
    forced = [column for column in older if column in protected]
    candidates = sorted((column for column in older if column not in protected),
                        key=lambda column: (-float(scores[resident.index(column)]), -column))
    return set(forced) | set(resident[length - window:]) | set(candidates[: max(0, quota - len(forced))])


def _check_state(name: str, cache: DynTSCache, run: ReferenceRun, step: int) -> None:
    """The per-slot state every resident token carries, against the reference."""
    slots = cache.compressor.slots
    for row, resident in enumerate(cache.resident_positions(0)):
        columns = resident.tolist()
        length = len(columns)
        if name == "h2o":
            state = slots.state("h2o_attention_sum")[:, row, :, :length].double()
            want = run.received[:, row, :, columns]
        elif name == "external":
            state = slots.state("token_score")[0, row, 0, :length].double()
            want = run.hidden[row, columns] @ HIDDEN_WEIGHTS.double()
        elif name == "sepllm":
            state = slots.state("sepllm_is_separator")[0, row, 0, :length]
            want = torch.isin(run.tokens[row, columns], torch.tensor(SEPARATORS))
            assert torch.equal(state, want), f"step {step}, row {row}"
            continue
        else:
            return
        torch.testing.assert_close(state, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}, row {row}: {m}")


def _scorer(name: str):
    if name == "external":
        return ExternalScorer(lambda hidden, ids: hidden.float() @ HIDDEN_WEIGHTS)
    if name == "sepllm":
        return get_scorer("sepllm", separator_ids=SEPARATORS)
    if name == "snapkv":
        return get_scorer(name, observation_window=OBSERVATION)
    if name.startswith("rkv"):  # rkv-redundancy: lam 0, the redundancy term alone
        return get_scorer("rkv", observation_window=OBSERVATION, similarity_threshold=RKV_THRESHOLD,
                          lam=0.0 if name == "rkv-redundancy" else 0.1)
    return get_scorer(name)


@pytest.mark.parametrize("name", ["h2o", "snapkv", "tova", "rkv", "rkv-redundancy", "external", "sepllm"])
def test_state_and_keep_sets_equal_the_eager_reference_at_every_step(name: str) -> None:
    model = tiny_model("llama", "sdpa", seed=3)
    ids, mask = left_padded_batch(LENGTHS, seed=4)
    rows, prompt_len = ids.shape
    total = prompt_len + STEPS
    full_mask = torch.cat([mask, torch.ones(rows, STEPS, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynTSCache(model, CONFIG, scorer=_scorer(name), eos_token_id=[])
    run = ReferenceRun(model, ids, mask, total)
    protected = [set(range(prompt_len)) & set(torch.nonzero(mask[row]).flatten().tolist()) for row in range(rows)]

    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions[:, :prompt_len], past_key_values=cache).logits
    run.step(ids, mask, positions[:, :prompt_len], 0, None)
    _check_state(name, cache, run, 0)
    compactions = 0
    for step in range(1, STEPS):
        column = prompt_len + step - 1
        before = [held.tolist() for held in cache.resident_positions(0)]
        token = logits[:, -1].argmax(-1, keepdim=True)
        with torch.no_grad():
            logits = model(token, attention_mask=full_mask[:, : column + 1], position_ids=positions[:, column : column + 1],
                           past_key_values=cache).logits
        run.step(token, full_mask[:, : column + 1], positions[:, column : column + 1], column, before)
        _check_state(name, cache, run, step)
        after = [held.tolist() for held in cache.resident_positions(0)]
        for row in range(rows):
            held = before[row] + [column]
            if after[row] == held:
                continue
            compactions += 1
            scores = _reference_scores(name, run, row, held)
            expected = _expected_keep(scores, held, protected[row], CONFIG)
            if set(after[row]) != expected:
                # Only a tie within float noise may fall either way: the differing tokens score as the threshold.
                differing = torch.tensor([held.index(c) for c in set(after[row]) ^ expected])
                spread = scores[differing].max() - scores[differing].min()
                assert spread <= 1e-6 * max(1.0, float(scores.abs().max())), (
                    f"{name}: step {step}, row {row}: kept {sorted(after[row])}, expected {sorted(expected)}"
                )
    assert compactions >= 9, f"only {compactions} compactions: the run does not exercise slot reuse"

"""DynTSCache on hybrid models (Kimi Linear: MLA latents; Qwen3-Next: per-head K/V): only the attention layers
are compressed; the linear layers' conv and recurrent states are never touched by a compaction; every step's
logits equal a full-cache run whose attention layers hide exactly the evicted tokens."""

from __future__ import annotations

import pytest
import torch
from linear_attention_cases import transformers_torch_path
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import LinearAttentionLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from dynts import CompressionConfig, DynTSCache
from hybrid_configs import tiny_kimi_linear_config, tiny_qwen3_next_config

CONFIGS = {"kimi_linear": tiny_kimi_linear_config, "qwen3_next": tiny_qwen3_next_config}
GENERATE = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
VISIBLE: dict[int, torch.Tensor] = {}  # attention layer -> [rows, 1, keys] bool: keys the reference may see


def _masked_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention that also hides the keys VISIBLE[layer] marks invisible."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask[..., : key.shape[-2]]
    visible = VISIBLE.get(module.layer_idx)
    if visible is not None:
        logits = logits.masked_fill(~visible.unsqueeze(2), float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


AttentionInterface.register("dynts_hybrid_masked_reference", _masked_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("dynts_hybrid_masked_reference", eager_mask)


def tiny_hybrid(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[name](initializer_range=0.2)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


def linear_states(cache) -> list[torch.Tensor]:
    """Copies of every linear layer's conv and recurrent state (3 linear layers x 2 states once initialised)."""
    states = [tensor.clone() for layer in cache.layers if isinstance(layer, LinearAttentionLayer)
              for tensor in (*layer.conv_states.values(), *layer.recurrent_states.values())]
    assert len(states) == 6
    return states


class Recorder(LogitsProcessor):
    """After each forward: the logits and, per attention layer, the positions the cache holds for the next step."""

    def __init__(self, cache: DynTSCache):
        self.cache = cache
        self.logits: list[torch.Tensor] = []
        self.resident: list[dict[int, list[torch.Tensor]]] = []
        self.logical_len: list[int] = []

    def __call__(self, input_ids, scores):
        self.logits.append(scores.clone())
        self.resident.append({layer: [p.clone() for p in self.cache.resident_positions(layer)]
                              for layer in self.cache.storage_layer_of})
        self.logical_len.append(self.cache.get_seq_length())
        return scores


@pytest.mark.parametrize("name", ["kimi_linear", "qwen3_next"])
def test_compaction_leaves_linear_states_and_matches_masked_full_cache(name):
    model = tiny_hybrid(name)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    ids[1, :4] = 0  # left padding on the second row
    mask = (ids != 0).long()
    new_tokens = 30
    config = CompressionConfig(budget=20, window=4, keep_ratio=0.5, protect_prompt=False)  # prompt tokens leave too
    cache = DynTSCache(model, config, scorer="random", eos_token_id=[])
    attention_layers = sorted(cache.storage_layer_of)
    assert attention_layers == [3]

    # Compaction happens at the end of a step: snapshot the linear layers around it.
    compactions = []
    end_step = cache.compressor.end_step

    def checked_end_step(*args, **kwargs):
        before, evictions = linear_states(cache), cache.stats.compactions
        end_step(*args, **kwargs)
        if cache.stats.compactions > evictions:
            compactions.append(all(torch.equal(a, b) for a, b in zip(before, linear_states(cache))))

    cache.compressor.end_step = checked_end_step
    recorder = Recorder(cache)
    torch.manual_seed(0)
    with transformers_torch_path(model):  # CPU model: transformers' torch path even where fla is installed
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, past_key_values=cache,
                             logits_processor=LogitsProcessorList([recorder]), **GENERATE)
    assert len(compactions) >= 3 and all(compactions), compactions
    assert max(cache.physical_len) <= config.budget

    # Reference: a full HF cache (linear layers and attention layers uncompressed), teacher-forced on the same
    # tokens, the attention layers hiding exactly the tokens dynts had evicted at that step.
    model.config._attn_implementation = "dynts_hybrid_masked_reference"
    try:
        full = DynamicCache(config=model.config)
        full_mask = torch.cat([mask, torch.ones(2, new_tokens, dtype=mask.dtype)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        VISIBLE.clear()
        with torch.no_grad(), transformers_torch_path(model):
            logits = model(ids, attention_mask=mask, past_key_values=full, position_ids=positions[:, :10]).logits
            torch.testing.assert_close(logits[:, -1], recorder.logits[0], atol=1e-4, rtol=0)
            for step in range(1, new_tokens):
                column = 10 + step - 1
                for layer in attention_layers:
                    visible = torch.zeros(2, 1, column + 1, dtype=torch.bool)
                    for row, held in enumerate(recorder.resident[step - 1][layer]):
                        visible[row, 0, held] = True
                    visible[:, :, column] = True
                    VISIBLE[layer] = visible
                # Logical length (drives positions) comes from the attention layers, not the physical one.
                assert recorder.logical_len[step - 1] == full.get_seq_length() == column
                logits = model(out[:, column:column + 1], attention_mask=full_mask[:, :column + 1],
                               past_key_values=full, position_ids=positions[:, column:column + 1]).logits
                torch.testing.assert_close(logits[:, -1], recorder.logits[step], atol=1e-4, rtol=0,
                                           msg=f"step {step}")
    finally:
        model.config._attn_implementation = "sdpa"
        VISIBLE.clear()

"""transformers' Kimi Linear and Qwen3-Next served by dynts's kernels: same greedy tokens as HF's torch path."""

from __future__ import annotations

import pytest
import torch
from linear_attention_cases import transformers_torch_path
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.kimi_linear import modeling_kimi_linear
from transformers.models.qwen3_next import modeling_qwen3_next

from hybrid_configs import tiny_kimi_linear_config, tiny_qwen3_next_config

from dynts.integrations.hf_linear_attention import use_dynts_linear_attention

CONFIGS = {"kimi_linear": tiny_kimi_linear_config, "qwen3_next": tiny_qwen3_next_config}
SERVED = {
    "kimi_linear": {"chunk_kda", "fused_recurrent_kda"},
    "qwen3_next": {"chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"},
}


def tiny_model(name: str, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[name](initializer_range=0.2)  # peaked logits: greedy ties are unlikely
    return AutoModelForCausalLM.from_config(config).eval().to(device)


def greedy(model, prompt, new_tokens):
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("name", ["kimi_linear", "qwen3_next"])
def test_greedy_tokens_match_torch_fallback(device, name):
    model = tiny_model(name, device)
    prompt = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1)).to(device)
    with transformers_torch_path(model):
        reference_tokens, reference_scores = greedy(model, prompt, 3)
    with use_dynts_linear_attention(model) as backend:
        tokens, scores = greedy(model, prompt, 3)
        calls = {adapter.hub_name: adapter.calls for adapter in backend.served.values()}
    assert set(calls) == SERVED[name]
    assert all(count > 0 for count in calls.values()), calls  # prefill (chunk) and decode (recurrent) served
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(scores, reference_scores, atol=1e-4, rtol=1e-4)


def test_backend_switches_off_and_restores_transformers_functions():
    originals = (modeling_kimi_linear.chunk_kimi_delta_attention, modeling_kimi_linear.recurrent_kimi_delta_attention)
    model = tiny_model("kimi_linear")
    backend = use_dynts_linear_attention(model)
    assert modeling_kimi_linear.chunk_kimi_delta_attention is not originals[0]
    with pytest.raises(ValueError, match="already on"):
        use_dynts_linear_attention(model)
    backend.disable()
    assert (modeling_kimi_linear.chunk_kimi_delta_attention,
            modeling_kimi_linear.recurrent_kimi_delta_attention) == originals


def test_refuses_fla_options_it_does_not_implement():
    model = tiny_model("qwen3_next")
    with use_dynts_linear_attention(model):
        q = torch.zeros(1, 2, 1, 8)
        with pytest.raises(NotImplementedError, match="use_gate_in_kernel"):
            modeling_qwen3_next.torch_chunk_gated_delta_rule(q, q, q, g=torch.zeros(1, 2, 1),
                                                             beta=torch.zeros(1, 2, 1), use_gate_in_kernel=True)


def test_model_without_linear_attention_is_refused():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="no transformers linear-attention dispatch point"):
        use_dynts_linear_attention(model)


@pytest.mark.parametrize("name", ["kimi_linear", "qwen3_next"])
def test_tiny_configs_are_three_linear_to_one_attention(name):
    config = CONFIGS[name](num_hidden_layers=8)
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + \
        ["full_attention"]

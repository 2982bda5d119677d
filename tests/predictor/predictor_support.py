"""Helpers shared by the predictor tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dynts.evals.synthetic_task import VOCAB


def synthetic_vocab_model(seed: int = 0, hidden_size: int = 32) -> LlamaForCausalLM:
    """2 layers, 4 query heads over 2 KV heads, the synthetic task's vocabulary; random weights, fp32."""
    ids = {word: index for index, word in enumerate(VOCAB)}
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.3,
        bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"], tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()

"""Tiny HF decoders built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    Qwen3Config, Qwen3ForCausalLM,
)

VOCAB = 97
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_model(arch: str = "llama", attn: str = "sdpa", *, layers: int = 2, seed: int = 0, kv_heads: int = 2) -> torch.nn.Module:
    """A 2-layer decoder with GQA (4 query heads, ``kv_heads`` KV heads) and peaked logits (large init), in fp32."""
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=8192, initializer_range=0.3, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
        cls = LlamaForCausalLM
    elif arch == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=False)
        cls = Qwen2ForCausalLM
    elif arch == "qwen3":
        config = Qwen3Config(**common, head_dim=16, use_sliding_window=False)
        cls = Qwen3ForCausalLM
    elif arch == "mistral":
        config = MistralConfig(**common, sliding_window=None)
        cls = MistralForCausalLM
    else:
        raise ValueError(arch)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(config).eval()


def left_padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with 0: (input_ids, attention_mask)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


class ForceToken(LogitsProcessor):
    """Makes every row emit ``token`` at generation step ``step``; with ``only_then``, never at another step."""

    def __init__(self, step: int, token: int, *, only_then: bool = False) -> None:
        self.step, self.token, self.only_then, self.calls = step, token, only_then, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.calls == self.step:
            scores[:] = float("-inf")
            scores[:, self.token] = 0.0
        elif self.only_then:
            scores[:, self.token] = float("-inf")
        self.calls += 1
        return scores

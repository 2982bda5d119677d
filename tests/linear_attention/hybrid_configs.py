"""Tiny hybrid model configs for the tests: Kimi Linear (3 KDA : 1 MLA) and Qwen3-Next (3 Gated DeltaNet : 1 attention)."""

from __future__ import annotations

from transformers import KimiLinearConfig, Qwen3NextConfig


def _hybrid_layer_types(num_hidden_layers: int) -> list[str]:
    """Three linear-attention layers, then one full-attention layer, repeated."""
    if num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
    return ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(num_hidden_layers)]


def tiny_kimi_linear_config(num_hidden_layers: int = 4, linear_head_dim: int = 32, **overrides) -> KimiLinearConfig:
    """A tiny Kimi-Linear config: KDA and MLA layers 3:1, dense MLPs, fp32-friendly sizes (for tests and demos)."""
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        linear_num_heads=2,
        linear_head_dim=linear_head_dim,
        linear_conv_kernel_dim=4,
        layer_types=_hybrid_layer_types(num_hidden_layers),
        mlp_layer_types=["dense"] * num_hidden_layers,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return KimiLinearConfig(**fields)


def tiny_qwen3_next_config(num_hidden_layers: int = 4, linear_key_head_dim: int = 32, **overrides) -> Qwen3NextConfig:
    """A tiny Qwen3-Next config: Gated DeltaNet and gated attention layers 3:1, dense MLPs (tests and demos)."""
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=linear_key_head_dim,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        layer_types=_hybrid_layer_types(num_hidden_layers),
        mlp_only_layers=list(range(num_hidden_layers)),
        num_experts=0,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return Qwen3NextConfig(**fields)

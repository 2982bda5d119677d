"""A fused one-token decode step for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3), used by ``StaticDecoder``.

Why: at batch 20 on an 8B model, running HF's modules costs ~1,500 kernels per step, ~1,000 of them tiny
elementwise ones (issue 17). This step computes what the modules compute with a dozen launches per layer:

    RMSNorm after the residual add -> q, k and v projections in one launch (biases for Qwen2)
    -> (Qwen3: RMSNorm of q and k per head) -> RoPE of q and k + write of k and v at each row's physical end
    -> ragged decode attention -> o_proj -> RMSNorm after the residual add -> gate and up projections and
    SiLU-and-mul in one launch -> down_proj; after the last layer the final RMSNorm.

The fused ops (``dynts.kernels``: Triton on CUDA, the torch references elsewhere) round where transformers rounds,
so the step computes the modules' arithmetic; the projections (``kernels.concat_linear``,
``kernels.silu_gated_linear``: skinny kernels for a decode step's few rows) differ from cuBLAS only in the order of
their fp32 sums. Every weight is read in place from the model's own modules at each step (no copy: the q, k and v
weights are three pointers of one launch), so a change to the model's weights is seen at the next step.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..modeling import decoder_module

FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The RMSNorm classes of those families: weight * (x / rms(x)) rounded as kernels.rms_norm rounds.
_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def fused_step_unsupported(model: nn.Module, full_attention_layers: int) -> str | None:
    """Why ``model`` cannot run ``FusedDecodeStep`` (None: it can). ``full_attention_layers``: how many layers the
    cache stores K/V for (every layer must be a full-attention layer)."""
    config = model.config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {FUSED_MODEL_TYPES}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act is {getattr(config, 'hidden_act', None)!r}, not 'silu'"
    decoder = decoder_module(model)
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(decoder, name) for name in ("embed_tokens", "rotary_emb", "norm")):
        return f"{type(decoder).__name__} lacks layers, embed_tokens, rotary_emb or norm"
    layers = list(layers)[: config.num_hidden_layers]
    if full_attention_layers != len(layers):
        return f"only {full_attention_layers} of the {len(layers)} layers are full-attention layers"
    parameters = list(decoder.parameters()) + list(model.get_output_embeddings().parameters())
    if len({(p.dtype, p.device) for p in parameters}) != 1:
        return "the parameters do not share one dtype and one device"
    for index, layer in enumerate(layers):
        attention, mlp = layer.self_attn, layer.mlp
        projections = {name: getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        projections |= {name: getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")}
        for name, projection in projections.items():
            if type(projection) is not nn.Linear:  # quantised or patched linears compute something else
                return f"layer {index}'s {name} is {type(projection).__name__}, not torch.nn.Linear"
        norms = {"input_layernorm": layer.input_layernorm, "post_attention_layernorm": layer.post_attention_layernorm}
        if model_type == "qwen3":
            norms |= {"q_norm": attention.q_norm, "k_norm": attention.k_norm}
        for name, norm in norms.items():
            if type(norm).__name__ not in _NORM_CLASSES:
                return f"layer {index}'s {name} is {type(norm).__name__}, not one of {_NORM_CLASSES}"
    # The fused step calls no layer module, so hooks on them would silently not run.
    hooked = [name for name, module in decoder.named_modules()
              if (module._forward_hooks or module._forward_pre_hooks) and name.startswith(("layers.", "norm"))]
    if hooked:
        return f"modules with forward hooks would be skipped: {hooked[:3]}"
    return None


def _linear(x: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
    return kernels.concat_linear(x, [projection.weight], None if projection.bias is None else [projection.bias])


class _Layer:
    """One decoder layer's weights as the fused step reads them."""

    def __init__(self, layer: nn.Module, storage_layer: int, with_qk_norm: bool) -> None:
        attention = layer.self_attn
        self.storage_layer = storage_layer
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm = attention.q_norm if with_qk_norm else None
        self.k_norm = attention.k_norm if with_qk_norm else None
        self.o_proj, self.gate_proj, self.up_proj, self.down_proj = (
            attention.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
        self.scale = attention.scaling
        self.head_dim = attention.head_dim
        self.qkv = (attention.q_proj, attention.k_proj, attention.v_proj)
        self.qkv_sizes = [projection.out_features for projection in self.qkv]
        # Zeros stand in for a missing bias when another of q, k, v has one (the kernel takes all or none).
        some_bias = any(projection.bias is not None for projection in self.qkv)
        self.qkv_zero_biases = [projection.weight.new_zeros(projection.out_features)
                                if some_bias and projection.bias is None else None for projection in self.qkv]

    def qkv_arguments(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The q, k and v weights and biases as the projection kernel takes them (read from the modules now)."""
        weights = [projection.weight for projection in self.qkv]
        biases = [projection.bias for projection in self.qkv]
        if all(bias is None for bias in biases):
            return weights, None
        return weights, [zero if bias is None else bias for bias, zero in zip(biases, self.qkv_zero_biases)]


class FusedDecodeStep:
    """The decode step of ``model`` as fused ops over a ``StaticSession``'s buffers (see the module docstring).

    ``storage_layer_of`` maps each model layer to its layer in the cache storage (``DynTSCache.storage_layer_of``).
    Raises ValueError naming the reason when the model is not supported (``fused_step_unsupported``).
    """

    def __init__(self, model: nn.Module, storage_layer_of: dict[int, int]) -> None:
        reason = fused_step_unsupported(model, len(storage_layer_of))
        if reason is not None:
            raise ValueError(f"the fused decode step does not support this model: {reason}")
        config = model.config.get_text_config(decoder=True)
        self.decoder = decoder_module(model)
        with_qk_norm = config.model_type == "qwen3"
        self.layers = [_Layer(layer, storage_layer_of[index], with_qk_norm)
                       for index, layer in enumerate(list(self.decoder.layers)[: config.num_hidden_layers])]

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        slots: torch.Tensor, lengths: torch.Tensor, start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [rows, 1, hidden] of feeding ``input_ids`` ([rows, 1]) at ``position_ids``;
        each layer's K/V is written into ``key_cache`` / ``value_cache`` (the dense storage) at ``slots`` ([rows],
        storage indices), and attention reads each row's first ``lengths`` slots (held tokens plus this one; from
        ``start`` on in the ring layout). Device work only."""
        rows = input_ids.shape[0]
        embedded = self.decoder.embed_tokens(input_ids)
        cos, sin = self.decoder.rotary_emb(embedded, position_ids)  # [rows, 1, head_dim], the model's own RoPE
        cos, sin = cos.view(rows, -1), sin.view(rows, -1)
        hidden, residual = embedded.view(rows, -1), None
        for layer in self.layers:
            normed, residual = kernels.rms_norm(hidden, layer.input_norm.weight, eps=layer.input_norm.variance_epsilon,
                                                residual=residual)
            queries, keys, values = kernels.concat_linear(normed, *layer.qkv_arguments()).split(layer.qkv_sizes, dim=-1)
            queries = queries.view(rows, -1, layer.head_dim)
            keys = keys.view(rows, -1, layer.head_dim)
            values = values.view(rows, keys.shape[1], -1)
            if layer.q_norm is not None:
                queries = kernels.rms_norm(queries, layer.q_norm.weight, eps=layer.q_norm.variance_epsilon)[0]
                keys = kernels.rms_norm(keys, layer.k_norm.weight, eps=layer.k_norm.variance_epsilon)[0]
            storage = layer.storage_layer
            queries = kernels.rotary_and_store(queries, keys, values, cos, sin, key_cache, value_cache, storage, slots)
            attended = kernels.decode_attention(queries, key_cache[storage], value_cache[storage], lengths,
                                                scale=layer.scale, start=start)
            hidden = _linear(attended.view(rows, -1), layer.o_proj)
            normed, residual = kernels.rms_norm(hidden, layer.post_norm.weight, eps=layer.post_norm.variance_epsilon,
                                                residual=residual)
            activated = kernels.silu_gated_linear(normed, layer.gate_proj.weight, layer.up_proj.weight,
                                                  layer.gate_proj.bias, layer.up_proj.bias)
            hidden = _linear(activated, layer.down_proj)
        final = self.decoder.norm
        normed, _ = kernels.rms_norm(hidden, final.weight, eps=final.variance_epsilon, residual=residual)
        return normed.view(rows, 1, -1)

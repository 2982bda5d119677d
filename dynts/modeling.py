"""Where things sit inside an HF decoder model (structure only; no transformers import).

Shared by the HF integration, the predictor head's model check and the training code, so none of them imports
another for it.
"""

from __future__ import annotations

from torch import nn


def decoder_module(model: nn.Module) -> nn.Module:
    """The module that takes ``past_key_values`` and returns the final-norm hidden states."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "forward"):
        raise ValueError(f"{type(model).__name__}: cannot find the decoder module (tried get_decoder() and .model)")
    return decoder


def attention_modules(model: nn.Module, layer_indices: set[int]) -> dict[int, nn.Module]:
    """Map model layer index -> attention module (the module holding ``layer_idx`` and ``scaling``)."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx in layer_indices and hasattr(module, "scaling") and layer_idx not in found:
            found[layer_idx] = module
    return found

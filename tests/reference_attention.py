"""The independent reference for eviction tests: eager attention over a full HF cache that hides chosen keys.

``REFERENCE_VISIBLE[layer]`` ([rows, kv_heads | 1, keys] bool) marks the keys a step may see (None: all, as HF's
own mask says); ``REFERENCE_LOGITS[layer]`` receives each call's raw scaled logits ([rows, q_heads, new, keys],
before any mask), from which a test can compute the exact softmax over any set of keys it likes.
Select it with ``model.config._attn_implementation = REFERENCE``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

REFERENCE = "dynts_masked_reference"
REFERENCE_VISIBLE: dict[int, torch.Tensor] = {}
REFERENCE_LOGITS: dict[int, torch.Tensor] = {}


def _masked_reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention that also hides the keys REFERENCE_VISIBLE[layer] marks invisible ([rows, kv_heads|1, keys])."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    REFERENCE_LOGITS[module.layer_idx] = logits.detach().clone()
    if attention_mask is not None:
        logits = logits + attention_mask[..., : key.shape[-2]]
    visible = REFERENCE_VISIBLE.get(module.layer_idx)
    if visible is not None:
        visible = visible.repeat_interleave(groups, dim=1) if visible.shape[1] > 1 else visible
        logits = logits.masked_fill(~visible.unsqueeze(2), float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(REFERENCE, _masked_reference_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(REFERENCE, eager_mask)

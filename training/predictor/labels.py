"""Ground-truth token importance (the DynTS labels) and the final-norm hidden states they go with.

For one sequence (prompt, thinking, ``</think>``, answer) run once through the unmodified model:

* ``answer`` mode (DynTS): token j's importance is the softmax attention it receives from the answer rows
  (the tokens after the end-of-thinking marker), with each row's attention to itself zeroed, averaged over
  the query heads, over all answer rows (a row that cannot see j, being before it, contributes 0) and over
  the layers (the full-attention layers, in a hybrid model).
* ``future`` mode: the attention token j receives from the ``horizon`` tokens after it (rows j+1 .. j+horizon,
  fewer at the end of the sequence), averaged over those rows, the heads and the layers; for tasks where
  later thinking, not only the answer, reads a token.

Memory: the model runs one forward pass over the sequence with a ``DynTSCache`` that never evicts (a full
cache); its query-capture hooks hand each layer's post-RoPE queries to ``LabelRecorder`` right after the
layer's keys were stored, and the recorder reduces the attention probabilities ``query_chunk`` rows at a time.
Extra memory is O(query_chunk x L) per layer instead of eager attention's O(L^2). (``dynts.kernels.
attention_scores`` is not used: it sums over every causal query, and can neither drop the diagonal nor apply
the future-mode band.) Any HF decoder that ``DynTSCache`` supports with query capture works.

Normalisation (``normalise``): raw scores shrink like 1/L (a softmax over L keys) and their scale differs between
models and sequence lengths. Each token also gets ``uniform``: the same average computed as if every row
attended uniformly to all the keys it sees (row i: 1/(i+1) per key). ``attention / uniform`` is then the
attention received relative to uniform (1 = an average token, independent of the model, of L and of the
row set), and the default target ``log1p(attention / uniform)`` compresses the heavy tail (a few tokens get
many times the uniform share, and the tail grows with L) so that a squared loss is not dominated by a handful
of tokens, while keeping the order of the tokens (top-k selection only needs the order). ``rank`` (each token's
percentile among the thinking tokens of its sequence, in [0, 1]) is the order alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dynts.config import CompressionConfig
from dynts.scorers.base import Scorer, Step

LabelMode = Literal["answer", "future"]
LABEL_MODES: tuple[str, ...] = ("answer", "future")
Normalisation = Literal["log_uniform", "rank"]
NORMALISATIONS: tuple[str, ...] = ("log_uniform", "rank")


@dataclass
class SequenceLabels:
    """Per-token results for one sequence of L tokens.

    hidden:    [L, d] final-norm hidden states (model dtype, on the model's device).
    attention: [L] float32 raw importance (the mode's average attention received).
    uniform:   [L] float32 the same average under uniform attention (0 where no row counts).
    """

    hidden: torch.Tensor
    attention: torch.Tensor
    uniform: torch.Tensor


def _check_mode(length: int, mode: str, answer_start: int | None, horizon: int | None) -> None:
    if mode not in LABEL_MODES:
        raise ValueError(f"mode must be one of {LABEL_MODES}, got {mode!r}")
    if mode == "answer":
        if answer_start is None or isinstance(answer_start, bool) or not 0 < answer_start < length:
            raise ValueError(f"answer mode needs answer_start in [1, {length - 1}] (the first answer row), got {answer_start!r}")
        if horizon is not None:
            raise ValueError("horizon is only used by the future mode")
    else:
        if horizon is None or isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"future mode needs horizon >= 1 (the number of later rows that count), got {horizon!r}")


def row_weights(length: int, mode: LabelMode, answer_start: int | None, horizon: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form bookkeeping of the averages, in float64.

    Returns ``(divisor [L], uniform [L])``: the number of rows each key's average divides by (answer: every
    answer row; future: the rows j+1 .. min(j + horizon, L - 1)) and the uniform-attention reference (the mean
    over those rows of 1/(i+1) for the rows i > j that see the key).
    """
    _check_mode(length, mode, answer_start, horizon)
    position = torch.arange(length, dtype=torch.float64)
    inverse = 1.0 / (position + 1.0)  # uniform attention of row i to each key it sees
    suffix = torch.flip(torch.cumsum(torch.flip(inverse, [0]), 0), [0])  # suffix[i] = sum_{r >= i} 1/(r+1)
    suffix = torch.cat([suffix, torch.zeros(1, dtype=torch.float64)])
    if mode == "answer":
        answer_rows = length - answer_start
        first = torch.clamp(position + 1, min=answer_start).long()  # rows > j among the answer rows
        divisor = torch.full((length,), float(answer_rows), dtype=torch.float64)
        uniform = suffix[first] / answer_rows
    else:
        last = torch.clamp(position + horizon, max=length - 1).long()
        divisor = (last - position).clamp(min=0)
        total = suffix[(position + 1).long()] - suffix[last + 1]
        uniform = torch.where(divisor > 0, total / divisor.clamp(min=1), torch.zeros_like(total))
    return divisor, uniform


class LabelRecorder(Scorer):
    """A scorer that never scores: it reduces each layer's attention into per-token labels as the model runs.

    Bound to a ``DynTSCache`` that never evicts; expects one forward pass over a single, unpadded sequence.
    """

    name = "label-recorder"
    needs_queries = True
    needs_keys = True
    needs_hidden_states = True

    def __init__(self, length: int, mode: LabelMode, answer_start: int | None, horizon: int | None, query_chunk: int) -> None:
        _check_mode(length, mode, answer_start, horizon)
        if query_chunk < 1:
            raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
        self.length, self.mode, self.answer_start, self.horizon = length, mode, answer_start, horizon
        self.query_chunk = query_chunk
        self.layer_sums: list[torch.Tensor] = []
        self.hidden: torch.Tensor | None = None

    def on_layer(self, layer: int, queries: torch.Tensor, step: Step) -> None:
        if queries.shape[0] != 1 or queries.shape[2] != self.length:
            raise ValueError(
                f"labels: expected one forward pass over 1 x {self.length} tokens, got queries of shape {tuple(queries.shape)}"
            )
        keys = self.view.keys(layer)[0, :, : self.length]
        self.layer_sums.append(received_attention(
            queries[0], keys, self.view.geometry.scale, self.mode, self.answer_start, self.horizon, self.query_chunk,
        ))

    def on_step(self, step: Step) -> None:
        self.hidden = step.hidden_states[0]

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("LabelRecorder only observes; its cache must never compact")


def received_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    mode: LabelMode,
    answer_start: int | None,
    horizon: int | None,
    query_chunk: int = 128,
) -> torch.Tensor:
    """[L] float32: per key, the causal softmax attention summed over the counting rows and the query heads,
    self-attention excluded. queries [q_heads, L, dim] (post-RoPE), keys [kv_heads, L, dim] of the same tokens."""
    q_heads, length, dim = queries.shape
    kv_heads = keys.shape[0]
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    group = q_heads // kv_heads
    device = queries.device
    first_row = answer_start if mode == "answer" else 1
    key = torch.arange(length, device=device).view(1, -1)
    keys_float = keys.float().transpose(-1, -2).unsqueeze(1)  # [Hkv, 1, D, L]
    total = torch.zeros(length, dtype=torch.float32, device=device)
    for start in range(first_row, length, query_chunk):
        end = min(start + query_chunk, length)
        row = torch.arange(start, end, device=device).view(-1, 1)
        chunk = queries[:, start:end].float().view(kv_heads, group, end - start, dim)
        logits = torch.matmul(chunk, keys_float) * scale  # [Hkv, G, c, L]
        logits = logits.masked_fill(key > row, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        counted = key < row  # self excluded
        if mode == "future":
            counted &= key >= row - horizon
        total += (probs * counted).sum(dim=(0, 1, 2))
    return total


@torch.no_grad()
def label_sequence(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    *,
    mode: LabelMode = "answer",
    answer_start: int | None = None,
    horizon: int | None = None,
    query_chunk: int = 128,
) -> SequenceLabels:
    """Hidden states and raw labels of one sequence (see the module docstring).

    input_ids:    [L] or [1, L] token ids of the whole sequence.
    answer_start: answer mode: the first answer row (the position right after the end-of-thinking marker).
    horizon:      future mode: how many later rows count.
    """
    from dynts.integrations.hf import DynTSCache
    from dynts.modeling import decoder_module

    if model.training:
        raise ValueError("label_sequence: the model is in training mode (dropout would perturb the labels); call model.eval()")
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"input_ids must be one sequence of >= 2 tokens ([L] or [1, L]), got shape {tuple(ids.shape)}")
    length = ids.numel()
    recorder = LabelRecorder(length, mode, answer_start, horizon, query_chunk)
    # keep_ratio 1.0 and a budget past the sequence: a full cache that never evicts.
    config = CompressionConfig(budget=length + 1, window=0, keep_ratio=1.0, protect_prompt=False, protect_answer=False)
    cache = DynTSCache(model, config, scorer=recorder, eos_token_id=[])
    try:
        device = next(model.parameters()).device
        # The decoder alone: the LM head's [L, vocab] logits are not needed.
        decoder_module(model)(input_ids=ids.view(1, -1).to(device), past_key_values=cache, use_cache=True)
    finally:
        cache.detach()
    if len(recorder.layer_sums) != len(cache.storage_layer_of):
        raise RuntimeError(f"labels: captured {len(recorder.layer_sums)} layers of {len(cache.storage_layer_of)}")
    divisor, uniform = row_weights(length, mode, answer_start, horizon)
    divisor = divisor.to(device)
    per_layer = torch.stack(recorder.layer_sums)  # [layers, L] sums over rows and heads
    q_heads = recorder.view.geometry.q_heads
    attention = per_layer.double().mean(dim=0) / (q_heads * divisor.clamp(min=1))
    return SequenceLabels(hidden=recorder.hidden, attention=attention.float(), uniform=uniform.float().to(device))


def normalise(attention: torch.Tensor, uniform: torch.Tensor, sequence: torch.Tensor | None = None,
              method: Normalisation = "log_uniform") -> torch.Tensor:
    """Training targets from raw labels (see the module docstring).

    attention, uniform: [N] raw labels and their uniform references (``uniform`` > 0 for every token given).
    sequence:           [N] sequence index of each token (``rank`` ranks within each sequence).
    """
    if method not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {method!r}")
    if attention.shape != uniform.shape:
        raise ValueError(f"attention and uniform must have the same shape, got {tuple(attention.shape)} and {tuple(uniform.shape)}")
    if method == "log_uniform":
        if bool((uniform <= 0).any()):
            raise ValueError("uniform must be > 0 for every labelled token (a token no row attends to has no label)")
        return torch.log1p(attention.double() / uniform.double()).float()
    if sequence is None:
        raise ValueError("rank normalisation needs the sequence index of each token")
    targets = torch.empty(attention.shape, dtype=torch.float32)
    for index in torch.unique(sequence).tolist():
        members = (sequence == index).nonzero().view(-1)
        values = attention[members]
        order = torch.argsort(torch.argsort(values, stable=True), stable=True).float()
        targets[members] = order / max(values.numel() - 1, 1)
    return targets

"""Scorers that need no attention: recency, attention sinks, separators, chance."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..storage import KVStorage
from .base import ModelGeometry, Scorer, Step

# SepLLM's separators (Chen et al., 2024): punctuation and line breaks.
SEPARATOR_TEXTS = (".", ",", "?", "!", ";", ":", "\n")


class WindowScorer(Scorer):
    """Local window: the most recent tokens win (recency = logical position)."""

    name = "window"

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        return self.slot_positions(rows).double()


class StreamingLLMScorer(Scorer):
    """StreamingLLM (Xiao et al., 2024): the first ``sinks`` tokens of the sequence, then the most recent."""

    name = "streamingllm"

    def __init__(self, sinks: int = 4) -> None:
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        self.sinks = sinks

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        positions = self.slot_positions(rows)
        is_sink = positions < (self.sequence_start[rows] + self.sinks).view(1, -1, 1, 1)
        return torch.where(is_sink, torch.full_like(positions, torch.iinfo(torch.int32).max), positions).double()


class SepLLMScorer(Scorer):
    """SepLLM (Chen et al., 2024): sinks first, then separator tokens, then the most recent tokens."""

    name = "sepllm"

    def __init__(self, separator_ids: Iterable[int], sinks: int = 4) -> None:
        self.separator_ids = sorted({int(token) for token in separator_ids})
        if not self.separator_ids:
            raise ValueError("separator_ids must name at least one token id")
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        self.sinks = sinks

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, texts: Iterable[str] = SEPARATOR_TEXTS, sinks: int = 4) -> "SepLLMScorer":
        """Every vocabulary entry that decodes to a separator (optionally surrounded by white space)."""
        wanted = set(texts)
        ids = [
            token_id for token_id in range(len(tokenizer))
            if tokenizer.decode([token_id]).strip(" ") in wanted or tokenizer.decode([token_id]) in wanted
        ]
        if not ids:
            raise ValueError(f"the tokenizer has no token for any separator in {sorted(wanted)}")
        return cls(ids, sinks=sinks)

    def bind(self, storage: KVStorage, geometry: ModelGeometry, sequence_start: torch.Tensor) -> None:
        super().bind(storage, geometry, sequence_start)
        storage.add_slot_tensor("sepllm_is_separator", dtype=torch.bool, fill=False)
        self._separator_ids = torch.tensor(self.separator_ids, device=storage.device)

    def on_step(self, step: Step) -> None:
        if step.input_ids is None:
            raise ValueError("sepllm needs input_ids (it cannot score inputs_embeds)")
        is_separator = torch.isin(step.input_ids, self._separator_ids)
        flags = self.storage.slot_tensors["sepllm_is_separator"]
        index = step.slots.view(1, step.slots.shape[0], 1, -1).expand(flags.shape[0], -1, flags.shape[2], -1)
        flags.scatter_(3, index, is_separator.view(1, step.slots.shape[0], 1, -1).expand_as(index))

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        positions = self.slot_positions(rows).double()
        is_separator = self.storage.slot_tensors["sepllm_is_separator"][:, rows]
        is_sink = positions < (self.sequence_start[rows] + self.sinks).view(1, -1, 1, 1)
        # Tiers: sinks > separators > the rest; recency orders each tier (positions < 2**40 here).
        tier = is_sink.double() * 2.0 + is_separator.double()
        return tier * 2.0**40 + positions


class RandomScorer(Scorer):
    """Uniformly random importance (a floor for the others)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def bind(self, storage: KVStorage, geometry: ModelGeometry, sequence_start: torch.Tensor) -> None:
        super().bind(storage, geometry, sequence_start)
        self._generator = torch.Generator(device=storage.device).manual_seed(self.seed)

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        shape = (1, rows.numel(), 1, self.storage.capacity)
        return torch.rand(shape, generator=self._generator, device=self.storage.device)

"""Scorers that need no attention: recency, attention sinks, separators, chance."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..config import check_int, check_token_ids
from ..device import to_device
from .base import CacheView, Scorer, Step

# SepLLM's separators (Chen et al., 2024): punctuation and line breaks.
SEPARATOR_TEXTS = (".", ",", "?", "!", ";", ":", "\n")


class WindowScorer(Scorer):
    """Local window: the most recent tokens win (recency = logical position)."""

    name = "window"

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        return self.slots.positions[:, rows].double()


class StreamingLLMScorer(Scorer):
    """StreamingLLM (Xiao et al., 2024): the first ``sinks`` tokens of the sequence, then the most recent."""

    name = "streamingllm"

    def __init__(self, sinks: int = 4) -> None:
        self.sinks = check_int("sinks", sinks, minimum=0)

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        positions = self.slots.positions[:, rows]
        is_sink = positions < (self.slots.row_start[rows] + self.sinks).view(1, -1, 1, 1)
        return torch.where(is_sink, torch.full_like(positions, torch.iinfo(torch.int32).max), positions).double()


class SepLLMScorer(Scorer):
    """SepLLM (Chen et al., 2024): sinks first, then separator tokens, then the most recent tokens."""

    name = "sepllm"
    STATE = "sepllm_is_separator"

    def __init__(self, separator_ids: Iterable[int], sinks: int = 4) -> None:
        self.separator_ids = sorted(set(check_token_ids("separator_ids", separator_ids)))
        if not self.separator_ids:
            raise ValueError("separator_ids must name at least one token id")
        self.sinks = check_int("sinks", sinks, minimum=0)

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

    def bind(self, view: CacheView) -> None:
        super().bind(view)
        view.slots.add_state(self.STATE, dtype=torch.bool, fill=False)
        self._separator_ids = to_device(self.separator_ids, view.slots.device)

    def on_step(self, step: Step) -> None:
        if step.input_ids is None:
            raise ValueError("sepllm needs input_ids (it cannot score inputs_embeds)")
        self.slots.scatter(self.STATE, step.slots, torch.isin(step.input_ids, self._separator_ids))

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        positions = self.slots.positions[:, rows].double()
        is_separator = self.slots.state(self.STATE)[:, rows]
        is_sink = positions < (self.slots.row_start[rows] + self.sinks).view(1, -1, 1, 1)
        # Tiers: sinks > separators > the rest; recency orders each tier (positions < 2**40 here).
        tier = is_sink.double() * 2.0 + is_separator.double()
        return tier * 2.0**40 + positions


class RandomScorer(Scorer):
    """Uniformly random importance (a floor for the others).

    A token's score is a hash of ``seed`` and its position counted from the start of its sequence: it does not
    depend on the slot the token sits in, on how the prompt was chunked or batched, or on the integration.
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_int("seed", seed, minimum=0)

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        position = self.slots.positions[:, rows] - self.slots.row_start[rows].view(1, -1, 1, 1)
        return uniform_hash(position, self.seed)


# splitmix64's constants as signed int64 (torch integer arithmetic wraps around).
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX_1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX_2 = 0x94D049BB133111EB - 2**64


def uniform_hash(values: torch.Tensor, seed: int) -> torch.Tensor:
    """A deterministic pseudo-random float64 in [0, 1) per int64 value (splitmix64-style mixing of value and seed)."""
    mixed = values.to(torch.long) * _GOLDEN + seed
    mixed = (mixed ^ _logical_shift(mixed, 30)) * _MIX_1
    mixed = (mixed ^ _logical_shift(mixed, 27)) * _MIX_2
    mixed = mixed ^ _logical_shift(mixed, 31)
    return _logical_shift(mixed, 11).double() / 2.0**53


def _logical_shift(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned right shift of int64 values (torch's >> sign-extends)."""
    return (values >> bits) & ((1 << (64 - bits)) - 1)

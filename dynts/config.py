"""What to keep: the compression settings shared by every integration."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Granularity = Literal["shared", "per_layer", "per_kv_head"]
GRANULARITIES: tuple[str, ...] = ("shared", "per_layer", "per_kv_head")


@dataclass(frozen=True)
class CompressionConfig:
    """Eviction settings of one cache. Validated on construction.

    budget:         a row is compacted when its physical length (tokens whose K/V are held) reaches this.
    window:         the most recent ``window`` tokens of a row always stay.
    keep_ratio:     of the older ``physical_len - window`` tokens, ``floor(keep_ratio * (physical_len - window))``
                    stay; protected tokens count first, the rest are the best-scored ones. 1.0 disables eviction.
    protect_prompt: prompt tokens never leave.
    protect_answer: from the end of thinking on (the ``think_end`` tokens and everything after), nothing leaves.
    think_end:      the token-id sequence that ends thinking (``resolve_think_end(tokenizer)`` finds it).
                    ``None``: no answer protection trigger.
    granularity:    ``shared``: one keep-set per row for all layers and heads (DynTS); ``per_layer``: one per
                    layer; ``per_kv_head``: one per layer and KV head.
    """

    budget: int
    window: int
    keep_ratio: float = 0.3
    protect_prompt: bool = True
    protect_answer: bool = True
    think_end: tuple[int, ...] | None = None
    granularity: Granularity = "shared"

    def __post_init__(self) -> None:
        for name in ("budget", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        if self.budget <= self.window:
            raise ValueError(f"budget must be > window (= {self.window}), got budget={self.budget}")
        if not isinstance(self.keep_ratio, (int, float)) or isinstance(self.keep_ratio, bool):
            raise TypeError(f"keep_ratio must be a float, got {type(self.keep_ratio).__name__}")
        if not (0.0 < float(self.keep_ratio) <= 1.0) or math.isnan(self.keep_ratio):
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.think_end is not None:
            ids = tuple(self.think_end)
            if not ids:
                raise ValueError("think_end must be a non-empty sequence of token ids or None")
            for token in ids:
                if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                    raise ValueError(f"think_end must hold non-negative int token ids, got {token!r}")
            object.__setattr__(self, "think_end", ids)
        for name in ("protect_prompt", "protect_answer"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def kept_older(self, older: int) -> int:
        """How many of ``older`` tokens (those outside the window) a compaction keeps, protected included."""
        # The small epsilon keeps e.g. 0.3 * 10 from flooring to 2 through float rounding.
        return min(older, math.floor(self.keep_ratio * older + 1e-9))

    def compacted_length(self, physical_len: int, protected_older: int = 0) -> int:
        """Physical length of a row right after it is compacted at ``physical_len``."""
        window = min(self.window, physical_len)
        older = physical_len - window
        return window + max(self.kept_older(older), protected_older)

    def next_trigger(self, kept: int) -> int:
        """Physical length at which a row holding ``kept`` tokens right after a compaction is compacted again.

        The budget, unless protected tokens overflowed the quota (``kept`` is then large): the row first grows by
        the usual gap ``budget - compacted_length(budget)``, so it is not compacted at every step.
        """
        gap = max(1, self.budget - self.compacted_length(self.budget))
        return max(self.budget, kept + gap)

    def validate_vocab(self, vocab_size: int) -> None:
        """Check that ``think_end`` ids exist in a vocabulary of ``vocab_size`` tokens."""
        if self.think_end is None:
            return
        for token in self.think_end:
            if token >= vocab_size:
                raise ValueError(f"think_end token id {token} is not in the vocabulary (allowed range 0..{vocab_size - 1})")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CompressionConfig":
        """Build from a plain dict (CLI, JSON, vLLM's additional_config), rejecting unknown fields by name."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CompressionConfig field(s) {unknown}; allowed: {sorted(known)}")
        values = dict(values)
        if values.get("think_end") is not None:
            values["think_end"] = tuple(values["think_end"])
        return cls(**values)


def resolve_think_end(tokenizer: Any, text: str = "</think>") -> tuple[int, ...]:
    """Token ids that ``tokenizer`` produces for ``text`` (the end-of-thinking marker), without special tokens.

    Raises ValueError if the tokenizer does not know the marker (it would be split into unrelated pieces that
    also occur elsewhere, e.g. ``<``, ``/``).
    """
    single = tokenizer.convert_tokens_to_ids(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(single, int) and single is not None and single != unk:
        return (single,)
    ids = tuple(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise ValueError(f"think_end: tokenizer produces no tokens for {text!r}")
    if tokenizer.decode(list(ids)) != text:
        raise ValueError(f"think_end: the tokenizer does not round-trip {text!r} (got ids {ids}); pass think_end ids explicitly")
    return ids

"""What to keep: the compression settings shared by every integration, validated when they are built."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Granularity = Literal["shared", "per_layer", "per_kv_head"]
GRANULARITIES: tuple[str, ...] = ("shared", "per_layer", "per_kv_head")
BudgetMode = Literal["dynts", "fixed"]
BUDGET_MODES: tuple[str, ...] = ("dynts", "fixed")
DEFAULT_BUFFER = 128  # R-KV's compression interval


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as a Python int (numpy integers accepted); TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_token_ids(name: str, value: Any, *, allow_empty: bool = True) -> tuple[int, ...]:
    """One token id or an iterable of them, as a tuple of non-negative ints (numpy integers accepted).

    A string is refused (token ids, not text: ``dynts.resolve_think_end(tokenizer)`` turns text into ids).
    """
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be token ids (ints), got the string {value!r}; convert text with the tokenizer")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a token id or a sequence of token ids, got {type(value).__name__} {value!r}")
    ids = []
    for token in value:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise TypeError(f"{name} must hold int token ids, got {type(token).__name__} {token!r}")
        if token < 0:
            raise ValueError(f"{name} must hold non-negative int token ids, got {int(token)}")
        ids.append(int(token))
    if not ids and not allow_empty:
        raise ValueError(f"{name} must be a non-empty sequence of token ids (or None)")
    return tuple(ids)


@dataclass(frozen=True)
class CompressionConfig:
    """Eviction settings of one cache. Validated on construction (numpy scalars are accepted and converted).

    budget:         ``budget_mode="dynts"`` (DynTS): a row is compacted when its physical length (tokens whose K/V are
                    held) reaches this. ``"fixed"`` (R-KV / kvpress style): a row holds at most ``budget + buffer``
                    tokens and each compaction brings it back to ``budget``. int > window.
    window:         the most recent ``window`` tokens of a row always stay; int >= 0.
    keep_ratio:     ``dynts`` mode: of the older ``physical_len - window`` tokens,
                    ``floor(keep_ratio * (physical_len - window))`` stay; protected tokens count first, the rest are
                    the best-scored ones. In (0, 1]; 1.0 disables eviction. (``fixed`` mode keeps ``budget - window``.)
    budget_mode:    ``"dynts"`` or ``"fixed"`` (see ``budget``); the same scorers and protection in both.
    buffer:         ``fixed`` mode: tokens a row may grow past the budget before it is compacted (int >= 1, default
                    128 as in R-KV). Not used by ``dynts`` mode (giving it there is an error).
    protect_prompt: prompt tokens (everything a ``generate`` call is given) never leave.
    protect_answer: from the end of thinking on (the ``think_end`` tokens and everything after), nothing leaves.
    think_end:      the token id (or id sequence) that ends thinking (``resolve_think_end(tokenizer)`` finds it).
                    ``None``: no answer protection trigger.
    granularity:    ``shared``: one keep-set per row for all layers and heads (DynTS); ``per_layer``: one per
                    layer; ``per_kv_head``: one per layer and KV head.

    The arithmetic of a compaction (how many tokens stay, when a row is compacted again) is in ``dynts.policy``.
    """

    budget: int
    window: int
    keep_ratio: float = 0.3
    protect_prompt: bool = True
    protect_answer: bool = True
    think_end: tuple[int, ...] | None = None
    granularity: Granularity = "shared"
    budget_mode: BudgetMode = "dynts"
    buffer: int | None = None

    def __post_init__(self) -> None:
        window = check_int("window", self.window, minimum=0)
        budget = check_int("budget", self.budget)
        if budget <= window:
            raise ValueError(f"budget must be > window (= {window}), got budget={budget}")
        ratio = self.keep_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
            raise TypeError(f"keep_ratio must be a float in (0, 1], got {type(ratio).__name__} {ratio!r}")
        ratio = float(ratio)
        if math.isnan(ratio) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {ratio}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        for name in ("protect_prompt", "protect_answer"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool (True or False), got {getattr(self, name)!r}")
        if self.budget_mode not in BUDGET_MODES:
            raise ValueError(f"budget_mode must be one of {BUDGET_MODES}, got {self.budget_mode!r}")
        if self.budget_mode == "fixed":
            buffer = DEFAULT_BUFFER if self.buffer is None else check_int("buffer", self.buffer, minimum=1)
        elif self.buffer is not None:
            raise ValueError("buffer is used by budget_mode='fixed' only (budget_mode is 'dynts')")
        else:
            buffer = None
        think_end = None if self.think_end is None else check_token_ids("think_end", self.think_end, allow_empty=False)
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "keep_ratio", ratio)
        object.__setattr__(self, "think_end", think_end)
        object.__setattr__(self, "buffer", buffer)

    @property
    def trigger(self) -> int:
        """Physical length at which a row is first compacted: ``budget`` (dynts mode) or ``budget + buffer``."""
        return self.budget + (self.buffer or 0)

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
        if not isinstance(values, dict):
            raise TypeError(f"compression settings must be a dict, got {type(values).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CompressionConfig field(s) {unknown}; allowed: {sorted(known)}")
        missing = sorted(name for name in ("budget", "window") if name not in values)
        if missing:
            raise ValueError(f"CompressionConfig needs {missing}")
        return cls(**values)


def resolve_think_end(tokenizer: Any, text: str = "</think>") -> tuple[int, ...]:
    """Token ids that ``tokenizer`` produces for ``text`` (the end-of-thinking marker), without special tokens.

    Raises ValueError if the tokenizer does not know the marker (it would be split into unrelated pieces that
    also occur elsewhere, e.g. ``<``, ``/``).
    """
    single = tokenizer.convert_tokens_to_ids(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(single, int) and single != unk:
        return (single,)
    ids = tuple(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise ValueError(f"think_end: tokenizer produces no tokens for {text!r}")
    if tokenizer.decode(list(ids)) != text:
        raise ValueError(f"think_end: the tokenizer does not round-trip {text!r} (got ids {ids}); pass think_end ids explicitly")
    return ids

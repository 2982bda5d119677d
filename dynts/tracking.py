"""Per-row bookkeeping of a batch of sequences: logical length, prompt span, end of thinking, finished rows.

Host-side and integration-independent: it sees the token ids each step adds and decides which logical
positions are protected and which rows stopped growing.
"""

from __future__ import annotations

from collections.abc import Sequence

# answer_start of a row still thinking: larger than any position.
NOT_YET = 2**62


def find_marker(token_ids: Sequence[int], marker: Sequence[int], start: int = 0) -> int | None:
    """Position of the first occurrence of ``marker`` in ``token_ids`` at or after ``start``, or None."""
    marker = tuple(marker)
    if not marker:
        raise ValueError("marker must hold at least one token id")
    ids = list(token_ids)
    for position in range(start, len(ids) - len(marker) + 1):
        if tuple(ids[position : position + len(marker)]) == marker:
            return position
    return None


class SequenceTracker:
    """Logical positions are column indices of the batch's token matrix: with left padding, a row's first real
    token sits at ``sequence_start[row]`` = its number of pad tokens."""

    def __init__(self, batch_size: int, think_end: Sequence[int] | None, eos_token_ids: Sequence[int] = ()) -> None:
        self.batch_size = batch_size
        self.think_end = tuple(think_end) if think_end else ()
        self.eos_token_ids = frozenset(eos_token_ids)
        self.logical_len = 0
        self.sequence_start = [0] * batch_size
        self.prompt_end = [0] * batch_size
        self.answer_start = [NOT_YET] * batch_size
        self.finished = [False] * batch_size
        # The last len(think_end) - 1 tokens of each row, to spot a marker split across steps.
        self._tail: list[list[int]] = [[] for _ in range(batch_size)]

    def start(self, prompt_len: int, pad_counts: Sequence[int]) -> None:
        """The first forward pass: a left-padded prompt of ``prompt_len`` columns."""
        if len(pad_counts) != self.batch_size:
            raise ValueError(f"pad_counts has {len(pad_counts)} rows, expected {self.batch_size}")
        self.sequence_start = list(pad_counts)
        self.prompt_end = [prompt_len] * self.batch_size

    def stored_counts(self, num_new: int) -> list[int]:
        """How many of the next ``num_new`` tokens each row keeps: none once it is finished."""
        return [0 if done else num_new for done in self.finished]

    def advance(self, new_tokens: Sequence[Sequence[int]] | None, num_new: int, prefill: bool) -> None:
        """Account for ``num_new`` tokens per row (``new_tokens`` may be None for embeddings input)."""
        first = self.logical_len
        self.logical_len += num_new
        if new_tokens is None:
            return
        for row, tokens in enumerate(new_tokens):
            if self.finished[row]:
                continue
            if self.think_end and not prefill and self.answer_start[row] == NOT_YET:
                self._find_think_end(row, list(tokens), first)
            if not prefill and any(token in self.eos_token_ids for token in tokens):
                self.finished[row] = True  # the EOS itself is stored; the row stops growing after it

    def _find_think_end(self, row: int, tokens: list[int], first: int) -> None:
        marker = self.think_end
        history = self._tail[row] + tokens
        found = find_marker(history, marker)
        if found is not None:
            self.answer_start[row] = first - len(self._tail[row]) + found  # history[0] is at that logical position
            return
        self._tail[row] = history[-(len(marker) - 1):] if len(marker) > 1 else []

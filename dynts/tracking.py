"""Per-row bookkeeping on the host: which fed tokens a row keeps, which spans are protected, which rows finished.

Integration-independent. ``ThinkEndScanner`` (the one end-of-thinking detector) serves both the HF rows tracked
here and the vLLM scheduler's requests.

Logical positions are column indices of the batch's token matrix: every forward pass adds the same number of
columns to every row. A row *keeps* (stores the K/V of) a fed column unless it is padding (attention mask 0) or
the row has finished. A generation *call* (one ``generate``) is given input columns (the prompt of that call:
protected, never scanned for EOS or the end of thinking) and then produces one column per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .policy import OPEN_END, Span


def find_marker(token_ids: Sequence[int], marker: Sequence[int], start: int = 0) -> int | None:
    """Position of the first occurrence of ``marker`` in ``token_ids`` at or after ``start``, or None."""
    marker = list(marker)
    if not marker:
        raise ValueError("marker must hold at least one token id")
    ids = list(token_ids)
    last_start = len(ids) - len(marker) + 1
    position = start
    while position < last_start:
        # list.index finds each candidate first token in C: this runs on every decoded token of every row
        try:
            position = ids.index(marker[0], position, last_start)
        except ValueError:
            return None
        if ids[position : position + len(marker)] == marker:
            return position
        position += 1
    return None


class ThinkEndScanner:
    """Finds the end-of-thinking marker in a stream of token ids fed a few at a time (it may span two feeds)."""

    def __init__(self, marker: Sequence[int]) -> None:
        self.marker = tuple(marker)
        self._tail: list[int] = []  # the last len(marker) - 1 tokens fed, to spot a marker split across feeds

    def feed(self, tokens: Sequence[int], first_position: int) -> int | None:
        """Scan ``tokens`` (at logical positions ``first_position``...); the marker's start position once found."""
        if not self.marker:
            return None
        history = self._tail + list(tokens)
        history_start = first_position - len(self._tail)
        found = find_marker(history, self.marker)
        if found is not None:
            return history_start + found
        keep = len(self.marker) - 1
        self._tail = history[len(history) - keep:] if keep else []
        return None


@dataclass
class StepPlan:
    """What a forward pass adds: per row, which of the ``num_new`` fed columns it keeps."""

    num_new: int
    stored: list[list[bool]]
    first_column: int

    def stored_counts(self) -> list[int]:
        return [sum(row) for row in self.stored]


class SequenceTracker:
    """The host-side facts of a batch of rows: logical length, protected spans, finished rows, unkept columns."""

    def __init__(self, rows: int, think_end: Sequence[int] | None, *, protect_prompt: bool = True,
                 protect_answer: bool = True) -> None:
        self.rows = rows
        self.think_end = tuple(think_end) if think_end else ()
        self.protect_prompt, self.protect_answer = protect_prompt, protect_answer
        self.logical_len = 0
        self.row_start: list[int | None] = [None] * rows  # first kept column of each row
        self.protected_spans: list[list[Span]] = [[] for _ in range(rows)]
        self.finished = [False] * rows
        self.unkept: list[list[Span]] = [[] for _ in range(rows)]  # fed columns never kept (padding, after EOS)
        self.eos_token_ids: frozenset[int] = frozenset()
        self.pad_token_id: int | None = None
        self.input_end = 0  # columns before it belong to the current call's input
        self.calls = 0
        self._scanners = [ThinkEndScanner(self.think_end) for _ in range(rows)]

    # ------------------------------------------------------------------ calls
    def start_call(self, input_end: int, eos_token_ids: Sequence[int], pad_token_id: int | None) -> None:
        """A generation call begins: columns ``[logical_len, input_end)`` are its input. Finished rows continue."""
        if input_end < self.logical_len:
            raise ValueError(
                f"a generation call on this cache must be given the whole sequence so far: its input ends at column "
                f"{input_end}, but the cache already holds {self.logical_len} columns"
            )
        for row in range(self.rows):
            spans = self.protected_spans[row]
            if spans and spans[-1][1] == OPEN_END:  # the previous call's answer ends where that call ended
                spans[-1] = (spans[-1][0], self.logical_len)
        self.finished = [False] * self.rows
        self._scanners = [ThinkEndScanner(self.think_end) for _ in range(self.rows)]
        self.eos_token_ids = frozenset(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.input_end = input_end
        self.calls += 1

    # ------------------------------------------------------------------ a step
    def feed(self, num_new: int, tokens: list[list[int]] | None, mask: list[list[int]] | None) -> StepPlan:
        """Account for ``num_new`` columns fed to every row (``tokens`` None for embeddings input; ``mask`` the
        attention mask of these columns, None = all real). Returns which columns each row keeps."""
        first = self.logical_len
        stored: list[list[bool]] = []
        for row in range(self.rows):
            row_tokens = None if tokens is None else tokens[row]
            row_mask = None if mask is None else mask[row]
            stored.append(self._feed_row(row, first, num_new, row_tokens, row_mask))
        self.logical_len += num_new
        return StepPlan(num_new=num_new, stored=stored, first_column=first)

    def _feed_row(self, row: int, first: int, num_new: int, tokens: list[int] | None, mask: list[int] | None) -> list[bool]:
        real = [True] * num_new if mask is None else [bool(value) for value in mask]
        kept: list[bool] = []
        # Input columns (the call's prompt) in bulk: kept unless padding, protected, never scanned.
        input_count = 0 if self.finished[row] else max(0, min(num_new, self.input_end - first))
        for offset, value in enumerate(real[:input_count]):
            if not value:
                self._add_range(self.unkept[row], first + offset, first + offset + 1)
            elif self.protect_prompt:
                self._add_range(self.protected_spans[row], first + offset, first + offset + 1)
            if value and self.row_start[row] is None:
                self.row_start[row] = first + offset
        kept.extend(real[:input_count])
        # Generated columns: each kept while the row runs, up to its EOS. The end of thinking is looked for once per
        # run of consecutive kept columns (a static decode feeds 64 at a time), not once per token.
        run: list[int] = []  # tokens of the kept columns just before this one
        for offset in range(input_count, num_new):
            column = first + offset
            token = None if tokens is None else tokens[offset]
            if self.finished[row] and real[offset] and (self.pad_token_id is None or token != self.pad_token_id):
                raise ValueError(
                    f"row {row} finished with an EOS token (ids {sorted(self.eos_token_ids)}) but was then fed "
                    f"token {token} at column {column}, not the pad token ({self.pad_token_id}): a finished row keeps "
                    "nothing more; start a new generation call (generate) to continue it"
                )
            keep = real[offset] and not self.finished[row]
            kept.append(keep)
            if not keep:
                self._scan_for_answer(row, run, column - len(run))
                run = []
                self._add_range(self.unkept[row], column, column + 1)
                continue
            if self.row_start[row] is None:
                self.row_start[row] = column
            if token is None:
                continue
            run.append(token)
            if token in self.eos_token_ids:
                self.finished[row] = True  # the EOS itself is kept; the row keeps nothing after it
        self._scan_for_answer(row, run, first + num_new - len(run))
        return kept

    def _scan_for_answer(self, row: int, run: list[int], column: int) -> None:
        """Open the row's answer span where the end of thinking starts, if ``run`` (tokens kept at consecutive
        columns from ``column``) holds it (or completes one begun in an earlier run)."""
        if run and self.think_end and self.protect_answer and not self._answer_open(row):
            answer_start = self._scanners[row].feed(run, column)
            if answer_start is not None:
                self.protected_spans[row].append((answer_start, OPEN_END))

    def _answer_open(self, row: int) -> bool:
        spans = self.protected_spans[row]
        return bool(spans) and spans[-1][1] == OPEN_END

    @staticmethod
    def _add_range(spans: list[Span], start: int, stop: int) -> None:
        """Add columns ``[start, stop)`` to a list of disjoint ascending spans, extending the last when contiguous."""
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], stop)
        else:
            spans.append((start, stop))

    # ------------------------------------------------------------------ queries
    def answer_start(self, row: int) -> int | None:
        """Start of the open answer span of the current call (None while thinking)."""
        return self.protected_spans[row][-1][0] if self._answer_open(row) else None

    def unkept_but_real(self, row: int, mask: Sequence[int]) -> list[int]:
        """Columns the row never kept (padding, after its EOS) that ``mask`` (over the columns so far) marks real."""
        return [column for start, stop in self.unkept[row] for column in range(start, stop) if mask[column]]

"""What a cache reports about itself: lengths per step, memory, evictions, and time spent scoring and evicting."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


class Stopwatch:
    """Accumulates time per label. On CUDA it records events (no synchronisation on the hot path) and resolves
    them when read; elsewhere it uses the wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._seconds: dict[str, float] = defaultdict(float)
        self._pending: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)

    @contextmanager
    def measure(self, label: str) -> Iterator[None]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending[label].append((start, end))
        else:
            begin = time.perf_counter()
            try:
                yield
            finally:
                self._seconds[label] += time.perf_counter() - begin

    def seconds(self, label: str) -> float:
        pending = self._pending.pop(label, [])
        if pending:
            pending[-1][1].synchronize()
            self._seconds[label] += sum(start.elapsed_time(end) for start, end in pending) / 1000.0
        return self._seconds[label]


@dataclass
class CacheStats:
    """Counters of one cache (``DynTSCache``) or one vLLM worker.

    compactions:            row compactions triggered by the budget (dropping padding is not counted).
    evicted_tokens:         tokens those compactions removed.
    steps:                  forward passes (HF) / scheduler steps (vLLM) observed.
    peak_resident_tokens:   max over steps and rows of a row's physical length after the step.
    resident_token_steps:   sum over steps of the rows' physical lengths (mean resident tokens per row =
                            ``resident_token_steps / row_steps``).
    row_steps:              sum over steps of the rows observed (rows still growing, plus finished ones).
    peak_resident_kv_bytes: max over steps of the K/V bytes held by the rows' physical lengths.
    allocated_kv_bytes:     bytes of the storage buffers (K/V, slot table, scorer state) at the last step.
    reallocations:          times the buffers had to grow past their planned capacity.
    scoring_seconds / eviction_seconds: time in the scorer and in compactions (CUDA events on GPU).
    history:                the physical length of every row after each of the last ``history_limit`` steps
                            (a ring: memory stays bounded on long runs; ``history_limit=0`` keeps none).
    """

    history_limit: int = 4096
    compactions: int = 0
    evicted_tokens: int = 0
    steps: int = 0
    peak_resident_tokens: int = 0
    resident_token_steps: int = 0
    row_steps: int = 0
    peak_resident_kv_bytes: int = 0
    allocated_kv_bytes: int = 0
    reallocations: int = 0
    scoring_seconds: float = 0.0
    eviction_seconds: float = 0.0
    history: deque = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.history_limit, bool) or not isinstance(self.history_limit, int) or self.history_limit < 0:
            raise ValueError(f"history_limit must be an int >= 0, got {self.history_limit!r}")
        self.history = deque(self.history, maxlen=self.history_limit)

    def record_step(self, physical_len: list[int], bytes_per_token: int) -> None:
        """Account for the rows' physical lengths after one step."""
        self.steps += 1
        self.peak_resident_tokens = max(self.peak_resident_tokens, max(physical_len, default=0))
        self.resident_token_steps += sum(physical_len)
        self.row_steps += len(physical_len)
        self.peak_resident_kv_bytes = max(self.peak_resident_kv_bytes, sum(physical_len) * bytes_per_token)
        if self.history_limit:
            self.history.append(list(physical_len))

    @property
    def mean_resident_tokens(self) -> float:
        """Mean physical length of a row over the steps observed."""
        return self.resident_token_steps / self.row_steps if self.row_steps else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "steps": self.steps,
            "compactions": self.compactions,
            "evicted_tokens": self.evicted_tokens,
            "mean_resident_tokens": self.mean_resident_tokens,
            "peak_resident_tokens": self.peak_resident_tokens,
            "peak_resident_kv_bytes": self.peak_resident_kv_bytes,
            "allocated_kv_bytes": self.allocated_kv_bytes,
            "reallocations": self.reallocations,
            "scoring_seconds": self.scoring_seconds,
            "eviction_seconds": self.eviction_seconds,
        }

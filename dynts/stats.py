"""What a cache reports about itself: lengths per step, memory, evictions, and time spent scoring and evicting."""

from __future__ import annotations

import time
from collections import defaultdict
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
    """Counters of one ``DynTSCache`` (or any storage user).

    physical_len_history: per forward pass, the physical length of each row after it (compactions included).
    evictions:            row compactions triggered by the budget (dropping left padding is not counted).
    peak_resident_kv_bytes: max over steps of the K/V bytes held by the rows' physical lengths.
    allocated_kv_bytes:   bytes of the storage buffers (K/V, positions, scorer slot state) at the last step.
    reallocations:        times the buffers had to grow past their planned capacity.
    """

    physical_len_history: list[list[int]] = field(default_factory=list)
    evictions: int = 0
    peak_resident_kv_bytes: int = 0
    allocated_kv_bytes: int = 0
    reallocations: int = 0
    scoring_seconds: float = 0.0
    eviction_seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "steps": len(self.physical_len_history),
            "evictions": self.evictions,
            "peak_resident_kv_bytes": self.peak_resident_kv_bytes,
            "allocated_kv_bytes": self.allocated_kv_bytes,
            "reallocations": self.reallocations,
            "scoring_seconds": self.scoring_seconds,
            "eviction_seconds": self.eviction_seconds,
            "max_physical_len": max((max(row) for row in self.physical_len_history if row), default=0),
        }

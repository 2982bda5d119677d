"""On-disk label sets: the hidden states and raw labels of the thinking tokens, computed once, read every epoch.

A label directory holds:

* ``labels.json``: what was labelled (base model, label mode, horizon, token and trace counts, shard names);
* ``fingerprint.safetensors``: the base model's weight fingerprint (so a head trained from the set can be
  saved with its model's identity without loading the model again);
* ``shard-NNNNN.safetensors``: ``hidden`` [N, d] (model dtype), ``attention`` [N] and ``uniform`` [N] (float32,
  see ``labels.py``), ``trace`` [N] and ``position`` [N] (int64). Only the tokens the loss uses (thinking
  tokens that some row attends to) are stored; a trace never spans two shards, so per-trace metrics can be
  computed shard by shard and the training set never has to fit in memory at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dynts.predictor.head import ModelIdentity
from .labels import LabelMode, label_sequence
from .traces import Trace, trace_spans

META_FILE = "labels.json"
FINGERPRINT_FILE = "fingerprint.safetensors"
FORMAT = "dynts-label-set"
FIELDS = ("hidden", "attention", "uniform", "trace", "position")


class LabelSetWriter:
    """Appends traces' labelled tokens and writes a shard every ``shard_tokens`` tokens (at trace boundaries)."""

    def __init__(self, directory: str | Path, identity: ModelIdentity, settings: dict[str, Any], shard_tokens: int = 1 << 20) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / META_FILE).exists():
            raise FileExistsError(f"{self.directory / META_FILE} exists; label into an empty directory")
        self.identity, self.settings, self.shard_tokens = identity, settings, shard_tokens
        self._buffer: dict[str, list[torch.Tensor]] = {name: [] for name in FIELDS}
        self._buffered = 0
        self.shards: list[str] = []
        self.tokens = 0
        self.traces = 0

    def add(self, trace: int, position: torch.Tensor, hidden: torch.Tensor, attention: torch.Tensor, uniform: torch.Tensor) -> None:
        """One trace's labelled tokens: ``position`` [n] and the matching rows of hidden/attention/uniform."""
        count = position.numel()
        if not (hidden.shape[0] == attention.numel() == uniform.numel() == count):
            raise ValueError("position, hidden, attention and uniform must describe the same tokens")
        if hidden.shape[-1] != self.identity.hidden_size:
            raise ValueError(f"hidden states have size {hidden.shape[-1]}, the model's hidden size is {self.identity.hidden_size}")
        if count == 0:
            return
        values = {
            "hidden": hidden.detach().cpu(), "attention": attention.detach().float().cpu(),
            "uniform": uniform.detach().float().cpu(), "trace": torch.full((count,), trace, dtype=torch.long),
            "position": position.detach().long().cpu(),
        }
        for name in FIELDS:
            self._buffer[name].append(values[name])
        self._buffered += count
        self.tokens += count
        self.traces += 1
        if self._buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({field: torch.cat(parts).contiguous() for field, parts in self._buffer.items()}, str(self.directory / name))
        self.shards.append(name)
        self._buffer = {field: [] for field in FIELDS}
        self._buffered = 0

    def close(self) -> Path:
        """Write the last shard and the metadata; returns the directory."""
        self._flush()
        save_file({"fingerprint": self.identity.fingerprint.float().contiguous()}, str(self.directory / FINGERPRINT_FILE))
        meta = {
            "format": FORMAT, "base_model": self.identity.metadata(), "settings": self.settings,
            "tokens": self.tokens, "traces": self.traces, "shards": self.shards,
        }
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return self.directory


class LabelSet:
    """A label directory opened for reading."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not a label directory (make one with `dynts label`)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a dynts label set (format={meta.get('format')!r})")
        self.meta = meta
        self.settings: dict[str, Any] = meta["settings"]
        self.shards: list[str] = meta["shards"]
        fingerprint = load_file(str(self.directory / FINGERPRINT_FILE))["fingerprint"]
        self.identity = ModelIdentity(**meta["base_model"], fingerprint=fingerprint)
        if not self.shards:
            raise ValueError(f"{self.directory} holds no labelled tokens (every trace was filtered out?)")

    @property
    def hidden_size(self) -> int:
        return self.identity.hidden_size

    def shard(self, index: int, fields: tuple[str, ...] = FIELDS) -> dict[str, torch.Tensor]:
        """The named columns of shard ``index`` (leave ``hidden`` out to skip reading the hidden states)."""
        with safe_open(str(self.directory / self.shards[index]), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in fields}

    def iter_shards(self, fields: tuple[str, ...] = FIELDS) -> Iterator[dict[str, torch.Tensor]]:
        for index in range(len(self.shards)):
            yield self.shard(index, fields)

    def trace_ids(self) -> torch.Tensor:
        """Sorted ids of the labelled traces."""
        return torch.unique(torch.cat([shard["trace"] for shard in self.iter_shards(("trace",))]))


def build_label_set(
    model: torch.nn.Module,
    traces: Sequence[Trace],
    directory: str | Path,
    *,
    think_end: Sequence[int],
    mode: LabelMode = "answer",
    horizon: int | None = None,
    query_chunk: int = 128,
    shard_tokens: int = 1 << 20,
    log: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Label every usable trace and write a label directory; returns counts of used and skipped traces.

    Labelled tokens: the thinking tokens (after the prompt, before the end-of-thinking marker). Answer mode
    skips traces without the marker or without answer tokens; future mode labels a trace without a marker up
    to its end (its last token, which no row attends to, is left out).
    """
    settings = {"mode": mode, "horizon": horizon, "think_end": list(think_end), "query_chunk": query_chunk}
    writer = LabelSetWriter(directory, ModelIdentity.of(model), settings, shard_tokens)
    counts = {"labelled": 0, "no_think_end": 0, "no_answer": 0, "no_thinking": 0}
    for trace in traces:
        spans = trace_spans(trace, think_end)
        sequence = trace.prompt_ids + trace.completion_ids
        if mode == "answer" and spans.answer_start is None:
            counts["no_think_end"] += 1
            continue
        if mode == "answer" and spans.answer_start >= len(sequence):
            counts["no_answer"] += 1
            continue
        if spans.thinking_end <= spans.thinking_start:
            counts["no_thinking"] += 1
            continue
        result = label_sequence(
            model, sequence, mode=mode, horizon=horizon, query_chunk=query_chunk,
            answer_start=spans.answer_start if mode == "answer" else None,
        )
        thinking = torch.arange(spans.thinking_start, spans.thinking_end)
        thinking = thinking[result.uniform.cpu()[thinking] > 0]
        index = thinking.to(result.hidden.device)
        writer.add(trace.index, thinking, result.hidden[index], result.attention[index], result.uniform[index])
        counts["labelled"] += 1
        if log is not None:
            log(f"trace {trace.index}: {len(sequence)} tokens, {thinking.numel()} thinking tokens labelled")
    writer.close()
    return counts

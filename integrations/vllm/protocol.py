"""What the dynts scheduler tells the workers each step (attached to vLLM's ``SchedulerOutput`` as ``.dynts``).

The scheduler decides *when* a request is compacted and to what length, from counts it knows (logical length,
evicted count, prompt and answer spans); the worker decides *which* slots stay (scores live there) with the same
policy, checks that it lands on the same length, and moves the K/V. Nothing flows back from worker to scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTRIBUTE = "dynts"


@dataclass(frozen=True)
class Compaction:
    """Compact one request before this step's forward pass.

    logical_len:  tokens whose K/V were written so far (positions 0 .. logical_len - 1).
    physical_len: slots held before the compaction (logical_len - evicted so far).
    keep_count:   slots held after it; the blocks past ``cdiv(keep_count, block_size)`` are already freed.
    prompt_end:   first logical position after the prompt.
    answer_start: logical position where the end-of-thinking marker starts, or None while thinking.
    """

    req_id: str
    logical_len: int
    physical_len: int
    keep_count: int
    prompt_end: int
    answer_start: int | None


@dataclass(frozen=True)
class StepPlan:
    """The dynts part of one scheduler step."""

    compactions: list[Compaction] = field(default_factory=list)
    # For introspection (tests, stats): the block pool after this step's allocation, and the requests holding blocks.
    num_free_blocks: int = 0
    num_running: int = 0
    num_preemptions: int = 0  # since the engine started

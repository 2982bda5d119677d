"""What the dynts scheduler tells the workers each step (attached to vLLM's ``SchedulerOutput`` as ``.dynts``).

The scheduler decides *when* a request is compacted and to what length, from counts it knows (logical length,
evicted count, prompt and answer spans); the worker decides *which* slots stay (scores live there) with the same
policy, checks that it lands on the same length, and moves the K/V. The scheduler also decides which preempted
requests are suspended (their K/V kept in host memory) and when they are restored. Nothing flows back from worker
to scheduler.
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
class Suspend:
    """A request preempted since the last step keeps its resident set: before this step's forward pass (which may
    write into the blocks it gave back), the worker copies the K/V of its ``physical_len`` slots to host memory and
    parks its slot table and scorer state. It comes back with a ``restore`` (or goes when it finishes)."""

    req_id: str
    physical_len: int


@dataclass(frozen=True)
class StepPlan:
    """The dynts part of one scheduler step, applied by the worker in this order: finished requests, compactions,
    suspends, then new and resumed requests (restores after vLLM gave them their new blocks)."""

    compactions: list[Compaction] = field(default_factory=list)
    suspends: list[Suspend] = field(default_factory=list)
    # Resumed this step with their suspended state (ids among the step's resumed_req_ids); other resumed requests
    # recompute their tokens from scratch.
    restores: list[str] = field(default_factory=list)
    # For introspection (tests, stats): the block pool after this step's allocation, and the requests holding blocks.
    num_free_blocks: int = 0
    num_running: int = 0
    num_preemptions: int = 0  # since the engine started

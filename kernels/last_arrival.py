"""Triton helper: split work merged by the last of its programs to finish, inside the same launch.

A split-K projection used to need a second launch to sum its splits: a kernel node more per projection in a decode
step's CUDA graph. Here every program writes its partial result, then takes a ticket from a counter per output
block; the program that takes the last ticket sums the partials (in split order, as the separate launch did, so
results do not change) and puts the counter back to zero, so the counters are zero between launches and never need
clearing. That lets the split count be tuned with the launch shape (``skinny_linear.py``). The decode attention
keeps its separate merge: merged by the last program, the query heads of a KV head were merged one after another
at the tail of the launch, and the attention got slower (Qwen-7B heads at 2k slots: 29 -> 42 us).

The counters belong to a (device, stream) pair: launches on one stream use them one after another (a kernel
launched as a programmatic dependent touches nothing before the kernel before it has finished:
``dependent_launch.py``), so they never share a counter at the same time. A CUDA graph captured on a stream keeps
that stream's counters, allocated when the capture first needs them (from the graph's memory pool; they live as long
as the cache below holds them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Counters per (device, stream): the most output blocks one launch may split.
COUNTERS = 1 << 16

_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor:
    """The zeroed int32 counters of ``device``'s current stream (at least ``needed`` of them)."""
    if needed > COUNTERS:
        raise ValueError(f"a launch may split at most {COUNTERS} outputs, got {needed}")
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _counters:
        _counters[key] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _counters[key]


@triton.jit
def last_to_arrive(counters_ptr, index, ARRIVALS: tl.constexpr):
    """Whether this program is the last of ``ARRIVALS`` to reach this point for output ``index``. Every program
    must call it once per output, after writing its partial result; the last one may then read all of them (with
    ``cache_modifier=".cg"``: past the multiprocessor's own cache)."""
    tl.debug_barrier()  # every thread's partial stores precede the ticket (released by the atomic)
    arrived = tl.atomic_add(counters_ptr + index, 1, sem="acq_rel", scope="gpu")
    last = arrived == ARRIVALS - 1
    if last:
        tl.store(counters_ptr + index, 0)  # every other program of this output has taken its ticket
    return last

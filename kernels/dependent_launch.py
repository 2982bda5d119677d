"""Triton helper: programmatic dependent launch, so that a decode step's kernels start without a launch gap.

A decode step at batch 20 is ~300 short kernels in a row (each projection reads its weights in 8-60 us), and every
kernel boundary costs the next kernel's launch and ramp-up: about a microsecond or two each, ~0.5 ms a step on an
H200, most of what the step spends above its bandwidth roofline (issue 17). On Hopper and later a kernel launched
as a *programmatic dependent* may be scheduled while the kernel before it still runs: its programs become resident
as soon as every program of that kernel has allowed it, then wait in hardware for its completion (and memory flush)
before touching memory. Each kernel here does both at its very top (``wait_for_prior_kernel``): it waits, then
allows the next one, so a kernel never reads or overwrites anything its predecessors still use, and the next
kernel's launch overlaps this one's work instead of following it.

A kernel takes part only if it calls ``wait_for_prior_kernel`` first thing and is launched with
``**dependent_launch_options(device)`` (its ``GRID_DEPENDENT`` constexpr and Triton's ``launch_pdl``); any other
kernel in the stream (torch's, cuBLAS's) is launched normally and so fully serialised, as before.
``set_dependent_launch(False)`` turns it off for the process (the benchmarks' A/B comparison).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .dispatch import interpreting

# Compute capability from which CUDA has programmatic dependent launch (griddepcontrol).
MIN_CAPABILITY = (9, 0)

_enabled = True


def set_dependent_launch(enabled: bool) -> None:
    """Launch the decode-step kernels as programmatic dependents where the GPU supports it (True, the default) or
    always fully serialised (False)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    _enabled = enabled


def dependent_launch(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch as programmatic dependents: enabled, a CUDA device of compute capability
    9.0 or later, not the Triton interpreter."""
    return (_enabled and device.type == "cuda" and not interpreting()
            and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY)


def dependent_launch_options(device: torch.device) -> dict[str, Any]:
    """Launch keywords of a kernel that starts with ``wait_for_prior_kernel(GRID_DEPENDENT)``."""
    if dependent_launch(device):
        return {"GRID_DEPENDENT": True, "launch_pdl": True}
    return {"GRID_DEPENDENT": False}


@triton.jit
def wait_for_prior_kernel(GRID_DEPENDENT: tl.constexpr):
    """First thing in a kernel launched with ``dependent_launch_options``: wait until the kernel before it in the
    stream has finished and its writes are visible, then let the next kernel be scheduled."""
    if GRID_DEPENDENT:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_to_l2(pointers):
    """Ask for the cache lines at ``pointers`` (one per 128 bytes is enough) to be brought into L2, without waiting
    for them. Before ``wait_for_prior_kernel`` only for memory no kernel of the step writes (weights): the programs of
    a dependent kernel are resident while the kernel before it drains, so its first weight tiles arrive meanwhile."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [pointers], dtype=tl.int32,
                              is_pure=False, pack=1)

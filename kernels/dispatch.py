"""The one rule that decides, for every op in ``dynts.kernels`` (dense and linear attention), whether its Triton
kernel or its torch reference runs.

``DYNTS_KERNELS`` (environment, read at import) or ``set_kernel_mode`` picks the mode:

* ``auto`` (default): the Triton kernel for CUDA tensors when Triton is installed; the torch reference otherwise;
* ``reference``: the torch reference everywhere (debugging, bisecting a kernel);
* ``triton``: the Triton kernel wherever it can run: CUDA tensors, and CPU tensors under the Triton interpreter
  (``TRITON_INTERPRET=1``: the tests use it to run the kernels without a GPU).

Triton itself is imported only by the kernel modules, which are imported when a kernel first runs, so an install
without Triton imports ``dynts.kernels`` fine.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

KERNEL_MODES = ("auto", "reference", "triton")
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _mode_from_environment() -> str:
    mode = os.environ.get("DYNTS_KERNELS", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"DYNTS_KERNELS must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


_mode = _mode_from_environment()


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def multiprocessors(device: torch.device, otherwise: int) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (the kernels size their grids from it); ``otherwise`` off CUDA
    (the interpreter, where the figure only shapes how the work is split)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return otherwise


def dots_in_float32(dtype: torch.dtype) -> bool:
    """Whether a kernel computes its dot products in float32 (``DOT_FLOAT32``): for float32 inputs, and for 16-bit
    ones under the interpreter, which multiplies bfloat16 dot operands as their raw bits."""
    return dtype == torch.float32 or interpreting()


def kernel_mode() -> str:
    return _mode


def set_kernel_mode(mode: str) -> None:
    """Switch the mode for this process (see the module docstring)."""
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    _mode = mode


@contextmanager
def kernels_in_mode(mode: str) -> Iterator[None]:
    """``set_kernel_mode`` for the duration of a ``with`` block."""
    previous = _mode
    set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(previous)


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs its Triton kernel (else its torch reference)."""
    if _mode == "reference" or not TRITON_INSTALLED:
        return False
    return tensor.is_cuda or (_mode == "triton" and interpreting())

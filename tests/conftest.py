"""Shared test setup.

Triton kernel tests run twice, through the ``device`` fixture: on CPU tensors under the Triton interpreter (CI) and
on CUDA tensors compiled (a machine with a CUDA GPU). Triton decides when a kernel is defined whether to interpret it, so the
switch is set here, before any test module imports a kernel: without a CUDA device, TRITON_INTERPRET=1 is the default.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

# Tiny models: one thread avoids oversubscribing the CI machine's 2 cores.
torch.set_num_threads(1)


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest):
    """Where the Triton kernels under test run: 'cpu' (interpreter; the kernel mode is 'triton' for the test, so the
    public ops run their kernels there too) or 'cuda' (compiled)."""
    if not TRITON_INSTALLED:
        pytest.skip("needs triton installed (pip install 'dynts[triton]')")
    if request.param == "cpu" and not INTERPRETING:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (the default only when no CUDA device is present)")
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        if INTERPRETING:
            pytest.skip("TRITON_INTERPRET=1 is set: the compiled CUDA run needs it unset")
    from dynts.kernels import kernels_in_mode

    with kernels_in_mode("triton"):
        yield request.param

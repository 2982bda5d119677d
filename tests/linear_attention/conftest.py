"""Device parametrisation for the linear-attention tests.

Each kernel test runs on CPU tensors under the Triton interpreter (CI) and on CUDA tensors compiled (the GPU
machine). Triton decides when a kernel is defined whether to interpret it, so the switch is set here, before the
test modules import the kernels: without a CUDA device, TRITON_INTERPRET=1 is the default.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest) -> str:
    """Where the Triton kernels under test run: 'cpu' (interpreter) or 'cuda' (compiled)."""
    if request.param == "cpu" and not INTERPRETING:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (the default only when no CUDA device is present)")
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU: runs on the GPU machine (device tool)")
        if INTERPRETING:
            pytest.skip("TRITON_INTERPRET=1 is set: the compiled CUDA run needs it unset")
    return request.param

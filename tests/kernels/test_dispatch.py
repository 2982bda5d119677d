"""The public kernel entry points: routing, the reference switch, argument checks, Triton as an optional import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dynts.kernels as kernels
from dynts.kernels import compact_, compact_paged_, kernels_in_mode, set_kernel_mode, use_triton
from dynts.kernels.reference import compact_paged_reference_, compact_reference_


def dense_args(device="cpu"):
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 3, 2, 10, 8, generator=generator).to(device)
    rows = torch.tensor([2, 0])
    keep_index = torch.tensor([[0, 3, 4, 9], [1, 2, 5, 0]]).view(1, 2, 1, 4)
    keep_count = torch.tensor([4, 3])
    return cache, rows, keep_index, keep_count


def test_kernel_mode_switch():
    cpu = torch.zeros(1)
    with kernels_in_mode("reference"):
        assert not use_triton(cpu)
    with kernels_in_mode("auto"):
        assert not use_triton(cpu)  # CPU tensors take the reference
    with kernels_in_mode("triton"):  # the interpreter runs kernels on CPU tensors (the tests' mode)
        assert use_triton(cpu) == (os.environ.get("TRITON_INTERPRET") == "1")
    with pytest.raises(ValueError, match=r"kernel mode must be one of \('auto', 'reference', 'triton'\), got 'fast'"):
        set_kernel_mode("fast")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_public_compact_matches_reference(device):
    """compact_ routes CPU tensors to the reference and CUDA tensors to Triton; the result is the reference's."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cache, rows, keep_index, keep_count = dense_args(device)
    expected = cache.clone()
    compact_reference_(expected, rows.to(device), keep_index.to(device), keep_count.to(device))
    compact_(cache, rows, keep_index, keep_count)  # index tensors on the CPU: moved to the cache's device
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_public_compact_paged_matches_reference(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    generator = torch.Generator().manual_seed(1)
    caches = [torch.randn(2, 6, 4, 2, 8, generator=generator).to(device) for _ in range(2)]
    table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
    keep_index = torch.tensor([[1, 4, 6, 7], [0, 2, 3, 99]]).view(1, 2, 1, 4)
    keep_count = torch.tensor([4, 3])
    expected = [cache.clone() for cache in caches]
    compact_paged_reference_(expected, table.to(device), keep_index.to(device), keep_count.to(device))
    compact_paged_(caches, table, keep_index, keep_count)
    assert all(torch.equal(got, want) for got, want in zip(caches, expected))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(rows=torch.tensor([3, 0])), r"rows must hold distinct batch indices in \[0, batch=3\)"),
        (lambda a: a.update(rows=torch.tensor([1, 1])), "distinct"),
        (lambda a: a.update(keep_count=torch.tensor([5, 3])), r"keep_count entries must be in \[0, K=4\]"),
        (lambda a: a.update(keep_count=torch.tensor([4, -1])), r"keep_count entries must be in \[0, K=4\]"),
        (lambda a: a["keep_index"].__setitem__((0, 0, 0, 2), 2), "strictly increasing"),
        (lambda a: a["keep_index"].__setitem__((0, 0, 0, 3), 10), r"slots=10"),
        (lambda a: a.update(keep_index=a["keep_index"].expand(1, 2, 3, 4)), "heads_g"),
        (lambda a: a.update(keep_index=a["keep_index"].float()), "int32/int64"),
        (lambda a: a.update(cache=a["cache"][0]), r"\[layers, batch, heads, slots, dim\]"),
    ],
)
def test_compact_rejects_bad_arguments(change, message):
    cache, rows, keep_index, keep_count = dense_args()
    arguments = dict(cache=cache, rows=rows, keep_index=keep_index.clone(), keep_count=keep_count)
    change(arguments)
    before = cache.clone()
    with pytest.raises(ValueError, match=message):
        compact_(**arguments)
    assert torch.equal(cache, before)


def test_compact_paged_rejects_shared_and_missing_blocks():
    caches = [torch.randn(2, 6, 4, 2, 8) for _ in range(2)]
    keep_index = torch.tensor([[1, 4, 6, 7], [0, 2, 3, 5]]).view(1, 2, 1, 4)
    keep_count = torch.tensor([4, 4])
    with pytest.raises(ValueError, match="no shared blocks"):
        compact_paged_(caches, torch.tensor([[4, 1], [1, 5]]), keep_index, keep_count)
    with pytest.raises(ValueError, match=r"num_blocks=6"):
        compact_paged_(caches, torch.tensor([[4, 6], [0, 5]]), keep_index, keep_count)
    with pytest.raises(ValueError, match=r"max_blocks \* block_size = 8"):
        compact_paged_(caches, torch.tensor([[4, 1], [0, 5]]), keep_index.clone().fill_(2).cumsum(-1), keep_count)
    with pytest.raises(ValueError, match="must match kv_caches"):
        compact_paged_([caches[0], caches[1].half()], torch.tensor([[4, 1], [0, 5]]), keep_index, keep_count)
    # A block beyond what a row touches may be anything (vLLM pads block tables): row 1 only reads block 0.
    compact_paged_(caches, torch.tensor([[4, 1], [0, -1]]), keep_index, torch.tensor([4, 2]))


def test_import_and_cpu_ops_without_triton():
    """CPU installs without Triton: dynts.kernels imports and its ops run on the reference."""
    script = """
import sys, importlib.abc
class BlockTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked for this test")
sys.meta_path.insert(0, BlockTriton())
import importlib.util, torch
importlib.util.find_spec = lambda name, *a, _f=importlib.util.find_spec: None if name == "triton" else _f(name, *a)
import dynts.kernels as kernels
cache = torch.randn(1, 2, 1, 6, 4)
kernels.compact_(cache, torch.tensor([1]), torch.tensor([[[[2, 5]]]]), torch.tensor([2]))
scores = kernels.attention_scores(torch.randn(1, 2, 3, 4), torch.randn(1, 1, 6, 4), torch.tensor([6]), scale=0.5)
assert scores.shape == (1, 1, 6) and "triton" not in sys.modules
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr

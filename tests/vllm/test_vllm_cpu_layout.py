"""Compaction inside a request's blocks on vLLM's CPU attention layout, against the backend's own write op.

Reference: write the kept tokens' K/V straight to slots 0..K-1 with ``cpu_attn_reshape_and_cache`` (what a run that
never held the evicted tokens would have written). The compacted cache must equal it everywhere, including the
slots past K and the blocks of other requests (untouched).
"""

from __future__ import annotations

import pytest
import torch

from vllm_support import require_vllm

require_vllm()

from dynts.integrations.vllm.cpu_layout import CPUBlockLayout  # noqa: E402


def write(cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, isa: str) -> None:
    from vllm import _custom_ops as ops

    num_blocks, heads, block_size, _ = cache.shape
    key_cache, value_cache = cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("block_size", "head_size", "isa"), [(32, 32, "vec"), (64, 128, "vec"), (32, 80, "vec16")])
@pytest.mark.parametrize("kept", ["ragged", "all", "only_tail", "first_block"])
def test_compaction_matches_writing_the_kept_tokens(dtype: torch.dtype, block_size: int, head_size: int, isa: str,
                                                    kept: str) -> None:
    generator = torch.Generator().manual_seed(block_size + head_size)
    heads, num_blocks, length = 3, 9, 3 * block_size + 5  # the request's last block is partly filled
    request_blocks = [7, 2, 5, 0]  # out of order, other blocks belong to "other requests"
    caches = [torch.randn(num_blocks, heads, block_size, 2 * head_size, generator=generator).to(dtype) for _ in range(2)]
    tokens = [(torch.randn(length, heads, head_size, generator=generator).to(dtype),
               torch.randn(length, heads, head_size, generator=generator).to(dtype)) for _ in caches]
    table = torch.tensor(request_blocks)
    slot = torch.arange(length)
    slot_mapping = table[slot // block_size] * block_size + slot % block_size
    for cache, (keys, values) in zip(caches, tokens):
        write(cache, keys, values, slot_mapping, isa)

    keep = {
        "ragged": torch.sort(torch.randperm(length, generator=generator)[: length // 3]).values,
        "all": torch.arange(length),
        "only_tail": torch.arange(length - 10, length),
        "first_block": torch.arange(0, block_size, 3),
    }[kept]
    expected = [cache.clone() for cache in caches]
    for cache, (keys, values) in zip(expected, tokens):
        write(cache, keys[keep], values[keep], slot_mapping[: len(keep)], isa)

    layout = CPUBlockLayout.probe(block_size, head_size, dtype, isa)
    padded = torch.cat([keep, torch.zeros(4, dtype=torch.long)])  # entries past keep_count are ignored
    layout.compact_(caches, request_blocks, padded, len(keep))
    for cache, reference in zip(caches, expected):
        assert torch.equal(cache, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("block_size", "head_size", "isa"), [(32, 32, "vec"), (64, 128, "vec"), (32, 80, "vec16")])
def test_gathered_keys_are_the_written_ones(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> None:
    """What the scorers read (``CacheView.keys`` in vLLM): a request's keys in slot order, from out-of-order blocks."""
    generator = torch.Generator().manual_seed(block_size + head_size)
    heads, num_blocks, length = 3, 9, 3 * block_size + 5
    request_blocks = [7, 2, 5, 0]
    cache = torch.randn(num_blocks, heads, block_size, 2 * head_size, generator=generator).to(dtype)
    keys, values = (torch.randn(length, heads, head_size, generator=generator).to(dtype) for _ in range(2))
    table = torch.tensor(request_blocks)
    slot = torch.arange(length)
    write(cache, keys, values, table[slot // block_size] * block_size + slot % block_size, isa)
    layout = CPUBlockLayout.probe(block_size, head_size, dtype, isa)
    for prefix in (length, block_size, 1):
        assert torch.equal(layout.gather_keys(cache, request_blocks, prefix), keys[:prefix].transpose(0, 1))

"""Input builders shared by the kernel tests (random, awkward shapes; never zeros)."""

from __future__ import annotations

import torch


def pick(device: str, small, large):
    """Tiny shapes for the interpreter (CPU), real ones on the GPU."""
    return small if device == "cpu" else large


def random_cache(shape: tuple[int, ...], dtype: torch.dtype, device: str, generator: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return torch.randint(0, 1 << 40, shape, generator=generator).to(device=device, dtype=dtype)


def random_keep(
    lists: int, keep_count: list[int], slots: int, generator: torch.Generator, width: int | None = None
) -> torch.Tensor:
    """[lists, R, width] keep lists: per (list, row), a random protected prefix 0..p-1 (kept in place) plus a sorted
    random choice of later slots, keep_count[r] in all; entries past keep_count are out-of-range garbage."""
    width = max(keep_count) if width is None else width
    index = torch.full((lists, len(keep_count), width), slots + 7, dtype=torch.long)
    for list_id in range(lists):
        for row, count in enumerate(keep_count):
            prefix = int(torch.randint(0, count + 1, (1,), generator=generator)) if count else 0
            rest = torch.randperm(slots - prefix, generator=generator)[: count - prefix] + prefix
            index[list_id, row, :count] = torch.cat([torch.arange(prefix), rest.sort().values])
    return index

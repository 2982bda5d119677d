"""Small host-built tables (row indices, lengths, spans) copied to the device without stalling it.

A host-to-device copy from pageable memory first waits for all the work queued on the stream (CUDA's rule for
pageable copies), so every such copy in a compaction left the GPU idle while the host queued the next kernels.
From pinned memory the copy is queued like a kernel and the host goes on.
"""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` (a nested list of numbers) as a ``dtype`` tensor on ``device``; on a CUDA device through pinned
    memory, asynchronously (PyTorch's pinned-memory cache keeps the host copy alive until the copy has run)."""
    pinned = torch.device(device).type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)

"""Small tables copied between host and device without stalling either.

* ``to_device``: host-built tables (row indices, lengths, spans) to the device. A host-to-device copy from pageable
  memory first waits for all the work queued on the stream (CUDA's rule for pageable copies), so every such copy in
  a compaction left the GPU idle while the host queued the next kernels. From pinned memory the copy is queued like
  a kernel and the host goes on.
* ``HostCopy``: a small device result (a plan's counts, the tokens a decode loop logged) to the host, queued where
  it is produced. Reading it later waits for that copy only, not for the work queued after it (``.tolist()`` on the
  device tensor would wait for the whole stream: a compaction's moves, the next steps).
"""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` (a nested list of numbers) as a ``dtype`` tensor on ``device``; on a CUDA device through pinned
    memory, asynchronously (PyTorch's pinned-memory cache keeps the host copy alive until the copy has run)."""
    pinned = torch.device(device).type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)


class HostCopy:
    """A copy of ``tensor`` to host memory, queued now on the current stream (on CUDA into pinned memory,
    asynchronously; elsewhere done at once). ``wait`` returns it once the copy has run, without waiting for anything
    queued after it; ``done`` is the CUDA event recorded right after the copy (None off CUDA), for timing."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.done: torch.cuda.Event | None = None
        if not tensor.is_cuda:
            self._host = tensor.clone()
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self.done = torch.cuda.Event(enable_timing=True)
        self.done.record()

    def wait(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self._host

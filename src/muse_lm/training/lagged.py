"""`LaggedReader`: device numbers read on the host a few steps later, without a sync.

`tensor.tolist()` on a CUDA tensor waits for every kernel queued so far, so calling it once per
step makes the CPU wait for the GPU and the GPU then wait for the CPU's next launches. Instead
each step's small vector is copied into pinned host memory with `non_blocking=True` and an event
is recorded after the copy; `ready(upto)` hands back the entries of steps <= `upto`, waiting on
their events. Read one step late, that event has (nearly always) fired already: the GPU is busy
with the next step's queued work meanwhile. On a CPU the copy is synchronous and so is free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LaggedEntry:
    step: int
    values: torch.Tensor  # 1-D float32 on the host (pinned on CUDA)
    meta: Any
    event: torch.cuda.Event | None


class LaggedReader:
    """FIFO of per-step device vectors; see the module docstring.

    Example:
        >>> reader = LaggedReader()
        >>> reader.push(step, torch.stack([loss, grad_norm]), meta=None)
        >>> for entry in reader.ready(step - 1):
        ...     loss_v, grad_v = entry.values.tolist()
    """

    def __init__(self) -> None:
        self._queue: deque[LaggedEntry] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, step: int, values: torch.Tensor, meta: Any = None) -> None:
        values = values.detach().float().reshape(-1)
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = values.clone(), None
        self._queue.append(LaggedEntry(step, host, meta, event))

    def ready(self, upto: int) -> list[LaggedEntry]:
        """Removes and returns, oldest first, the entries of steps <= `upto` (waiting for their
        copies, which by then are normally done)."""
        out = []
        while self._queue and self._queue[0].step <= upto:
            entry = self._queue.popleft()
            if entry.event is not None:
                entry.event.synchronize()
            out.append(entry)
        return out

    def clear(self) -> None:
        """Forgets every pending entry (after a rollback undid their steps)."""
        self._queue.clear()

"""A whole training step (forward, backward, AdamW) captured once as a CUDA graph and replayed.

A compiled MuseLM step is host-bound on an H100: its ~2,000 kernel launches (the compiled
graph's, our Triton kernels', and the graph breaks between them) take longer to issue from Python
than to run (150 ms of host time for 52 ms of GPU time at the 8gb shape). Replaying a captured graph
issues the same kernels with one call, so the step costs its GPU time. The capture follows
PyTorch's whole-network recipe: warm-up steps on a side stream (compilation and Triton autotuning
happen there, outside the capture), gradients set to None before capture so the backward allocates
them inside the graph's private memory pool, and an AdamW with `capturable=True` (step counters on
the device). Every replay reads the same input tensors, which is what a benchmark needs; a trainer
would copy each batch into them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from muse_lm.cuda_streams import capture_stream


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Sets `capturable=True` on every param group of an AdamW that has not stepped yet: its step
    counts then live on the device, which a captured step needs (the fused kernel reads them there)."""
    if optimizer.state:
        raise ValueError("make_capturable must run before the optimizer's first step (its state exists)")
    for group in optimizer.param_groups:
        group["capturable"] = True


class GraphedStep:
    """`step()` captured as one CUDA graph; calling the object replays it.

    Args:
        step: one full training step that ends with `optimizer.zero_grad(set_to_none=True)`; it must
            make no host sync (a sync inside a capture is an error, raised here).
        warmup: uncaptured calls of `step` on a side stream first (at least 1: autotuning and
            compilation must not happen during the capture).
        pool: `torch.cuda.graph_pool_handle()` shared with other graphs that are never replayed
            concurrently with this one, or None for a private pool.
    """

    def __init__(self, step: Callable[[], object], warmup: int = 2, pool: tuple | None = None) -> None:
        if warmup < 1:
            raise ValueError(f"warmup={warmup} must be >= 1: the first call compiles and autotunes")
        side = capture_stream()  # one per device: see muse_lm.cuda_streams
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call another thread makes meanwhile (Inductor's and Triton's compile
        # workers right after a first compile) does not invalidate this capture; the backward's
        # kernels still land in it (they run on the capturing stream).
        # Captured on the warm-up stream: its cuBLAS workspaces exist already, so none is carved
        # out of the graph's private pool (where a global cache would pin it). `pool`: a pool
        # shared by the graphs of one benchmark model, replayed one at a time, so a pool that
        # outlives its graph (PyTorch keeps a failed capture's pool for the life of the process)
        # is reused by the next capture instead of adding to it.
        with torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            step()

    def __call__(self) -> None:
        self.graph.replay()

    def release(self) -> None:
        """Frees the graph; its memory pool goes back to the caching allocator (and to the device on
        the next `torch.cuda.empty_cache()`) once no tensor allocated during the capture is alive."""
        torch.cuda.synchronize()
        self.graph.reset()

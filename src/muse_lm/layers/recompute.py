"""Cheap activations that a compiled training step recomputes in the backward instead of keeping.

Inductor's min-cut partitioner minimizes the backward's memory traffic, not the memory held between
forward and backward: it keeps a tensor that a backward matmul reads (a norm's output, the input of an
out-projection) even when one pointwise pass over tensors it keeps anyway would rebuild it, because the
backward would have to write that tensor out again. For a model whose peak is its activations, those
copies are the peak. `recompute_in_backward` marks such a region, so the partitioner keeps only its
inputs and rebuilds the rest in the backward (`benchmarks/saved_activations.py` counts what it keeps).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def _recompute_everything(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: every op of the region is recomputed in the backward, none kept."""
    return CheckpointPolicy.MUST_RECOMPUTE


def recompute_in_backward(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args). While torch.compile traces it, every op of `fn` is tagged must-recompute: the compiled
    backward rebuilds what it needs of `fn`'s intermediates and output from the tensors in `args` (kept, or
    themselves rebuilt) and the parameters `fn` reads. In eager mode this is a plain call: re-running a region
    there costs its kernel launches and Python again, on a step that is host-bound already.

    `fn` must be deterministic (no dropout, no Gumbel noise: it runs twice) and cheap next to the
    matmuls around it (pointwise work, a row reduction, a depthwise conv)."""
    if not torch.compiler.is_compiling():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _recompute_everything))

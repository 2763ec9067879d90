"""Choosing an implementation for an op: `impl=None | "torch" | "triton"`.

No silent fallback: an explicit request that cannot be honoured raises with the fix.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

IMPLS = (None, "torch", "triton")


# Looked up once: `importlib` is opaque to torch.compile, so a lookup per call (inside a compiled
# model's ops) would cut the graph there.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(op: str, impl: str | None, *tensors: torch.Tensor, has_triton_kernel: bool) -> str:
    """Returns "torch" or "triton" for `op` given the inputs' device.

    `None` picks Triton for CUDA tensors (when the op has a kernel and Triton imports) and the
    torch reference for CPU tensors. "triton" on CPU tensors is allowed only under Triton's
    interpreter (TRITON_INTERPRET=1).
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of None, 'torch', 'triton'")
    on_cuda = any(t.is_cuda for t in tensors)
    if impl == "torch":
        return "torch"
    if impl is None and not on_cuda:
        return "torch"
    if impl is None and not has_triton_kernel:
        # The op has no Triton kernel yet: the reference *is* its implementation on every device.
        return "torch"
    if not has_triton_kernel:
        raise NotImplementedError(f"{op}: no Triton kernel exists for this op yet; pass impl='torch'")
    if not triton_available():
        raise RuntimeError(
            f"{op}: Triton is not installed, so the CUDA path cannot run; install triton "
            "(pip install 'muse-lm[triton]') or pass impl='torch'"
        )
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"{op}: impl='triton' on CPU tensors needs Triton's interpreter; set TRITON_INTERPRET=1 "
            "or pass impl='torch'"
        )
    return "triton"


def compile_boundary(fn: F) -> F:
    """Marks a Triton entry point (launchers + autograd Function) as opaque to `torch.compile`.

    Dynamo would trace into the launchers and the autotuners; with torch 2.11 and Triton 3.6 it
    failed on our autotuners' `early_config_prune` (and under the interpreter it traces the
    interpreter itself). The entry point runs eagerly at a graph break, exactly as uncompiled;
    the torch code around it is still compiled and fused. Outside `torch.compile` this is a no-op.
    """
    return torch.compiler.disable(fn, recursive=True)

"""Differentiable ops. Each takes `impl=None | "torch" | "triton"` (see `_dispatch.resolve_impl`).

One folder per op: `reference.py` (pure torch, CPU-safe), `triton.py` (kernels, where they
exist), `__init__.py` (validate -> dispatch -> autograd).
"""

from muse_lm.ops.causal_conv import causal_conv1d
from muse_lm.ops.lns import from_lns, lns_matmul, to_lns
from muse_lm.ops.log_matmul import log_matmul
from muse_lm.ops.scan import bk_resolvent, linear_recurrence
from muse_lm.ops.semiseparable import semiseparable_scan, semiseparable_step
from muse_lm.ops.tt_cross_entropy import linear_cross_entropy, tt_linear_cross_entropy
from muse_lm.ops.tt_embedding import tt_embedding, tt_reconstruct

__all__ = [
    "bk_resolvent",
    "causal_conv1d",
    "from_lns",
    "linear_cross_entropy",
    "linear_recurrence",
    "lns_matmul",
    "log_matmul",
    "semiseparable_scan",
    "semiseparable_step",
    "tt_embedding",
    "tt_linear_cross_entropy",
    "to_lns",
    "tt_reconstruct",
]

"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for MuseLM, and what the trainer needs to work on
sharded parameters (DTensors): the global gradient norm and per-layer statistics from local shards.

Layout: one `fully_shard` per block, then one on the root. The root's group holds everything
outside the blocks: the HTT cores (the tied embedding *and* head) and the final norm. They are
left to the root on purpose, not wrapped on their own or kept out of sharding by size:

- the cores are used twice per step, by `embed(ids)` at the start and by `embed.loss(h, ...)`
  (a method, not a module call, so a separate FSDP unit around `embed` would never be
  all-gathered for it); the root's parameters are gathered when the root's forward starts and
  FSDP2 keeps the root unsharded until its backward ends, which covers both uses with one
  all-gather and one reduce-scatter per step;
- they are small (Σ_k v_k·r_{k-1}·d_k·r_k: ~0.2M of a 24gb model's parameters), so sharding them
  costs one slot in the root's all-gather and saves little, while replicating them would need a
  second, DDP-style all-reduce path for a handful of tensors. Sharding everything keeps one
  mechanism, one gradient-norm computation and one checkpoint layout.

Mixed precision: on CUDA with `dtype="bf16"`, `MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`: blocks compute with bf16 copies of the weights, gradients are reduced in
fp32 into the fp32 sharded master weights (the layers that need fp32 -- AR-SSM decays, BK
spectral parameters -- cast to fp32 themselves). On the CPU (gloo) everything stays fp32: CPU
runs compute in fp32 anyway (`autocast_context`), and that keeps the CPU tests exact.

Gradient accumulation: by default every micro-batch's backward reduce-scatters, so gradients
are always sharded (FSDP is chosen for memory). With `fsdp_defer_reduce` only the last backward
reduce-scatters (`no_gradient_sync` around the others, FSDP2's counterpart of DDP's `no_sync`),
so the gradient traffic is paid once per step, as under DDP. The price is memory: between those
backwards every rank holds the unsharded gradients of the whole model (in the fp32 reduce dtype),
as large as DDP's gradient buckets; parameters and AdamW state stay sharded.

Activation checkpointing: the model's own per-block checkpoint (`gradient_checkpointing`, which
wraps each block call in `torch.utils.checkpoint` inside `trunk`) is kept. It composes with
FSDP2: in backward the block's pre-backward hook all-gathers first and the recomputed forward
skips FSDP's forward hooks (FSDP2 checks for that state). It changes no parameter names, so
state dicts and checkpoints stay the same with and without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from muse_lm.errors import ConfigError
from muse_lm.training.stability import StabilityMonitor, layer_groups


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def mixed_precision(device: torch.device, dtype: str) -> MixedPrecisionPolicy:
    """bf16 parameters / fp32 reductions on CUDA for bf16 runs; fp32 everywhere else."""
    if device.type == "cuda" and dtype == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, device: torch.device, dtype: str) -> nn.Module:
    """Shards `model` in place over every rank of the default process group: each of
    `model.blocks` is one FSDP unit, the root holds the rest (see the module docstring).
    Build the optimizer after this (its parameters become DTensors). Returns `model`.

    Raises:
        ConfigError: no process group (call `distributed.setup(..., single_rank_group=True)`).
    """
    if not dist.is_initialized():
        raise ConfigError("--parallel fsdp needs a process group; run under torchrun, or through "
                          "`muse train --parallel fsdp` which creates a one-process group")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(device, dtype)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"--parallel fsdp shards a model's `blocks`; {type(model).__name__} has none")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """FSDP2's `no_sync()`: backward passes inside keep their gradients unsharded on each rank
    (accumulated over the passes) instead of reduce-scattering them; the next backward outside
    reduce-scatters the sum once. `model` is the root `fully_shard` module (the setting applies
    to every FSDP unit inside it)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for sharded gradients: the norm over every rank's shards
    (one all-reduce, no host sync), then the same clipping on every rank. Returns the pre-clip
    global norm as a plain 0-d tensor."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Sets every floating-point buffer to its mean over the ranks (one all-reduce each).

    FSDP shards parameters, not buffers: running statistics such as the AR-SSM's `gate_mean`
    EMA are updated by each rank from its own rows. Those EMAs are linear in the batch means, so
    the ranks' average is exactly the EMA of the global batch means that one process would
    hold. The trainer calls this before every checkpoint, so the saved buffers (DCP shards and
    model.safetensors alike) are the same whatever the world size."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for buf in model.buffers():
        if buf is not None and buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(dist.get_world_size())


class _RankMeanActivations(StabilityMonitor):
    """Forward statistics (activation RMS, AR-SSM decay and state, BK features) averaged over the
    ranks, one all-reduce per stats step (queued: no host sync). Each rank records them from its
    own rows; averaged, the monitor's whole state is the same on every rank, so the copy rank 0
    saves in a checkpoint is every rank's and a resume at any world size restores it. Collective:
    the trainer takes them on every rank on the same (stats) steps."""

    def take_activations(self) -> tuple[list[str], torch.Tensor | None]:
        names, values = super().take_activations()
        if values is not None and dist.is_initialized() and dist.get_world_size() > 1:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values = values / dist.get_world_size()
        return names, values


class ShardedStabilityMonitor(_RankMeanActivations):
    """The StabilityMonitor for FSDP-sharded models: per-layer RMS from each rank's shards, summed
    over ranks with one all-reduce, so every rank sees the whole model's statistics (and picks
    the same suspects); forward statistics averaged over ranks. Collective: every rank calls it
    on the same steps, which the trainer guarantees (all ranks take the same decisions)."""

    def layer_stats_tensor(self, model: nn.Module) -> tuple[list[str], torch.Tensor]:
        names, sums, counts = [], [], []
        for key, params in layer_groups(model).items():
            device = local(params[0][1]).device
            zero = torch.zeros((), dtype=torch.float32, device=device)
            grads = [local(p.grad) for _, p in params if p.grad is not None]
            weights = [local(p) for _, p in params]
            names.append(key)
            sums.append(torch.stack([_sum_sq(grads, zero), _sum_sq(weights, zero)]))
            counts.append([float(sum(p.grad.numel() for _, p in params if p.grad is not None)),
                           float(sum(p.numel() for _, p in params))])  # global sizes (DTensor.numel)
        totals = torch.stack(sums)
        if dist.is_initialized():
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)  # queued on the stream: no host sync
        # Divided by Python numbers (kernel arguments), not a tensor built from a list: that
        # would be a blocking host-to-device copy on CUDA.
        rows = [torch.stack([totals[i, 0] / max(g, 1.0), totals[i, 1] / max(w, 1.0)])
                for i, (g, w) in enumerate(counts)]
        return names, torch.stack(rows).sqrt()


class ReplicatedStabilityMonitor(_RankMeanActivations):
    """The StabilityMonitor for DDP: every rank holds the whole model, but a fault (or a bug) can
    make one rank's weights or activations differ, and then each rank would single out different
    layers, re-initialize different weights and broadcast mismatched tensors. The per-layer
    statistics are averaged over the ranks (one all-reduce, queued: no host sync), so every rank
    picks the same suspects. Collective, like ShardedStabilityMonitor."""

    def layer_stats_tensor(self, model: nn.Module) -> tuple[list[str], torch.Tensor]:
        names, stats = super().layer_stats_tensor(model)
        if dist.is_initialized() and dist.get_world_size() > 1:
            stats = stats.clone()
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            stats = stats / dist.get_world_size()
        return names, stats


def _sum_sq(tensors: list[torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    return sum((t.detach().float().pow(2).sum() for t in tensors), zero)

"""Process-group setup for runs started under `torchrun` (WORLD_SIZE > 1), the choice of
parallelism (`--parallel none|ddp|fsdp`), and the few collectives the trainer needs. A single
process with `--parallel none` never touches torch.distributed."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from muse_lm.errors import CheckpointError, ConfigError

PARALLEL_MODES = ("none", "ddp", "fsdp")
log = logging.getLogger("muse_lm")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment (1 process when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_parallel(requested: str | None, info: DistInfo) -> str:
    """`--parallel`: None -> "ddp" under torchrun with WORLD_SIZE > 1, else "none".

    Raises:
        ConfigError: an unknown mode, or "none" with several processes (they would train
            independent copies of the model and race on the run directory).
    """
    if requested is None:
        return "ddp" if info.enabled else "none"
    if requested not in PARALLEL_MODES:
        raise ConfigError(f"--parallel {requested!r} is invalid: use one of {', '.join(PARALLEL_MODES)}")
    if requested == "none" and info.enabled:
        raise ConfigError(f"--parallel none with WORLD_SIZE={info.world_size}: the processes would train "
                          "separate models; use --parallel ddp or fsdp, or run one process without torchrun")
    return requested


def setup(device: torch.device, *, single_rank_group: bool = False) -> DistInfo:
    """Initializes the default process group when started with WORLD_SIZE > 1: NCCL for CUDA
    devices (each rank on cuda:LOCAL_RANK; one process on the device it was given), gloo on the
    CPU. Idempotent.

    `single_rank_group=True` also creates a group of one process when WORLD_SIZE is 1 (DDP or
    FSDP2 on one device need a mesh): from torchrun's environment when it is set, else from an
    in-memory store, so plain `muse train --parallel fsdp` works without torchrun."""
    info = env_dist_info()
    if dist.is_initialized() or not (info.enabled or single_rank_group):
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if device.type == "cuda":
        if info.enabled and device.index is not None and device.index != info.local_rank:
            raise ConfigError(f"--device {device}, but under torchrun this rank (LOCAL_RANK {info.local_rank}) "
                              f"uses cuda:{info.local_rank}; pass --device cuda or leave --device out")
        # One process may name its GPU (--device cuda:1); under torchrun each rank takes its own.
        index = device.index if not info.enabled and device.index is not None else info.local_rank
        torch.cuda.set_device(index)
        kwargs["device_id"] = torch.device("cuda", index)
    if not info.enabled and "MASTER_ADDR" not in os.environ:
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(backend, **kwargs)
    local_world = int(os.environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in os.environ else None
    warning = cpu_thread_warning(info, device, torch.get_num_threads(), _usable_cores(), local_world)
    if warning and info.local_rank == 0:
        log.warning(warning)
    return info


def cpu_thread_warning(info: DistInfo, device: torch.device, threads: int, cores: int | None,
                       local_world: int | None) -> str | None:
    """The warning for GPU workers left with one CPU thread each (torchrun sets OMP_NUM_THREADS=1 unless
    it is set) while this machine's `cores` (those the process may run on) have room for more, else None.
    `local_world`: processes on this machine (torchrun's LOCAL_WORLD_SIZE; None when the launcher does not
    say, and then nothing is suggested). The eager training step is host-bound: on 2 H100s, DDP's step for
    the 24gb preset took 1.97 s with one thread per process and 1.27-1.47 s with 16 (docs/distributed.md)."""
    if not info.enabled or device.type != "cuda" or threads > 1 or not local_world or not cores:
        return None
    share = cores // local_world
    if share <= 1:
        return None
    return (f"each of the {local_world} processes on this machine runs with 1 CPU thread (torchrun's default), "
            f"with {cores} cores available; the eager step is host-bound (DDP's step measured 34-46% longer "
            f"so): set OMP_NUM_THREADS={share} before torchrun")


def _usable_cores() -> int | None:
    """Cores this process may run on (its affinity mask, which containers and schedulers narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum over ranks (no-op for one process); returns the tensor."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank_flag(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """`values` = [x, flag] on this rank -> [mean of x over ranks, 1.0 if any rank's flag is
    set else 0.0], with ONE all-reduce (a sum: the flags' sum is > 0 exactly when their max is
    1). On CUDA the collective is queued on the stream: no host sync."""
    if not info.enabled:
        return values
    summed = all_reduce_sum(values.clone(), info)
    return torch.stack([summed[0] / info.world_size, (summed[1] > 0).to(summed.dtype)])


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank (e.g. a run directory named from rank 0's clock)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def fail_together(info: DistInfo, what: str) -> Iterator[None]:
    """Runs a block on every rank, then makes the ranks agree on its outcome with ONE collective
    (an all-gather of each rank's failure, None when it succeeded). A rank whose block raised
    re-raises its own error; every other rank raises a CheckpointError naming the failed rank
    and its error. Work that only rank 0 does (writing a checkpoint's files) is a block that is
    empty on the other ranks.

    Why: without it, an error on one rank (a full disk, a failed rename) ends that rank while the
    others wait forever in their next collective. Nothing is hidden: every rank raises.

    Args:
        info: this process's rank / world size (one process: no collective, the block as is).
        what: what the block does, for the other ranks' message ("to write checkpoint ...").

    Example:
        >>> with fail_together(info, f"to write checkpoint {path}"):
        ...     if info.is_main:
        ...         write_files(path)
    """
    error: BaseException | None = None
    try:
        yield
    except BaseException as err:  # every rank learns of it in `finally`, then it is re-raised
        error = err
        raise
    finally:
        own = None if error is None else f"{type(error).__name__}: {error}"
        failures = gather_objects(own, info)
        failed = [(rank, why) for rank, why in enumerate(failures) if why is not None]
        if failed and error is None:
            rank, why = failed[0]
            raise CheckpointError(f"rank {rank} failed {what} ({why}); rank {info.rank} stops with it. Fix the "
                                  f"cause that rank {rank} reports (e.g. disk space or permissions of the run "
                                  "directory), then continue the run with --resume")

"""Pure pieces of `training/distributed.py`: the choice of parallelism and the CPU-thread warning."""

from __future__ import annotations

import pytest
import torch

from muse_lm.errors import ConfigError
from muse_lm.training.distributed import DistInfo, cpu_thread_warning, resolve_parallel

CUDA = torch.device("cuda", 0)
TWO = DistInfo(rank=0, world_size=2, local_rank=0)


def test_resolve_parallel():
    assert resolve_parallel(None, DistInfo()) == "none" and resolve_parallel(None, TWO) == "ddp"
    assert resolve_parallel("fsdp", TWO) == "fsdp"
    with pytest.raises(ConfigError, match="separate models"):
        resolve_parallel("none", TWO)
    with pytest.raises(ConfigError, match="invalid"):
        resolve_parallel("zero3", TWO)


def test_cpu_thread_warning_names_the_share_of_cores():
    msg = cpu_thread_warning(TWO, CUDA, threads=1, cores=32, local_world=2)
    assert msg is not None and "OMP_NUM_THREADS=16" in msg and "32 cores" in msg


@pytest.mark.parametrize("info, device, threads, cores, local_world", [
    (DistInfo(), CUDA, 1, 32, 1),  # one process: torchrun's default does not apply
    (TWO, torch.device("cpu"), 1, 32, 2),  # gloo on the CPU: the workers share the cores anyway
    (TWO, CUDA, 16, 32, 2),  # threads already set
    (TWO, CUDA, 1, 2, 2),  # one core per process: nothing to spare
    (TWO, CUDA, 1, None, 2),  # unknown core count
    (TWO, CUDA, 1, 32, None),  # a launcher that does not say how many processes share the machine
])
def test_cpu_thread_warning_stays_quiet(info, device, threads, cores, local_world):
    assert cpu_thread_warning(info, device, threads, cores, local_world) is None

"""Sharded checkpoints through `torch.distributed.checkpoint` (DCP) for `--parallel ddp|fsdp`.

A distributed checkpoint directory is a normal one (docs/distributed.md)::

    step-NNNNNNN/
      model.safetensors   full weights, gathered and written by rank 0 (from_pretrained, eval,
                          generate read it as any other checkpoint)
      config.json  tokenizer.json
      train_state.pt      everything but weights and optimizer state (step, scheduler, every
                          rank's RNG, monitor, ladder), written by rank 0; "sharded": True
      dcp/                model + AdamW state as DCP shards (.metadata + one .distcp per rank)
      checksums.json      of every file above, dcp/ included

Atomicity is the single-process rule: rank 0 creates the hidden temp directory, every rank
writes its shards into it, and rank 0 renames it into place only after DCP's final gather has
confirmed every rank's writes (and after the other files and the checksums), then updates
`latest`. The directory must be on a filesystem every rank sees (one machine, or a shared
filesystem across nodes).

Failures: what rank 0 does alone (the temp directory; the other files, the rename, `latest`)
is followed by one collective through which every rank learns whether it failed
(`distributed.fail_together`): rank 0 raises its own error, the others a CheckpointError that
names it, and nobody is left waiting in a barrier. DCP itself reports a failed shard write on
every rank.

State dicts come from `get_state_dict` / `set_state_dict` (keys are parameter names, tensors
are DTensors under FSDP), so a checkpoint written by N ranks loads at any other world size,
and in a single process without a process group (DCP reads the shards it needs).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from muse_lm.errors import CheckpointError
from muse_lm.io import atomic_directory, checkpoint_name, prune_checkpoints, update_latest
from muse_lm.training.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    TRAIN_STATE_FILE,
    _safetensors_ready,
)
from muse_lm.training.distributed import DistInfo, broadcast_object, fail_together
from muse_lm.training.optim import param_groups

DCP_DIR = "dcp"


def is_sharded_checkpoint(ckpt_dir: str | os.PathLike) -> bool:
    """Whether a checkpoint directory holds DCP shards (written by a ddp / fsdp run)."""
    return (Path(ckpt_dir) / DCP_DIR / ".metadata").is_file()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, on rank 0 ({} on the other ranks). Collective for a
    sharded model (an all-gather per tensor); a plain or DDP-wrapped model is read directly."""
    from muse_lm.training.fsdp import is_sharded

    if is_sharded(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_sharded_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module,
                            optimizer: torch.optim.Optimizer, config: dict, tokenizer_json: str,
                            train_state: dict, keep: int, info: DistInfo) -> Path:
    """Writes `run_dir/step-NNNNNNN/` as described in the module docstring. Collective: every rank
    calls it with its own model / optimizer; only rank 0 passes meaningful `train_state` etc.
    (the others' are ignored). Returns the final directory.

    Raises:
        CheckpointError: on every rank but 0 when rank 0 failed its part (creating the temp
            directory, writing the files, the rename, `latest`); rank 0 raises its own error
            (e.g. OSError). A failure inside `dcp.save` is raised by DCP on every rank.
    """
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    model_state, optim_state = get_state_dict(model, optimizer)
    shards = {"model": model_state, "optim": optim_state}
    with contextlib.ExitStack() as on_rank0:  # holds rank 0's temp directory (removed on any error)
        tmp = None
        with fail_together(info, f"to create the temporary directory of checkpoint {final}"):
            if info.is_main:
                tmp = on_rank0.enter_context(atomic_directory(final))
        tmp = Path(broadcast_object(None if tmp is None else str(tmp), info))
        dcp.save(shards, checkpoint_id=tmp / DCP_DIR)
        full = full_model_state(model)  # collective under FSDP (all-gathers); {} on ranks other than 0
        # The other ranks wait here until rank 0 has renamed the checkpoint into place and updated
        # `latest` (the agreement's collective is the final barrier), and learn if it failed.
        with fail_together(info, f"to write checkpoint {final}"):
            if info.is_main:
                _write_rank0_files(tmp, full, config, tokenizer_json, train_state)
                on_rank0.close()  # checksums, fsync, atomic rename onto `final`
                update_latest(run_dir, final.name)
                prune_checkpoints(run_dir, keep)
    return final


def _write_rank0_files(tmp: Path, full: dict[str, torch.Tensor], config: dict, tokenizer_json: str,
                       train_state: dict) -> None:
    """model.safetensors, config.json, tokenizer.json and train_state.pt into the temp directory."""
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    safetensors.torch.save_file(_safetensors_ready(full), tmp / MODEL_FILE)
    (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
    (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    torch.save({**train_state, "optimizer": None, "sharded": True}, tmp / TRAIN_STATE_FILE)


def load_sharded_state(ckpt_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Loads the DCP shards of `ckpt_dir` into `model` and `optimizer` at this run's world size
    and sharding (a plain model in a single process works too: DCP needs no process group then).
    Collective under a process group: every rank calls it.

    Raises:
        CheckpointError: the directory has no DCP shards, or they do not fit the model.
    """
    ckpt_dir = Path(ckpt_dir)
    if not is_sharded_checkpoint(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} has no {DCP_DIR}/ shards; it is a single-process checkpoint")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        with warnings.catch_warnings():
            # One process without a process group is a supported case here (2 -> 1 resume), not a mistake.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=ckpt_dir / DCP_DIR)
    except (RuntimeError, ValueError, KeyError, CheckpointException) as err:
        first = _first_line(err)
        raise CheckpointError(f"{ckpt_dir / DCP_DIR}: the shards do not match this model ({first}); the "
                              "checkpoint is damaged or from another model shape") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _first_line(err: BaseException) -> str:
    """The cause of a failed `dcp.load` in one line. DCP wraps every rank's error in a
    CheckpointException (a BaseException, whose text is a traceback); the first wrapped error
    is the one that says what did not fit."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict, weight_decay: float) -> None:
    """Loads a single-process checkpoint (full weights + `optimizer.state_dict()` keyed by
    parameter number) into a sharded or wrapped `model` and its optimizer: each rank keeps its
    shard. The numbers are mapped to names through the optimizer's parameter order
    (`optim.param_groups`, the order `build_optimizer` used)."""
    groups = param_groups(model, weight_decay)
    names_by_id = {id(p): name for name, p in model.named_parameters()}
    order = [names_by_id[id(p)] for group in groups for p in group["params"]]
    by_name = {"state": {}, "param_groups": []}
    for index, values in optimizer_state["state"].items():
        by_name["state"][order[int(index)]] = values
    for group in optimizer_state["param_groups"]:
        by_name["param_groups"].append({**group, "params": [order[int(i)] for i in group["params"]]})
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=by_name, options=options)

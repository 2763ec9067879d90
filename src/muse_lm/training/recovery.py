"""`RecoveryPolicy`: what to do about an unhealthy step, escalating one rung per anomaly.

The ladder (level -> action on the anomaly that reaches it):

    1 skip      drop this update (the batch is consumed, the weights stay)
    2 lr_cut    and halve the learning rate while the level stays >= 2
    3 clip      and halve the clipping threshold while the level stays >= 3
    4 rollback  restore the last good state (a snapshot confirmed by `confirm_after` healthy
                steps, else the last loadable checkpoint) and skip the batches after it
    5 reinit    roll back and re-initialize the weight matrices of the layers the monitor
                singles out (their optimizer state reset)
    6 stop      raise `TrainingStopped`; the last good checkpoint is left as it is

The level drops by one after every `decay_after` consecutive healthy steps, so isolated spikes
over a long run never add up to a stop. An episode that stays at `skip` and was caused by a
finite outlier counts as a false alarm; after `widen_after` of them the monitor's thresholds
widen. Every action is appended to `events.jsonl` as `{"step", "action", "reason", ...}`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from muse_lm.config_utils import config_from_dict, require
from muse_lm.errors import CheckpointError
from muse_lm.io import list_checkpoints, resolve_checkpoint_dir, verify_checksums
from muse_lm.training.stability import StabilityMonitor, Verdict, layer_groups

log = logging.getLogger("muse_lm")

LADDER = ("skip", "lr_cut", "clip", "rollback", "reinit", "stop")
ACTIONS = (*LADDER, "widen")
EVENTS_FILE = "events.jsonl"


class TrainingStopped(RuntimeError):
    """The recovery ladder ran out of rungs; the message says why and what is kept."""


@dataclass
class RecoveryConfig:
    """Ladder settings. Defaults: a level decays after 30 healthy steps (short enough that an
    LR cut ends soon after the trouble, long enough that a burst of bad steps escalates);
    snapshots every 25 steps, trusted after 10 more healthy steps."""

    decay_after: int = 30  # W: healthy steps that lower the level by one
    lr_factor: float = 0.5  # LR multiplier while level >= 2
    clip_factor: float = 0.5  # clipping-threshold multiplier while level >= 3
    snapshot_every: int = 25  # steps between in-memory snapshot candidates
    confirm_after: int = 10  # K: healthy steps that confirm a candidate snapshot
    widen_after: int = 3  # false alarms before the monitor's thresholds widen
    widen_factor: float = 1.5

    def __post_init__(self) -> None:
        for name in ("decay_after", "snapshot_every", "confirm_after", "widen_after"):
            value = getattr(self, name)
            positive = isinstance(value, int) and not isinstance(value, bool) and value > 0
            require("RecoveryConfig", positive, name, value, "must be a positive integer")
        for name, low, high in (("lr_factor", 0, 1), ("clip_factor", 0, 1), ("widen_factor", 1, math.inf)):
            value = getattr(self, name)
            real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            require("RecoveryConfig", real and low < value < high, name, value,
                    f"must be a number in ({low}, {high})")

    @classmethod
    def from_dict(cls, data: dict) -> RecoveryConfig:
        return config_from_dict(cls, data)


@dataclass
class Decision:
    """What to do with the current step. `action` is None on a healthy step."""

    step: int
    action: str | None = None
    reason: str = ""
    apply_update: bool = True
    lr_scale: float = 1.0
    clip_scale: float = 1.0
    suspects: list[str] = field(default_factory=list)


class EventLog:
    """Appends one JSON object per line to `path` (flushed at once: a crash loses nothing)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def write(self, event: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, sort_keys=True) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]


class RecoveryPolicy:
    """The ladder above. `step(verdict, suspects)` returns the Decision for one step.

    Args:
        config: RecoveryConfig.
        monitor: widened after repeated false alarms (optional).
        events: where actions are logged (optional).
        notify: also called with a one-line description of every action (e.g. a progress bar).

    Example (a user's own loop):
        >>> policy = RecoveryPolicy(RecoveryConfig(), monitor=monitor, events=EventLog("events.jsonl"))
        >>> decision = policy.step(verdict, monitor.suspect_layers(model) if not verdict.healthy else [])
        >>> if decision.apply_update: optimizer.step()
    """

    def __init__(self, config: RecoveryConfig | None = None, *, monitor: StabilityMonitor | None = None,
                 events: EventLog | None = None, notify: Callable[[str], None] | None = None) -> None:
        self.config = config or RecoveryConfig()
        self.monitor = monitor
        self.events = events
        self.notify = notify
        self.level = 0
        self.healthy_run = 0
        self.episode_peak = 0
        self.episode_finite = True  # every anomaly of this episode was a finite outlier
        self.false_alarms = 0

    @property
    def lr_scale(self) -> float:
        return self.config.lr_factor if self.level >= 2 else 1.0

    @property
    def clip_scale(self) -> float:
        return self.config.clip_factor if self.level >= 3 else 1.0

    def step(self, verdict: Verdict, suspects: list[str] | None = None) -> Decision:
        if verdict.healthy:
            self._healthy(verdict.step)
            return Decision(verdict.step, lr_scale=self.lr_scale, clip_scale=self.clip_scale)
        self.healthy_run = 0
        self.level = min(self.level + 1, len(LADDER))
        self.episode_peak = max(self.episode_peak, self.level)
        self.episode_finite = self.episode_finite and verdict.finite
        action = LADDER[self.level - 1]
        decision = Decision(verdict.step, action, verdict.reason, apply_update=False, lr_scale=self.lr_scale,
                            clip_scale=self.clip_scale, suspects=list(suspects or []))
        extra: dict[str, Any] = {"level": self.level, "loss": _json_float(verdict.loss),
                                 "grad_norm": _json_float(verdict.grad_norm)}
        if decision.suspects:
            extra["layers"] = decision.suspects
        if action not in ("rollback", "reinit"):
            # Rollback / re-init are recorded by whoever carries them out, with what was restored.
            self.record(verdict.step, action, verdict.reason, **extra)
        return decision

    def _healthy(self, step: int) -> None:
        if self.level == 0:
            return
        self.healthy_run += 1
        if self.healthy_run < self.config.decay_after:
            return
        self.healthy_run = 0
        self.level -= 1
        if self.level == 0:
            if self.episode_peak == 1 and self.episode_finite:
                self.false_alarms += 1
                if self.false_alarms >= self.config.widen_after and self.monitor is not None:
                    self.false_alarms = 0
                    self.monitor.widen(self.config.widen_factor)
                    self.record(step, "widen", f"{self.config.widen_after} isolated outliers were false "
                                f"alarms; outlier thresholds x{self.monitor.scale:.3g}")
            self.episode_peak, self.episode_finite = 0, True

    def record(self, step: int, action: str, reason: str, **extra: Any) -> None:
        """Logs one action to events.jsonl and the notify callback."""
        if action not in ACTIONS:
            raise ValueError(f"record: action {action!r} is not one of {ACTIONS}")
        if self.events is not None:
            self.events.write({"step": step, "action": action, "reason": reason, **extra})
        if self.notify is not None:
            self.notify(f"step {step}: {action} ({reason})")

    def state_dict(self) -> dict:
        return {"level": self.level, "healthy_run": self.healthy_run, "episode_peak": self.episode_peak,
                "episode_finite": self.episode_finite, "false_alarms": self.false_alarms}

    def load_state_dict(self, state: dict) -> None:
        self.level = int(state["level"])
        self.healthy_run = int(state["healthy_run"])
        self.episode_peak = int(state["episode_peak"])
        self.episode_finite = bool(state["episode_finite"])
        self.false_alarms = int(state["false_alarms"])


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


# ---- snapshots -----------------------------------------------------------------------------------
class SnapshotKeeper:
    """In-memory snapshots: a candidate every `every` steps, trusted ("good") once `confirm`
    further steps were healthy; an unhealthy step discards the unconfirmed candidate."""

    def __init__(self, every: int, confirm: int) -> None:
        self.every, self.confirm = every, confirm
        self.pending: tuple[int, Any] | None = None
        self.good: tuple[int, Any] | None = None

    def update(self, step: int, healthy: bool, capture: Callable[[], Any], ahead: int = 0) -> None:
        """After the verdict on the `step`-th step (so `step` steps are verified), healthy or
        not. `capture()` returns the current state, which may be `ahead` unverified steps past
        them (a lagged monitor): a candidate is trusted once `confirm` verified steps lie past
        the state it holds."""
        if not healthy:
            self.pending = None
            return
        if self.pending is not None and step - self.pending[0] >= self.confirm:
            self.good, self.pending = self.pending, None
        if self.pending is None and (step + ahead) % self.every == 0:
            self.pending = (step + ahead, capture())


def capture_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> dict:
    """A deep copy of model, optimizer and (optionally) scheduler state."""
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "scheduler": copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None}


def restore_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
    """Inverse of `capture_state` (the snapshot stays usable for another restore)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))


@torch.no_grad()
def reinit_layers(model: nn.Module, optimizer: torch.optim.Optimizer | None, layers: list[str]) -> list[str]:
    """Re-draws the weight matrices (2-D+ parameters) of `layers` (names from `layer_groups`)
    from a normal with each matrix's current std (0.02 if that is not finite or zero), and
    resets their optimizer state. Norm gains and biases are kept. Returns the parameter names."""
    groups = layer_groups(model)
    done = []
    for layer in layers:
        for name, p in groups.get(layer, []):
            if p.dim() < 2:
                continue
            std = float(p.float().std())
            p.normal_(0.0, std if math.isfinite(std) and 0 < std < 1 else 0.02)
            if optimizer is not None:
                optimizer.state.pop(p, None)
            done.append(name)
    return done


def load_last_good_checkpoint(run_dir: str | os.PathLike, *, map_location: str | torch.device = "cpu"):
    """The newest checkpoint of `run_dir` that loads and verifies: the one `latest` names,
    else older `step-*` folders, newest first; each one skipped is reported with a warning.

    Raises:
        CheckpointError: no checkpoint of the run is loadable (every reason listed).
    """
    from muse_lm.training.checkpoint import load_checkpoint

    return _first_good(Path(run_dir), lambda path: load_checkpoint(path, map_location=map_location))


def last_good_train_state(run_dir: str | os.PathLike) -> tuple[Path, dict]:
    """(directory, train state on the CPU) of the checkpoint `load_last_good_checkpoint` would
    pick, without reading the weights: every file's checksum is verified (DCP shards included)
    and train_state.pt is read. For a rollback of a sharded run, whose ranks then each load
    their own shards; rank 0 calls it and tells the other ranks what it chose.

    Raises:
        CheckpointError: no checkpoint of the run verifies or has a readable train_state.pt.
    """
    from muse_lm.training.checkpoint import TRAIN_STATE_FILE, _load_train_state

    def read(path: Path) -> tuple[Path, dict]:
        verify_checksums(path)
        if not (path / TRAIN_STATE_FILE).is_file():
            raise CheckpointError(f"{path} has no {TRAIN_STATE_FILE} (it was not written by training)")
        return path, _load_train_state(path / TRAIN_STATE_FILE, "cpu")

    return _first_good(Path(run_dir), read)


def _first_good(run_dir: Path, load: Callable[[Path], Any]) -> Any:
    """`load(path)` of the first checkpoint of `run_dir` that `load` accepts (no CheckpointError):
    the one `latest` names, then the `step-*` folders newest first, each skip warned about."""
    candidates: list[Path] = []
    try:
        candidates.append(resolve_checkpoint_dir(run_dir))
    except CheckpointError as err:
        log.warning("muse: warning: %s", err)
    candidates += [p for p in reversed(list_checkpoints(run_dir)) if p not in candidates]
    failures = []
    for path in candidates:
        try:
            loaded = load(path)
        except CheckpointError as err:
            failures.append(str(err))
            log.warning("muse: warning: skipping checkpoint %s: %s; trying the previous one", path.name, err)
            continue
        if failures:
            log.warning("muse: warning: using checkpoint %s (the newer ones are damaged)", path)
        return loaded
    raise CheckpointError(f"{run_dir} has no loadable checkpoint ({'; '.join(failures) or 'none found'}); "
                          "start a new run, or restore the run directory from a backup")

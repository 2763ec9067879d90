"""`RunOptions` (what a user asks of a training run), `RunResult` (what it produced) and
`--set KEY=VALUE` overrides of MuseConfig / TrainConfig fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muse_lm.errors import ConfigError
from muse_lm.models.config import MuseConfig
from muse_lm.training.config import TrainConfig

# Fields that cannot be given as a scalar on the command line.
_NOT_SETTABLE = {"extra", "ranks"}  # ranks: set by prune_ranks, not by hand


@dataclass
class RunOptions:
    """A training run request, as `muse train` takes it.

    Every field may stay at its default: the `auto` preset on the embedded corpus, the preset's
    step count, a fresh `runs/<preset>-<timestamp>` directory.
    """

    preset: str | None = None  # None: "auto" (or the resumed run's preset)
    data: str | None = None  # corpus spec for load_corpus; None: embedded stdlib corpus
    tokenizer: str | None = None  # tokenizer.json to use instead of training one
    steps: int | None = None  # total optimizer steps (the LR schedule's length)
    stop_at: int | None = None  # stop (with a checkpoint) after this step
    out: str | None = None  # run directory
    seed: int | None = None  # None: 0 (or the resumed run's seed)
    resume: bool = False  # continue the run in `out` from its latest checkpoint
    overrides: dict[str, Any] = field(default_factory=dict)  # MuseConfig/TrainConfig fields
    device: str | None = None  # None: cuda:LOCAL_RANK when CUDA is available, else cpu
    progress: bool = True  # progress bar / log lines on stderr
    faults: list[str] = field(default_factory=list)  # --inject-fault KIND@STEP (testing the recovery ladder)
    parallel: str | None = None  # none | ddp | fsdp; None: ddp under torchrun with WORLD_SIZE > 1, else none

    def __post_init__(self) -> None:
        for name in ("steps", "stop_at"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} is invalid: it must be a "
                                  "positive integer")
        if self.steps is not None and self.stop_at is not None and self.stop_at > self.steps:
            raise ConfigError(f"--stop-at {self.stop_at} is after --steps {self.steps}: pass a --stop-at "
                              "<= --steps (--stop-at ends this invocation early; --steps sets the schedule)")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"--seed {self.seed!r} is invalid: use an integer >= 0")
        if self.resume and self.out is None:
            raise ConfigError("--resume needs --out DIR naming the run directory to continue")
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise ConfigError(f"--tokenizer {self.tokenizer}: no such file; pass a tokenizer.json "
                              "(e.g. one saved in a run's checkpoint) or leave it out to train one")
        from muse_lm.training.faults import parse_fault

        for spec in self.faults:
            parse_fault(spec)
        from muse_lm.training.distributed import PARALLEL_MODES

        if self.parallel is not None and self.parallel not in PARALLEL_MODES:
            raise ConfigError(f"--parallel {self.parallel!r} is invalid: use one of {', '.join(PARALLEL_MODES)}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r} is invalid: use cpu, cuda or cuda:N")


@dataclass
class RunResult:
    """Where a run's outputs are, and how the held-out loss moved."""

    run_dir: Path
    preset: str
    step: int  # last completed optimizer step
    steps: int  # the schedule's total
    latest_checkpoint: Path | None
    metrics_path: Path
    plot_path: Path
    start_eval_loss: float | None
    end_eval_loss: float | None
    elapsed_s: float


def settable_keys() -> list[str]:
    """Names accepted by `--set`: every scalar MuseConfig and TrainConfig field."""
    names = [f.name for cls in (MuseConfig, TrainConfig) for f in dataclasses.fields(cls)]
    return sorted(n for n in names if n not in _NOT_SETTABLE)


def parse_value(text: str) -> Any:
    """`--set` value: true/false -> bool, none -> None, then int, then float, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_set_args(items: list[str]) -> dict[str, Any]:
    """["d_model=64", "train.lr=1e-3"] -> {"d_model": 64, "lr": 0.001}. Keys may carry a
    "model." or "train." prefix; unknown keys raise ConfigError listing the valid ones."""
    valid = settable_keys()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE (e.g. --set d_model=64)")
        for prefix in ("model.", "train."):
            key = key.removeprefix(prefix)
        if key not in valid:
            raise ConfigError(f"--set {key}: unknown key; valid keys are {', '.join(valid)}")
        out[key] = parse_value(value)
    return out


def _nullable(cls: type, key: str) -> bool:
    """Whether dataclass field `key` of `cls` is annotated to accept None."""
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    return "None" in str(kind) or "Optional" in str(kind)


def _coerce(cls_name: str, key: str, current: Any, value: Any, nullable: bool = True) -> Any:
    """Casts an override to the field's type (int -> float is fine, 2.5 -> int is not)."""
    if value is None and not nullable and current is not None:
        raise ConfigError(f"--set {key}=none: {cls_name}.{key} cannot be None; give a "
                          f"{type(current).__name__} (now {current!r})")
    if current is None or value is None:
        return value
    kind = type(current)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is str and not isinstance(value, str):
        return str(value)
    if type(value) is not kind:
        raise ConfigError(f"--set {key}={value!r}: {cls_name}.{key} takes a {kind.__name__} "
                          f"(now {current!r})")
    return value


def apply_overrides(model: MuseConfig, train: TrainConfig, overrides: dict[str, Any]
                    ) -> tuple[MuseConfig, TrainConfig]:
    """New configs with `overrides` applied (validated by the configs' __post_init__)."""
    model_fields = {f.name for f in dataclasses.fields(MuseConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    m_kw, t_kw = {}, {}
    for key, value in overrides.items():
        if key in model_fields and key not in _NOT_SETTABLE:
            m_kw[key] = _coerce("MuseConfig", key, getattr(model, key), value, _nullable(MuseConfig, key))
        elif key in train_fields:
            t_kw[key] = _coerce("TrainConfig", key, getattr(train, key), value, _nullable(TrainConfig, key))
        else:
            raise ConfigError(f"--set {key}: unknown key; valid keys are {', '.join(settable_keys())}")
    return dataclasses.replace(model, **m_kw), dataclasses.replace(train, **t_kw)

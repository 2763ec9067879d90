"""Validation helpers shared by the dataclass configs (MuseConfig, TrainConfig, ...)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from muse_lm.errors import ConfigError

T = TypeVar("T")


def require(owner: str, cond: bool, name: str, value: Any, fix: str) -> None:
    """Raises ConfigError naming `owner.name`, its value and the fix, unless `cond`."""
    if not cond:
        raise ConfigError(f"{owner}.{name}={value!r} is invalid: {fix}")


def config_from_dict(cls: type[T], data: dict) -> T:
    """`cls(**data)`, but an unknown key is an error that lists the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {unknown}; known fields are {sorted(known)}")
    return cls(**data)

"""Checks shared by the kernels' launch-config dataclasses, called from their `__post_init__`: a bad
tile, warp count or stage count is refused when the config is made, with the class and field named."""

from __future__ import annotations


def _name(config) -> str:
    return type(config).__name__


def check_tiles(config, *fields: str, minimum: int = 1, why: str = "") -> None:
    """Each field is a power of two >= minimum (tile sides of tl.arange / tl.dot); `why` ends the message."""
    for field in fields:
        value = getattr(config, field)
        if value < minimum or value & (value - 1):
            bound = f" >= {minimum}" if minimum > 1 else ""
            suffix = f" ({why})" if why else ""
            raise ValueError(f"{_name(config)}: {field}={value} must be a power of two{bound}{suffix}")


def check_warps(config, allowed: tuple[int, ...] = (1, 2, 4, 8)) -> None:
    """num_warps is one of `allowed`."""
    if config.num_warps not in allowed:
        listed = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"
        raise ValueError(f"{_name(config)}: num_warps={config.num_warps} must be {listed}")


def check_at_least_one(config, *fields: str) -> None:
    """Each field (stage counts, group sizes) is >= 1."""
    for field in fields:
        value = getattr(config, field)
        if value < 1:
            raise ValueError(f"{_name(config)}: {field}={value} must be >= 1")

"""Per-request sampling settings and the server's limits (validated dataclasses)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from muse_lm.errors import ConfigError

MAX_STOP_STRINGS = 4  # OpenAI's own limit for `stop`


@dataclass(kw_only=True, frozen=True)
class SamplingParams:
    """How one request is decoded. Raises ValueError naming the field on a bad value."""

    max_tokens: int = 16
    """New tokens at most (the `length` finish reason)."""
    temperature: float = 1.0
    """0 = greedy."""
    top_k: int | None = None
    """Keep only the k most likely tokens (None: all)."""
    top_p: float | None = None
    """Nucleus: keep the smallest set whose probability reaches top_p (None or 1: all)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or the output (CTRL: logit / p if > 0, else * p)."""
    stop: tuple[str, ...] = field(default=())
    """Generation ends before the first of these strings; the string is not returned."""
    seed: int | None = None
    """Seeds this request's own generator, so its samples do not depend on the other requests."""
    ignore_eos: bool = False
    """Keep going past the end-of-text token (benchmarks and tests that need exactly max_tokens)."""

    def __post_init__(self) -> None:
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "must be an integer >= 1")
        _check(_is_number(self.temperature) and 0 <= self.temperature <= 100, "temperature", self.temperature,
               "must be a number in [0, 100] (0 = greedy)")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1), "top_k", self.top_k,
               "must be an integer >= 1 or null")
        _check(self.top_p is None or (_is_number(self.top_p) and 0 < self.top_p <= 1), "top_p", self.top_p,
               "must be a number in (0, 1] or null")
        _check(_is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty",
               self.repetition_penalty, "must be a number in (0, 10] (1 = off)")
        _check(isinstance(self.stop, tuple) and len(self.stop) <= MAX_STOP_STRINGS
               and all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               f"must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63), "seed", self.seed,
               "must be an integer in [0, 2**63) or null")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "must be true or false")


@dataclass(kw_only=True, frozen=True)
class ServeLimits:
    """What one server accepts; a request beyond these gets a 4xx with the limit in the message."""

    max_batch_size: int = 32
    """Sequences decoded together at most; more wait in the queue."""
    max_queue: int = 256
    """Requests waiting for a batch slot at most; beyond it new requests get 429."""
    max_prompt_tokens: int = 4096
    """Longer prompts get 400 (prefill is one chunked pass, so its time grows with the prompt)."""
    max_tokens_cap: int = 2048
    """Requests asking for more new tokens get 400."""
    max_request_bytes: int = 1 << 20
    """Larger request bodies get 413, checked from Content-Length and while the body is read (before
    JSON parsing and tokenization). 1 MiB holds a prompt far beyond max_prompt_tokens' default."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_prompt_tokens", "max_tokens_cap", "max_request_bytes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"ServeLimits.{name}={value!r} is invalid: it must be an integer >= 1")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: it {rule}")

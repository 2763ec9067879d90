"""Next-token sampling: temperature, top-k, top-p (nucleus), repetition penalty.

One implementation for `MuseLM.generate*` and the server (`muse_lm.serving.text.sample_token`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def validate_sampling(*, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      repetition_penalty: float = 1.0) -> None:
    """Raises ValueError naming the first bad setting (what it is, what it must be)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    check_repetition_penalty(repetition_penalty)


def check_repetition_penalty(penalty: float) -> None:
    """Raises ValueError unless penalty is a finite number > 0 (1 = off, > 1 discourages repeats)."""
    if isinstance(penalty, bool) or not isinstance(penalty, int | float) or not math.isfinite(penalty) \
            or penalty <= 0:
        raise ValueError(f"repetition_penalty={penalty!r} must be a finite number > 0 (1.0 = off; values > 1 "
                         "push down tokens already in the prompt or the output)")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [..., V], seen [..., V] bool (ids in the prompt or the output so far) -> logits with the
    seen ids pushed down (CTRL's rule): l / penalty where l > 0, l * penalty elsewhere.

    penalty == 1 returns `logits` itself (no copy). Example: [2, -2] both seen, penalty 2 -> [1, -4].
    """
    check_repetition_penalty(penalty)
    if penalty == 1.0:
        return logits
    pushed = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, pushed, logits)


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> ids [B]. temperature == 0 is greedy (argmax)."""
    validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class RowSampler:
    """Draws the next token of every row of a batch, each with the repetition history of its own
    prompt and output; rows can be reordered or leave between draws (`select`).

    Args:
        prompts: each row's prompt ids, 1-D (what the repetition penalty counts as seen at the start).
        vocab_size: V, the logits' last dimension.
        temperature, top_k, top_p, repetition_penalty: as in `sample_next` / `apply_repetition_penalty`.
        generator: None draws from torch's global generator; one generator draws the whole batch at once
            (what `generate` does); a list gives row i its own, so a row draws exactly what it would
            draw alone (what `generate_batch` and the server do).

    Example:
        sampler = RowSampler([p0, p1], V, temperature=0.8, generator=[g0, g1])
        ids = sampler.sample(logits)  # [2]
        sampler.select([1])           # row 0 finished
    """

    def __init__(self, prompts: Sequence[torch.Tensor], vocab_size: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None):
        validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        if isinstance(generator, Sequence) and len(generator) != len(prompts):
            raise ValueError(f"got {len(generator)} generators for {len(prompts)} rows; pass one per row")
        self.temperature, self.top_k, self.top_p, self.penalty = temperature, top_k, top_p, repetition_penalty
        self.generator = list(generator) if isinstance(generator, Sequence) else generator
        self.seen: torch.Tensor | None = None  # [B, V] bool; only kept when the penalty is on
        if repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=prompts[0].device)
            for row, ids in enumerate(prompts):
                self.seen[row, ids] = True

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] (row i = row i of the current batch) -> ids [B]; records them as seen."""
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        settings = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        per_row = isinstance(self.generator, list)
        if per_row and self.temperature > 0:
            if len(self.generator) != logits.shape[0]:
                raise ValueError(f"logits have {logits.shape[0]} rows but the sampler {len(self.generator)}")
            nxt = torch.cat([sample_next(logits[i:i + 1], **settings, generator=g)
                             for i, g in enumerate(self.generator)])
        else:  # greedy draws nothing; one generator (or none) draws for all rows at once
            nxt = sample_next(logits, **settings, generator=None if per_row else self.generator)
        if self.seen is not None:
            self.seen[torch.arange(nxt.shape[0], device=nxt.device), nxt] = True
        return nxt

    def select(self, rows: Sequence[int]) -> None:
        """Keeps rows `rows` of the batch, in that order (finished rows leave; a permutation reorders)."""
        if isinstance(self.generator, list):
            self.generator = [self.generator[i] for i in rows]
        if self.seen is not None:
            self.seen = self.seen[torch.as_tensor(list(rows), dtype=torch.long, device=self.seen.device)]

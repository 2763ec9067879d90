"""Batched decoding with the recurrent state cache: one row of state per sequence.

A MuseLM's cache is a list (one entry per block) of `BlockState`s whose tensors all have the batch
first: the conv buffer [B, conv_size - 1, D], the AR-SSM state [B, H, R, P] and the BK resolvent
[B, K]. Nothing in a decode step mixes rows (no attention, no positions), so sequences of different
lengths can step together, and a row can join (`cat_states`) or leave (`select_states`) the batch
between steps. A continuous-batching server is built from `prefill`, `decode_step` and these two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from muse_lm.layers import ARSSMState
from muse_lm.models.muse import BlockState, MuseLM
from muse_lm.models.sampling import RowSampler

if TYPE_CHECKING:  # decode_graph imports this module
    from muse_lm.models.decode_graph import MuseDecoder

States = list[BlockState]


def prefill(model: MuseLM, ids: torch.Tensor) -> tuple[torch.Tensor, States]:
    """ids [B, T] (T >= 1) -> (next-token logits [B, V], states) with one chunked pass over the prompt."""
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"prefill needs a non-empty prompt of shape [batch, time], got {tuple(ids.shape)}")
    h, _, states = model.trunk(ids, return_state=True)
    return model.head_logits(h[:, -1]), states


def decode_step(model: MuseLM, ids: torch.Tensor, states: States) -> tuple[torch.Tensor, States]:
    """ids [B] (each row's newest token) + states of B rows -> (logits [B, V], the rows' next states).

    O(1) in the number of tokens each row has seen; rows may have seen different numbers.
    """
    if ids.dim() != 1:
        raise ValueError(f"decode_step takes one token per row, shape [batch]; got {tuple(ids.shape)}")
    if batch_size(states) != ids.shape[0]:
        raise ValueError(f"decode_step got {ids.shape[0]} tokens for a state of {batch_size(states)} rows")
    h, _, states = model.trunk(ids[:, None], states)
    return model.head_logits(h[:, 0]), states


def batch_size(states: States) -> int:
    """Number of rows (sequences) the cache holds."""
    if not states:
        raise ValueError("the state cache is empty (a model has at least one block)")
    return states[0].ssm.ssm.shape[0]


def cat_states(parts: Sequence[States]) -> States:
    """Stacks the rows of several caches (same model) into one: [B1 + B2 + ..., ...], in order."""
    if not parts:
        raise ValueError("cat_states needs at least one cache")
    if len({len(p) for p in parts}) != 1:
        raise ValueError(f"caches from models of different depths cannot be joined: {[len(p) for p in parts]}")
    out = []
    for blocks in zip(*parts):
        ssm = ARSSMState(torch.cat([b.ssm.conv for b in blocks]), torch.cat([b.ssm.ssm for b in blocks]))
        has_bk = {b.bk is not None for b in blocks}
        if len(has_bk) != 1:
            raise ValueError("caches from models with and without BK features cannot be joined")
        bk = torch.cat([b.bk for b in blocks]) if has_bk.pop() else None
        out.append(BlockState(ssm, bk))
    return out


def select_states(states: States, rows: torch.Tensor | Sequence[int]) -> States:
    """The cache restricted to `rows` (indices, in the order given): removes finished sequences."""
    index = torch.as_tensor(rows, dtype=torch.long, device=states[0].ssm.ssm.device)
    if index.dim() != 1:
        raise ValueError(f"rows must be a 1-D list of indices, got shape {tuple(index.shape)}")
    n = batch_size(states)
    if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
        raise ValueError(f"rows {index.tolist()} are out of range for a cache of {n} rows")
    return [BlockState(ARSSMState(b.ssm.conv[index], b.ssm.ssm[index]), None if b.bk is None else b.bk[index])
            for b in states]


class BatchSteps:
    """Decode steps for a batch whose rows join and leave between steps (`generate_rows`, the
    serving engine): the eager `decode_step`, or a `MuseDecoder`'s static buffers (CUDA graphs).

    The state goes into the decoder only when the rows have changed since its last load, so a steady
    batch only replays; `states()` takes it out (a copy) when rows must be gathered or joined.
    """

    def __init__(self, model: MuseLM, decoder: MuseDecoder | None = None, states: States | None = None):
        self.model, self.decoder = model, decoder
        self._states = states  # None while the decoder holds the batch (or there are no rows)

    def states(self) -> States:
        """The rows' state as tensors of their own (taken out of the decoder if it holds them)."""
        if self._states is None:
            self._states = self.decoder.states()
        return self._states

    def set_states(self, states: States | None) -> None:
        """Replaces the batch (None: no rows); the next step loads it."""
        self._states = states

    def select(self, rows: list[int]) -> None:
        self._states = select_states(self.states(), rows)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B] -> next-token logits [B, V] (with a decoder, a view of its output buffer: read
        it before the next step)."""
        if self.decoder is None:
            logits, self._states = decode_step(self.model, ids, self._states)
            return logits
        if self._states is not None:
            self.decoder.load(self._states)
            self._states = None
        return self.decoder.step(ids)


def prefill_grouped(model: MuseLM, prompts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, States]:
    """1-D prompts of any lengths -> (next-token logits [N, V], states of N rows), rows in the order
    given; runs of consecutive equal-length prompts share one prefill pass."""
    logits, states, start = [], [], 0
    while start < len(prompts):
        end = start + 1
        while end < len(prompts) and prompts[end].numel() == prompts[start].numel():
            end += 1
        part_logits, part_states = prefill(model, torch.stack(list(prompts[start:end])))
        logits.append(part_logits)
        states.append(part_states)
        start = end
    return torch.cat(logits), (states[0] if len(states) == 1 else cat_states(states))


def generate_rows(model: MuseLM, prompts: Sequence[torch.Tensor], max_new_tokens: Sequence[int],
                  sampler: RowSampler, *, eos_token_id: int | None = None,
                  decoder: MuseDecoder | None = None) -> list[list[int]]:
    """The loop behind `MuseLM.generate_batch`: each 1-D prompt's new token ids, in the order given.

    Prompts are sorted by length so equal lengths prefill together; the rows then decode as one batch,
    and a row leaves (`select_states`) once it has emitted `eos_token_id` or max_new_tokens[i] tokens.

    Args:
        model: a MuseLM in eval mode (the caller sets it, and turns the per-step id check off).
        prompts: 1-D long tensors on the model's device, ids already validated.
        max_new_tokens: one limit >= 0 per prompt.
        sampler: built over `prompts` in this order (it is reordered and shrunk along with the batch).
        decoder: a `MuseDecoder` to step in (CUDA graphs, or its static buffers uncaptured); None
            steps eagerly with `decode_step`.
    """
    out: list[list[int]] = [[] for _ in prompts]
    active = sorted((i for i in range(len(prompts)) if max_new_tokens[i] > 0), key=lambda i: prompts[i].numel())
    if not active:
        return out
    logits, states = prefill_grouped(model, [prompts[i] for i in active])
    sampler.select(active)
    steps = BatchSteps(model, decoder, states)
    while True:
        nxt = sampler.sample(logits)
        keep = []
        for pos, (row, token) in enumerate(zip(active, nxt.tolist())):  # one host sync per step
            out[row].append(token)
            if token != eos_token_id and len(out[row]) < max_new_tokens[row]:
                keep.append(pos)
        if not keep:
            return out
        if len(keep) < len(active):
            active, nxt = [active[k] for k in keep], nxt[keep]
            sampler.select(keep)
            steps.select(keep)
        logits = steps.step(nxt)

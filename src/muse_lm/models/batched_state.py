"""Batched decoding with the recurrent state cache: one row of state per sequence.

A MuseLM's cache is a list (one entry per block) of `BlockState`s whose tensors all have the batch
first: the conv buffer [B, conv_size - 1, D], the AR-SSM state [B, H, R, P] and the BK resolvent
[B, K]. Nothing in a decode step mixes rows (no attention, no positions), so sequences of different
lengths can step together, and a row can join (`cat_states`) or leave (`select_states`) the batch
between steps. A continuous-batching server is built from `prefill`, `decode_step` and these two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from muse_lm.layers import ARSSMState
from muse_lm.models.muse import BlockState, MuseLM

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

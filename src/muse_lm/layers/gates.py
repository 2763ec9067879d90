"""Rank gates for AR-SSM: soft (sigmoid), ste (hard forward, sigmoid gradient), gumbel (binary concrete),
and fixed (no gate: every rank always on, the ablation without rank gates).

A gate m in [0, 1]^R multiplies the rank components of u_t and v_t; the first `min_rank` components
are always on. soft, ste and gumbel pass gradient to the gate logits; fixed passes none.
"""

from __future__ import annotations

import torch

GATE_MODES = ("soft", "ste", "gumbel", "fixed")


def rank_gate(logits: torch.Tensor, mode: str, *, training: bool, temperature: float = 1.0,
              min_rank: int = 0) -> torch.Tensor:
    """logits [..., R] -> gate [..., R] in [0, 1].

    gumbel: l = logit + log U - log(1 - U) (logistic noise), soft = sigmoid(l / tau),
    hard = 1[l > 0] with the straight-through gradient of soft. P(l > 0) = sigmoid(logit), so the
    hard decision is unbiased. Outside training, ste and gumbel use the deterministic hard gate.
    fixed: all ones, whatever the logits (constant, so no gradient reaches them).
    """
    if mode not in GATE_MODES:
        raise ValueError(f"gate mode {mode!r} is not one of {GATE_MODES}")
    if mode == "fixed":
        return torch.ones_like(logits)
    prob = torch.sigmoid(logits)
    if mode == "soft":
        gate = prob
    elif mode == "ste" or not training:
        hard = (logits > 0).to(prob.dtype)
        gate = hard + (prob - prob.detach())  # exactly 0/1 forward, sigmoid gradient
    else:
        u = torch.rand_like(prob).clamp_(1e-6, 1 - 1e-6)
        noisy = logits + torch.log(u) - torch.log1p(-u)
        soft = torch.sigmoid(noisy / temperature)
        gate = (noisy > 0).to(prob.dtype) + (soft - soft.detach())
    if min_rank > 0:
        keep = torch.zeros(gate.shape[-1], dtype=torch.bool, device=gate.device)
        keep[:min_rank] = True
        gate = torch.where(keep, torch.ones_like(gate), gate)
    return gate

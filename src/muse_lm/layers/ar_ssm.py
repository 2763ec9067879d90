"""AdaptiveRankSemiseparableLayer: a causal semiseparable sequence mixer with per-token rank gates.

Per head, y = (L o (V U^T)) X with L_ts = prod_{s<j<=t} a_j (the SSD view), computed by
`semiseparable_scan` in chunks; a_t = exp(log_a_t) is data dependent. A short causal depthwise
convolution mixes neighbouring tokens first. Rank gates m_t in [0,1]^R scale u_t and v_t.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from muse_lm.layers.aligned import aligned_linear
from muse_lm.layers.gates import GATE_MODES, rank_gate
from muse_lm.layers.norms import RMSNorm
from muse_lm.layers.recompute import recompute_in_backward
from muse_lm.ops import causal_conv1d, semiseparable_scan, semiseparable_step

_RECOMPUTE = threading.local()


def initial_decay_params(num_heads: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_log, dt_bias) [H] fp32 at initialization: decay timescales spread over heads (Mamba-2 style),
    A in [1, 16] (linear) and dt = softplus(dt_bias) in [1e-3, 1e-1] (log-spaced); the layer's log-decay
    is -exp(A_log) softplus(dt + dt_bias) for the data-dependent dt."""
    a = torch.linspace(1.0, 16.0, num_heads, device=device)
    dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), num_heads, device=device))
    return torch.log(a), dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Marks a forward as activation checkpointing's recomputation (in backward): running
    statistics (the AR-SSM gate means) are not updated a second time for the same batch. Entered
    by the model's checkpoint wrapper through `torch.utils.checkpoint`'s `context_fn`; thread-local
    because the autograd engine recomputes on its own threads."""
    before = getattr(_RECOMPUTE, "active", False)
    _RECOMPUTE.active = True
    try:
        yield
    finally:
        _RECOMPUTE.active = before


def in_recompute() -> bool:
    return getattr(_RECOMPUTE, "active", False)


@dataclass
class ARSSMState:
    """Recurrent cache of one layer: O(1) in the number of tokens seen.

    conv: [B, conv_size - 1, D] last inputs of the causal conv; ssm: [B, H, R, P] fp32 state.
    """

    conv: torch.Tensor
    ssm: torch.Tensor


@dataclass(frozen=True)
class PruneReport:
    """What `prune_ranks` removed from one layer.

    kept / removed: original rank indices (ascending) of the components kept / removed; gate_means:
    each original component's running mean gate at pruning time (by index, before pruning).
    """

    threshold: float
    rank_before: int
    rank_after: int
    kept: tuple[int, ...]
    removed: tuple[int, ...]
    gate_means: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "rank_before": self.rank_before, "rank_after": self.rank_after,
                "kept": list(self.kept), "removed": list(self.removed), "gate_means": list(self.gate_means)}


class AdaptiveRankSemiseparableLayer(nn.Module):
    """x [B, T, D] -> (y [B, T, D], gate_penalty scalar, state | None).

    Args:
        d_model: D.
        max_rank: rank of the state per head as configured; it also fixes the 1/sqrt(max_rank) scale of
            v, so a pruned layer keeps computing the same function.
        min_rank: components [0, min_rank) are never gated off (and never pruned).
        rank: R, the number of rank components the layer holds now (h_t is R x head_dim); None means
            max_rank. Smaller after `prune_ranks`; a pruned model is rebuilt from its config with it.
        num_heads: H; head_dim = expand * D / H.
        gate_mode: "soft" | "ste" | "gumbel" | "fixed" (see `rank_gate`); "fixed" keeps every rank on
            and returns no penalty (the ablation without rank gates).
        gate_l1: weight of the L1 penalty on the mean gate probability (returned, not applied).
    """

    def __init__(self, d_model: int, max_rank: int = 32, min_rank: int = 4, *, num_heads: int = 4,
                 expand: int = 2, conv_size: int = 4, chunk_size: int = 64, gate_mode: str = "soft",
                 gumbel_temperature: float = 1.0, gate_l1: float = 1e-4, stats_momentum: float = 0.99,
                 init_std: float = 0.02, out_init_std: float | None = None, rank: int | None = None):
        super().__init__()
        if not 0 <= min_rank <= max_rank:
            raise ValueError(f"min_rank={min_rank} must be in [0, max_rank={max_rank}]")
        rank = max_rank if rank is None else rank
        if not max(min_rank, 1) <= rank <= max_rank:
            raise ValueError(f"rank={rank} must be in [max(min_rank, 1)={max(min_rank, 1)}, max_rank={max_rank}]: "
                             "pruning never removes the always-on components nor the last one")
        if (expand * d_model) % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide expand*d_model={expand * d_model}")
        self.d_model, self.max_rank, self.min_rank, self.rank = d_model, max_rank, min_rank, rank
        self.num_heads, self.d_inner = num_heads, expand * d_model
        self.head_dim = self.d_inner // num_heads
        self.conv_size, self.chunk_size = conv_size, chunk_size
        self.gate_l1, self.stats_momentum = gate_l1, stats_momentum
        self.set_gate_mode(gate_mode, gumbel_temperature=gumbel_temperature)

        H, R = num_heads, rank
        self.conv = nn.Conv1d(d_model, d_model, conv_size, groups=d_model, bias=True)
        # One weight for values, keys (u), queries (v), decay step and gate logits (two GEMMs: `_project`).
        self._splits = (self.d_inner, H * R, H * R, H, R)
        self.in_proj = nn.Linear(d_model, sum(self._splits), bias=False)
        self.z_proj = nn.Linear(d_model, self.d_inner, bias=False)
        self.out_norm = RMSNorm(self.head_dim)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.gate_bias = nn.Parameter(torch.empty(R))
        self.register_buffer("gate_mean", torch.ones(R))
        # Set by a stability monitor on its statistics steps: the scan then also returns its final
        # state and the layer keeps, detached on the device, that state's RMS (`last_state_rms`) and
        # the mean per-token decay a_t (`last_decay_mean`).
        self.track_state_norm = False
        self.last_state_rms: torch.Tensor | None = None
        self.last_decay_mean: torch.Tensor | None = None
        self.init_std = init_std
        self.out_init_std = out_init_std if out_init_std is not None else init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.in_proj, self.z_proj):
            nn.init.normal_(lin.weight, std=self.init_std)
        nn.init.normal_(self.out_proj.weight, std=self.out_init_std)
        nn.init.normal_(self.conv.weight, std=1.0 / math.sqrt(self.conv_size))
        nn.init.zeros_(self.conv.bias)
        with torch.no_grad():
            a_log, dt_bias = initial_decay_params(self.num_heads)
            self.A_log.copy_(a_log)
            self.dt_bias.copy_(dt_bias)
            self.gate_bias.fill_(2.0)  # start near full rank: sigmoid(2) ~ 0.88
        self.gate_mean.fill_(1.0)

    def set_gate_mode(self, mode: str, *, gumbel_temperature: float | None = None) -> None:
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode {mode!r} is not one of {GATE_MODES}")
        if gumbel_temperature is not None and gumbel_temperature <= 0:
            raise ValueError(f"gumbel_temperature={gumbel_temperature} must be > 0")
        self.gate_mode = mode
        if gumbel_temperature is not None:
            self.gumbel_temperature = gumbel_temperature

    def effective_rank(self) -> torch.Tensor:
        """Expected number of active rank components (running mean of the gates, summed)."""
        return self.gate_mean.sum()

    def conv_input(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        """silu(causal depthwise conv(x)) [B, T, D], the projections' input; `past` [B, conv_size - 1, D]
        is the left context (zeros when None). One op (fused Triton kernels on CUDA, fp32 math on the
        fp32 parameters) instead of shifted multiply-adds, which compiled to five kernels per layer
        moving ~4x the bytes needed."""
        return causal_conv1d(x, self.conv.weight[:, 0], self.conv.bias, past=past, activation="silu")

    def _project(self, xc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(vals, u, v, dt, g) from the conv output xc [B, T, D]. A plain Linear runs as two GEMMs on
        row blocks of its one weight: vals [B, T, d_inner] comes out contiguous, as the scan takes it,
        instead of a strided slice the scan would copy while the slices u, v, dt and g kept the whole
        projection alive beside the copy (1.5 KB per token per layer at the 8gb shape). The rest's row
        is padded to 16 bytes (`aligned_linear`); the values' row is d_inner wide (a multiple of 8 in
        every preset, so aligned too). The blocks come from a split, whose gradient is one
        concatenation (two slices would each add a zero-filled weight-sized gradient). Anything else
        (an LNSLinear after convert_to_lns, a wrapped layer) runs through its own forward and is split."""
        if type(self.in_proj) is not nn.Linear:
            proj = self.in_proj(xc)
            return proj.split(self._splits, dim=-1)
        weight = self.in_proj.weight
        w_vals, w_rest = weight.split((self.d_inner, weight.shape[0] - self.d_inner))
        vals = F.linear(xc, w_vals)
        rest = aligned_linear(xc, w_rest)
        splits = self._splits[1:] + (rest.shape[-1] - w_rest.shape[0],)  # the last piece: the pad
        return (vals, *rest.split(splits, dim=-1)[:-1])

    def _apply_gate(self, u: torch.Tensor, v: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u, v [B, T, H, R] scaled by the gate [B, T, R]; v also by max_rank^-1/2 (the configured
        max_rank, not R: pruning must not rescale the kept components)."""
        gate = gate.unsqueeze(2)
        return u * gate, v * (gate * self.max_rank**-0.5)

    def _gated_output(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """out_norm(y) * silu(z): y [B, T, H, P] (the scan's output, fp32 or bf16), z [B, T, d_inner]
        -> [B, T, d_inner] in z's dtype."""
        B, T = z.shape[:2]
        return self.out_norm(y.to(z.dtype)).reshape(B, T, self.d_inner) * F.silu(z)

    def _conv(self, x: torch.Tensor, state: ARSSMState | None, need_tail: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """silu(causal depthwise conv(x)): left context only (the cached inputs, or zeros); and the
        last conv_size - 1 inputs for the next call's cache when `need_tail`."""
        k = self.conv_size - 1
        past = state.conv.to(x.dtype) if state is not None else None
        # A depthwise conv is rebuilt from x (kept for the projections' gradients anyway) in a compiled
        # backward instead of keeping its output for in_proj's.
        y = recompute_in_backward(self.conv_input, x, past)
        if not need_tail:
            return y, None
        # Only the last k inputs matter: a prefill of T tokens copies k rows, not the whole sequence.
        head = past if past is not None else x.new_zeros(x.shape[0], k, x.shape[2])
        xp = torch.cat([head, x[:, max(x.shape[1] - k, 0):]], dim=1)
        # Kept in the parameters' dtype: under autocast x is the norm's bf16 output, and a cache whose
        # dtype followed autocast would not load into a decoder built outside it.
        return y, xp[:, xp.shape[1] - k:].to(self.conv.weight.dtype)

    def forward(self, x: torch.Tensor, state: ARSSMState | None = None, *, return_state: bool = False,
                conv_out: torch.Tensor | None = None):
        """x [B, T, D]; state from a previous call (generation). Returns (y, gate_penalty, state).

        conv_out: `conv_input(x)`, computed by the caller, for a forward with no state in or out (a
        block rebuilds its norm and this conv together in a compiled backward: models/muse.py)."""
        B, T, _ = x.shape
        H, R, P = self.num_heads, self.rank, self.head_dim
        keep_state = return_state or state is not None
        if conv_out is None:
            xc, conv_tail = self._conv(x, state, keep_state)
        elif keep_state:
            raise ValueError("conv_out is for a forward with no state in or out: the conv cache needs x's tail "
                             "(pass state/return_state without conv_out)")
        elif conv_out.shape != x.shape:
            raise ValueError(f"conv_out has shape {tuple(conv_out.shape)}, x {tuple(x.shape)}: pass "
                             "conv_input(x) of this x, or leave conv_out out")
        else:
            xc, conv_tail = conv_out, None
        vals, u, v, dt, g = self._project(xc)
        gate_logits = g.float() + self.gate_bias
        gate = rank_gate(gate_logits, self.gate_mode, training=self.training,
                         temperature=self.gumbel_temperature, min_rank=self.min_rank).to(u.dtype)
        # The gated u and v are rebuilt from u, v and the gate (kept for the gate's gradient anyway) in
        # a compiled backward. The gate itself is outside: Gumbel noise must not be drawn twice.
        u, v = recompute_in_backward(self._apply_gate, u.view(B, T, H, R), v.view(B, T, H, R), gate)
        log_a = -torch.exp(self.A_log.float()) * F.softplus(dt.float() + self.dt_bias.float())
        vals = vals.view(B, T, H, P)
        prev = state.ssm if state is not None else None
        if T == 1 and prev is not None:
            y, ssm = semiseparable_step(vals[:, 0], u[:, 0], v[:, 0], log_a[:, 0], prev)
            y = y.unsqueeze(1)
        else:
            y, ssm = semiseparable_scan(vals, u, v, log_a, initial_state=prev,
                                        output_final_state=keep_state or self.track_state_norm,
                                        chunk_size=self.chunk_size)
        if self.track_state_norm:
            self.last_state_rms = ssm.detach().float().pow(2).mean().sqrt()
            self.last_decay_mean = log_a.detach().exp().mean()
        # out_proj's input is rebuilt from y and z (kept for their own gradients) in a compiled backward.
        y = recompute_in_backward(self._gated_output, y, self.z_proj(x))
        penalty = self._gate_penalty(gate_logits)
        if self.training:
            self._update_gate_stats(gate)
        new_state = ARSSMState(conv_tail, ssm) if keep_state else None
        return self.out_proj(y), penalty, new_state

    def _gate_penalty(self, gate_logits: torch.Tensor) -> torch.Tensor:
        """gate_l1 * mean number of open gated ranks; 0 when nothing is gated (fixed mode: all ranks
        are always on, so there is nothing for an L1 penalty to close)."""
        prob = torch.sigmoid(gate_logits[..., self.min_rank:])
        if self.gate_mode == "fixed" or not prob.numel():
            return gate_logits.new_zeros(())
        return self.gate_l1 * prob.sum(-1).mean()

    @torch.no_grad()
    def _update_gate_stats(self, gate: torch.Tensor) -> None:
        # In-place EMA on the device: no host sync. Not again when activation checkpointing
        # recomputes this forward in backward: one optimizer step's batch counts once.
        if in_recompute():
            return
        mean = gate.detach().float().reshape(-1, self.rank).mean(0)
        self.gate_mean.mul_(self.stats_momentum).add_(mean, alpha=1 - self.stats_momentum)

    @torch.no_grad()
    def prune_ranks(self, threshold: float) -> PruneReport:
        """Removes the rank components whose running mean gate (`gate_mean`) is below `threshold`.

        Their rows leave the u and v projections and the gate logits (and `gate_bias`, `gate_mean`),
        so the layer afterwards runs at the smaller rank: the scan's state is [B, H, rank, P]. The kept
        components keep their weights, gate and order, so the output equals the unpruned layer's with
        the removed components' gates forced to 0. Components [0, min_rank) are always on and are
        never removed. The module's parameters are replaced: build optimizers after pruning.

        Raises:
            ValueError: see `plan_pruning`; the layer is then left unchanged.
        """
        report = self.plan_pruning(threshold)
        if report.removed:
            self._keep_components(torch.tensor(report.kept, dtype=torch.long, device=self.gate_mean.device))
        return report

    def plan_pruning(self, threshold: float) -> PruneReport:
        """What `prune_ranks(threshold)` would do, changing nothing.

        Raises:
            ValueError: threshold not a number in [0, 1], or it would remove every component (possible
                only with min_rank=0); a threshold at most the largest mean gate keeps that one.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold={threshold!r} must be a number in [0, 1] (a mean gate probability)")
        means = self.gate_mean.detach().to("cpu", torch.float64)  # copied: the buffer is never changed here
        drop = means < threshold
        drop[: self.min_rank] = False  # always on (gate 1), whatever the statistics say
        if bool(drop.all()):
            raise ValueError(f"threshold={threshold} would remove all {self.rank} rank components (largest "
                             f"mean gate {float(means.max()):.4g}); use a threshold at most that value")
        kept, removed = (~drop).nonzero().flatten().tolist(), drop.nonzero().flatten().tolist()
        return PruneReport(float(threshold), self.rank, len(kept), tuple(kept), tuple(removed), tuple(means.tolist()))

    def _keep_components(self, keep: torch.Tensor) -> None:
        """Shrinks the weights to the rank components `keep` (ascending indices into [0, rank))."""
        H, R, d_inner = self.num_heads, self.rank, self.d_inner
        dev = keep.device
        per_head = (torch.arange(H, device=dev).unsqueeze(1) * R + keep).flatten()  # u/v rows h * R + r
        # in_proj rows: [values (d_inner) | u (H*R) | v (H*R) | dt (H) | gate logits (R)].
        rows = torch.cat([torch.arange(d_inner, device=dev), d_inner + per_head, d_inner + H * R + per_head,
                          d_inner + 2 * H * R + torch.arange(H, device=dev), d_inner + 2 * H * R + H + keep])
        old = self.in_proj.weight
        self.in_proj = nn.Linear(self.d_model, rows.numel(), bias=False, device=old.device, dtype=old.dtype)
        self.in_proj.weight.copy_(old.index_select(0, rows.to(old.device)))
        self.in_proj.weight.requires_grad_(old.requires_grad)
        self.gate_bias = nn.Parameter(self.gate_bias.detach()[keep].clone(),
                                      requires_grad=self.gate_bias.requires_grad)
        self.gate_mean = self.gate_mean[keep].clone()  # a registered buffer: assignment keeps it one
        self.rank = int(keep.numel())
        self._splits = (d_inner, H * self.rank, H * self.rank, H, self.rank)

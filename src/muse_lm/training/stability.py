"""`StabilityMonitor`: is this training step healthy?

Per step the monitor judges two numbers, the step's mean loss and its pre-clip gradient norm.
The trainer never waits for them on a GPU: it compares them on the device against limits
taken from the history (`limits()` -> `device_flag()`), hands that 0/1 flag to the fused AdamW
as `found_inf` (a flagged step updates nothing, like GradScaler's skipped steps), and copies the
numbers to pinned host memory without blocking (`LaggedReader`); the host reads them `lag`
steps later (default 1 on CUDA), when the GPU has long finished that step, and only then
escalates (LR cut, clipping, rollback, ...). On a CPU there is no queue to keep full, so the
default lag is 0 and `observe()` reads the pair at once.

A step is unhealthy when:

- the loss or the gradient norm is not finite (NaN / inf anywhere in the gradients makes the
  norm non-finite, so one reduction covers every parameter);
- once armed (after `arm_after` healthy steps), the loss or the gradient norm is an upward
  outlier against the recent trend: `value > median + k * max(1.4826 * MAD, floor * median)`
  over the last `window` healthy values. The MAD band adapts to the run's own noise; the
  relative floor keeps a very smooth run from flagging tiny wiggles.

Per-layer gradient / weight / activation RMS are gathered only every `stats_every` steps (on
the device, read with the same lag). `widen()` multiplies both `k`s (the recovery policy calls
it after repeated false alarms).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from muse_lm.config_utils import config_from_dict, require


@dataclass
class StabilityConfig:
    """Thresholds of the monitor. The defaults are tuned to flag real divergence (a corrupted
    batch roughly doubles the loss, a blown-up layer makes it explode) while a healthy run's
    step-to-step noise (a few percent of the loss, 2x swings of the grad norm) passes."""

    arm_after: int = 20  # healthy steps before outlier checks start (the finite checks always run)
    window: int = 50  # healthy values the running median / MAD are taken over
    loss_k: float = 6.0  # loss outlier: > median + loss_k * spread
    loss_floor: float = 0.05  # ... with spread >= loss_floor * median (6 x 5% = 30% above the median)
    grad_k: float = 10.0  # grad-norm outlier: > median + grad_k * spread
    grad_floor: float = 1.0  # ... with spread >= grad_floor * median (11x the median at the defaults)
    stats_every: int = 10  # steps between per-layer RMS reads (one extra sync on those steps)
    stats_decay: float = 0.9  # EMA decay of the per-layer baselines
    suspect_ratio: float = 5.0  # a layer whose RMS is this many times its baseline is singled out
    # Steps between a step and the host reading its health. None: 1 on CUDA (no host sync per
    # step; the skip itself happens on the device), 0 on CPU (read at once, nothing to overlap).
    lag: int | None = None

    def __post_init__(self) -> None:
        for name in ("arm_after", "window", "stats_every"):
            value = getattr(self, name)
            positive = isinstance(value, int) and not isinstance(value, bool) and value > 0
            require("StabilityConfig", positive, name, value, "must be a positive integer")
        for name, low, high in (("loss_k", 0, math.inf), ("loss_floor", 0, math.inf), ("grad_k", 0, math.inf),
                                ("grad_floor", 0, math.inf), ("stats_decay", 0, 1), ("suspect_ratio", 1, math.inf)):
            value = getattr(self, name)
            require("StabilityConfig", _is_real(value) and low < value < high, name, value,
                    f"must be a number in ({low}, {high})")
        lag_ok = self.lag is None or (isinstance(self.lag, int) and not isinstance(self.lag, bool)
                                      and 0 <= self.lag <= 8)
        require("StabilityConfig", lag_ok, "lag", self.lag, "must be None or an integer in [0, 8]")

    def resolved_lag(self, device: torch.device) -> int:
        if self.lag is not None:
            return self.lag
        return 1 if device.type == "cuda" else 0

    @classmethod
    def from_dict(cls, data: dict) -> StabilityConfig:
        return config_from_dict(cls, data)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Verdict:
    """What the monitor concluded about one step."""

    step: int
    loss: float
    grad_norm: float
    healthy: bool = True
    reason: str = ""
    finite: bool = True  # False: NaN/inf (never a false alarm)


def _limit(history: deque, k: float, floor: float) -> float:
    """The upward-outlier threshold of the values in `history`: median + k * spread."""
    median = statistics.median(history)
    mad = statistics.median(abs(v - median) for v in history)
    spread = max(1.4826 * mad, floor * abs(median))
    return median + k * spread


def layer_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters grouped by layer: `blocks.3.mixer.w` -> `blocks.3`; other top-level modules
    (embedding, final norm) by their first name component."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 2 else parts[0]
        groups.setdefault(key, []).append((name, p))
    return groups


def _rms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Root-mean-square over all elements of `tensors` (a 0-d device tensor)."""
    total = sum(t.detach().float().pow(2).sum() for t in tensors)
    count = sum(t.numel() for t in tensors)
    return (total / max(count, 1)).sqrt()


def _bk_stat(bk: nn.Module, which: str):
    """From the BK output projection's input [eta Re G, eta Im G]: the per-token log-determinant
    -mean log|G| or the resonance distance mean(1 - eta |G|)."""

    def stat(module, args, out):
        feats = args[0].float()
        k = feats.shape[-1] // 2
        mag = torch.hypot(feats[..., :k], feats[..., k:])  # eta |G| in [0, 1]
        if which == "resonance":
            return (1 - mag).mean()
        eta = bk.spectral_parameter().imag.float()
        return -(mag / eta).clamp_min(1e-30).log().mean()
    return stat


@dataclass
class StabilityMonitor:
    """Watches loss, gradient norm and per-layer statistics; see the module docstring.

    Example (a user's own loop):
        >>> monitor = StabilityMonitor(StabilityConfig())
        >>> verdict = monitor.observe(step, loss, grad_norm, model)  # after backward, before step()
        >>> if verdict.healthy: optimizer.step()
    """

    config: StabilityConfig = field(default_factory=StabilityConfig)
    scale: float = 1.0  # multiplies loss_k / grad_k; grows with widen()
    healthy_steps: int = 0
    losses: deque = field(default_factory=deque)
    grads: deque = field(default_factory=deque)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> {"grad", "weight"}
    forward_stats: dict[str, float] = field(default_factory=dict)  # "blocks.N/<stat>" -> value (see attach)

    def __post_init__(self) -> None:
        self.losses = deque(self.losses, maxlen=self.config.window)
        self.grads = deque(self.grads, maxlen=self.config.window)
        self._collect = False
        self._act: dict[str, torch.Tensor] = {}

    @property
    def armed(self) -> bool:
        return self.healthy_steps >= self.config.arm_after and len(self.losses) >= 3

    # ---- per step ------------------------------------------------------------------------------
    def observe(self, step: int, loss: torch.Tensor | float, grad_norm: torch.Tensor | float,
                model: nn.Module | None = None) -> Verdict:
        """Judges one step from its mean loss and pre-clip gradient norm at once (one host sync),
        and every `stats_every` healthy steps refreshes the per-layer baselines of `model` (whose
        gradients must still be present). For a loop that must not wait on the GPU use
        `limits()` + `device_flag()` now and `judge()` later (see the module docstring)."""
        device = next((t.device for t in (loss, grad_norm) if isinstance(t, torch.Tensor)), None)
        pair = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(())
                            for v in (loss, grad_norm)])
        loss_v, grad_v = pair.tolist()  # the step's one host sync
        self._collect = False
        verdict = self.judge(step, loss_v, grad_v)
        if verdict.healthy and model is not None and step % self.config.stats_every == 0:
            self.update_baselines(model)
        return verdict

    def limits(self) -> tuple[float, float]:
        """(loss limit, gradient-norm limit) a step is judged against now: inf before arming."""
        if not self.armed:
            return math.inf, math.inf
        cfg = self.config
        return (_limit(self.losses, cfg.loss_k * self.scale, cfg.loss_floor),
                _limit(self.grads, cfg.grad_k * self.scale, cfg.grad_floor))

    @staticmethod
    def device_flag(loss: torch.Tensor, grad_norm: torch.Tensor, limits: tuple[float, float]) -> torch.Tensor:
        """0-d float32 tensor on the loss's device: 1.0 if the step is unhealthy by `limits`
        (not finite, or above a limit), else 0.0. No host sync."""
        loss, grad_norm = loss.detach().float(), grad_norm.detach().float().to(loss.device)
        bad = ~torch.isfinite(loss) | ~torch.isfinite(grad_norm) | (loss > limits[0]) | (grad_norm > limits[1])
        return bad.float().reshape(())

    def judge(self, step: int, loss_v: float, grad_v: float, *, limits: tuple[float, float] | None = None,
              flagged: bool | None = None) -> Verdict:
        """The verdict on step `step` from its host-side numbers, against `limits` (default: the
        current ones); `flagged` is the device's decision when the step was judged there (then
        authoritative: the update was already skipped or applied by it). Healthy values join the
        history."""
        loss_limit, grad_limit = self.limits() if limits is None else limits
        verdict = Verdict(step, loss_v, grad_v)
        if not math.isfinite(loss_v):
            verdict.healthy, verdict.finite, verdict.reason = False, False, f"loss is {loss_v}"
        elif not math.isfinite(grad_v):
            verdict.healthy, verdict.finite, verdict.reason = False, False, f"gradient norm is {grad_v}"
        elif loss_v > loss_limit:
            verdict.healthy, verdict.reason = False, f"loss {loss_v:.4g} above the trend's limit {loss_limit:.4g}"
        elif grad_v > grad_limit:
            verdict.healthy = False
            verdict.reason = f"gradient norm {grad_v:.4g} above the trend's limit {grad_limit:.4g}"
        if flagged is not None and flagged == verdict.healthy:
            # fp32 on the device vs fp64 here can disagree exactly at a limit; the device acted.
            verdict.healthy = not flagged
            verdict.reason = "at the trend's limit (device comparison)" if flagged else ""
        if verdict.healthy:
            self.losses.append(loss_v)
            self.grads.append(grad_v)
            self.healthy_steps += 1
        return verdict

    def widen(self, factor: float = 1.5) -> None:
        """Loosens both outlier thresholds by `factor` (after repeated false alarms)."""
        self.scale *= factor

    # ---- per-layer statistics ------------------------------------------------------------------
    def layer_stats_tensor(self, model: nn.Module) -> tuple[list[str], torch.Tensor]:
        """(layer names, `[L, 2]` device tensor of gradient RMS and weight RMS); no host sync."""
        names, values = [], []
        for key, params in layer_groups(model).items():
            grads = [p.grad for _, p in params if p.grad is not None]
            names.append(key)
            zero = torch.zeros((), device=params[0][1].device)
            values.append(torch.stack([_rms(grads) if grads else zero, _rms([p for _, p in params])]))
        return names, torch.stack(values)

    def layer_stats(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """{layer: {"grad": gradient RMS, "weight": weight RMS}} (one host sync). A layer with a
        non-finite gradient reports inf."""
        names, values = self.layer_stats_tensor(model)
        return self.stats_from_rows(names, values.tolist())

    @staticmethod
    def stats_from_rows(names: list[str], rows: list[list[float]]) -> dict[str, dict[str, float]]:
        """{layer: {"grad", "weight"}} from `[grad RMS, weight RMS]` rows; NaN (a poisoned layer) reads inf."""
        return {key: {kind: math.inf if math.isnan(x) else x for kind, x in zip(("grad", "weight"), row)}
                for key, row in zip(names, rows)}

    def update_baselines(self, model: nn.Module) -> None:
        self.fold_baselines(self.layer_stats(model))
        names, values = self.take_activations()
        if names:
            self.forward_stats = dict(zip(names, values.tolist()))

    def fold_baselines(self, stats: dict[str, dict[str, float]]) -> None:
        """Moves the per-layer EMA baselines towards `stats` (from a healthy step)."""
        decay = self.config.stats_decay
        for key, now in stats.items():
            old = self.baselines.get(key)
            if old is None:
                self.baselines[key] = dict(now)
            else:
                self.baselines[key] = {k: decay * old[k] + (1 - decay) * now[k] for k in now}

    def take_activations(self) -> tuple[list[str], torch.Tensor | None]:
        """The forward statistics recorded on this stats step (device tensors), then forgotten."""
        if not self._act:
            return [], None
        names = list(self._act)
        values = torch.stack([self._act[k] for k in names])
        self._act = {}
        return names, values

    def suspect_layers(self, model: nn.Module) -> list[str]:
        """Layers whose weight or gradient RMS is `suspect_ratio` times their baseline (or not
        finite), worst first; call it on an unhealthy step, before the gradients are cleared."""
        stats = self.layer_stats(model)
        # Weights first: a blown-up layer poisons every gradient (all of them read inf/NaN), but
        # only its own weights moved.
        for kind in ("weight", "grad"):
            scores = {}
            for key, now in stats.items():
                base = self.baselines.get(key)
                if base is None:
                    continue
                ratio = now[kind] / base[kind] if base[kind] > 0 else (math.inf if now[kind] > 0 else 0.0)
                if not math.isfinite(now[kind]) or ratio >= self.config.suspect_ratio:
                    scores[key] = ratio
            # Every layer flagged (a NaN loss poisons all gradients) singles out none of them.
            if scores and len(scores) < len(stats):
                return sorted(scores, key=lambda k: -scores[k])
        return []

    def attach(self, model: nn.Module) -> None:
        """Forward hooks that, on the forward passes of stats steps only, record per block
        (`forward_stats["blocks.N/<name>"]`):

        - `act_rms`: the block's output RMS;
        - `ssm_decay`: the AR-SSM's mean per-token decay a_t = exp(log a_t) (near 1: long memory;
          the state norm grows like 1 / (1 - a)), and `ssm_state_rms`: the RMS of the scan's
          final state S_T (R x P per head), which the layer returns on stats steps only;
        - `bk_logdet`: the BK features' log|det(H_1..T - z)| / T, the per-token log-determinant,
          which is -mean_t log|G_t| because G_t = det_{t-1} / det_t (N-normalized: a healthy long
          sequence has the same value as a short one), and `bk_resonance`: mean_t (1 - eta |G_t|),
          the distance from resonance (|G_t| reaches its bound 1/eta when z touches the spectrum).

        Nothing is computed on other steps. Needs `model.blocks` with MuseBlock's layout;
        other models get only what they have."""
        for i, block in enumerate(getattr(model, "blocks", [])):
            key = f"blocks.{i}"
            block.register_forward_hook(self._hook(key, "act_rms", lambda mod, inp, out: _rms([out[0]])))
            mixer = getattr(block, "mixer", None)
            if mixer is not None and hasattr(mixer, "track_state_norm"):
                mixer.register_forward_pre_hook(self._track_state(mixer))
                mixer.register_forward_hook(
                    self._hook(key, "ssm_state_rms", lambda mod, inp, out: mod.last_state_rms))
                mixer.register_forward_hook(
                    self._hook(key, "ssm_decay", lambda mod, inp, out: mod.last_decay_mean))
            bk = getattr(block, "bk", None)
            if bk is not None and hasattr(bk, "out") and hasattr(bk, "spectral_parameter"):
                bk.out.register_forward_hook(self._hook(key, "bk_logdet", _bk_stat(bk, "logdet")))
                bk.out.register_forward_hook(self._hook(key, "bk_resonance", _bk_stat(bk, "resonance")))

    def _track_state(self, mixer: nn.Module):
        """Asks the AR-SSM for its final state on stats steps only (other steps skip that output)."""

        def pre_hook(module, args):
            mixer.track_state_norm = self._collect
        return pre_hook

    def _hook(self, key: str, name: str, stat):
        def hook(module, args, output):
            if self._collect:
                with torch.no_grad():
                    self._act[f"{key}/{name}"] = stat(module, args, output).detach().float()
        return hook

    def collect_activations(self, step: int) -> None:
        """Turns forward-statistics recording on for the forward pass of `step` if it is a stats
        step (`observe` turns it off again, so evaluation passes are never recorded)."""
        self._collect = step % self.config.stats_every == 0

    def stop_collecting(self) -> None:
        """Ends a step's recording (`observe` does this itself; lagged callers call it)."""
        self._collect = False

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"scale": self.scale, "healthy_steps": self.healthy_steps, "losses": list(self.losses),
                "grads": list(self.grads), "baselines": {k: dict(v) for k, v in self.baselines.items()},
                "forward_stats": dict(self.forward_stats)}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.healthy_steps = int(state["healthy_steps"])
        self.losses = deque(state["losses"], maxlen=self.config.window)
        self.grads = deque(state["grads"], maxlen=self.config.window)
        self.baselines = {k: dict(v) for k, v in state["baselines"].items()}
        self.forward_stats = dict(state.get("forward_stats", {}))

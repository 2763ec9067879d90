"""`Trainer`: the training loop of one run directory.

One optimizer step = `grad_accum` micro-batches of `micro_batch` sequences per rank; the loss of
each micro-batch is divided by `grad_accum` so the gradient is the mean over the step's tokens.
Micro-batch `m` of step `s` is `PackedBatches.batch(s * grad_accum + m)`, a pure function of
the step, so resuming needs only the step (plus model, optimizer, scheduler and RNG state).

No host sync happens on ordinary steps: loss sums and the grad norm stay on the device and are
read once per `log_every` steps.

Several processes (`parallel="ddp"` or `"fsdp"`, docs/distributed.md): each rank's health flag
(its own loss not finite or above the trend's limit) is summed over ranks together with the
loss, in the one all-reduce the step already made for the mean loss, so every rank takes the
same decision on the same step; checkpoints are sharded (`muse_lm.training.dcp`). DDP reduces
gradients once per step, on its last micro-batch (`no_sync` before it); FSDP2 reduce-scatters
after every micro-batch unless `fsdp_defer_reduce` (`no_gradient_sync`). What one rank must
decide for all (the checkpoint a rollback loads) rank 0 decides and broadcasts; what rank 0 does
alone (writing files) ends in one collective through which every rank learns whether it failed
(`distributed.fail_together`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from muse_lm.errors import CheckpointError
from muse_lm.io import list_checkpoints
from muse_lm.training import fsdp
from muse_lm.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from muse_lm.training.compiling import compile_blocks
from muse_lm.training.config import TrainConfig
from muse_lm.training.data import PackedBatches, heldout_batches
from muse_lm.training.dcp import is_sharded_checkpoint, load_full_state, load_sharded_state, save_sharded_checkpoint
from muse_lm.training.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank_flag,
    broadcast_object,
    fail_together,
    gather_objects,
    resolve_parallel,
)
from muse_lm.training.evaluate import EvalResult, autocast_context, evaluate_loss, validate_token_ids
from muse_lm.training.faults import FaultPlan
from muse_lm.training.lagged import LaggedReader
from muse_lm.training.metrics import PLOT_FILE, MetricsWriter, Progress, memory_gib, plot_loss
from muse_lm.training.optim import WarmupCosine, build_optimizer, build_scheduler
from muse_lm.training.options import RunResult
from muse_lm.training.recovery import (
    EVENTS_FILE,
    Decision,
    EventLog,
    RecoveryConfig,
    RecoveryPolicy,
    SnapshotKeeper,
    TrainingStopped,
    capture_state,
    last_good_train_state,
    reinit_layers,
    restore_state,
)
from muse_lm.training.rng import capture_rng, restore_rng
from muse_lm.training.stability import StabilityConfig, StabilityMonitor

log = logging.getLogger("muse_lm")


class Trainer:
    """Trains `model` on token streams, writing metrics, plots and checkpoints to `run_dir`.

    Args:
        model: a MuseLM (or any module with its `validate_ids(ids)` and whose
            `forward(ids, targets, return_parts=True)` returns `(loss, ce, aux)`), with its
            weights initialized; moved to `device`.
        cfg: the run's TrainConfig (`steps` sets the LR schedule's length).
        train_tokens / heldout_tokens: 1-D integer token streams (ids are checked once here).
        run_dir: where metrics.jsonl, loss.png and step-NNNNNNN/ go.
        tokenizer_json: saved with every checkpoint.
        run_config: the checkpoint's config.json content.
        seed: orders the training windows (the data split never depends on it).
        dist_info: this process's rank / world size (one process by default).
        stability / recovery: the monitor's and the ladder's settings (docs/stability.md).
        faults: injected faults (testing the ladder; see `muse_lm.training.faults`).
        parallel: "none", "ddp" or "fsdp" (None: ddp with several ranks, else none). ddp and
            fsdp need an initialized process group (one rank is fine) and write sharded
            checkpoints.

    Example:
        >>> trainer = Trainer(model, cfg, train_tokens=tok.train, heldout_tokens=tok.heldout,
        ...                   run_dir="runs/x", tokenizer_json=tokenizer.to_str(), run_config={...})
        >>> result = trainer.fit()
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, *, train_tokens: np.ndarray,
                 heldout_tokens: np.ndarray, run_dir: str | Path, tokenizer_json: str, run_config: dict,
                 seed: int = 0, device: torch.device | str = "cpu", dist_info: DistInfo | None = None,
                 progress: bool = True, stability: StabilityConfig | None = None,
                 recovery: RecoveryConfig | None = None, faults: FaultPlan | None = None,
                 parallel: str | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.dist = dist_info or DistInfo()
        self.parallel = resolve_parallel(parallel, self.dist)
        self.run_dir = Path(run_dir)
        self.tokenizer_json = tokenizer_json
        self.run_config = run_config
        self.show_progress = progress
        if cfg.compile:
            compile_blocks(model)  # before FSDP2 wraps the blocks, as its hooks expect
        if self.parallel == "fsdp":
            # Sharded before `.to(device)`: FSDP2 moves one unit at a time to the mesh's device and
            # keeps only its shard there, so the whole model never sits on one GPU.
            fsdp.apply_fsdp(model, self.device, cfg.dtype)  # in place: the optimizer sees DTensors
        self.model = model.to(self.device)
        validate_token_ids(self.model, [train_tokens, heldout_tokens])
        # Per-block activation checkpointing (composes with FSDP2: see muse_lm.training.fsdp).
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        self.engine: nn.Module = self.model
        if self.parallel == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            # No per-forward buffer broadcast (a collective on every micro-batch): the running
            # buffers (gate_mean EMAs) are averaged over the ranks before each checkpoint instead,
            # as under FSDP. Gradients live in the all-reduce buckets (kept there by `_end_step`).
            self.engine = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False,
                                                  gradient_as_bucket_view=True)
        stability = stability or StabilityConfig()
        # lag >= 1: health is read on the host `lag` steps late, and the skip of an unhealthy
        # update happens on the device through the fused AdamW's `found_inf` (see stability.py).
        self._lag = stability.resolved_lag(self.device)
        self.optimizer = build_optimizer(self.model, cfg, self.device, fused=self._lag > 0 or None)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        # Global batch of one micro-step: micro_batch rows per rank (see PackedBatches).
        self.batches = PackedBatches(train_tokens, seq_len=cfg.seq_len,
                                     batch_size=cfg.micro_batch * self.dist.world_size, seed=seed,
                                     rank=self.dist.rank, world_size=self.dist.world_size)
        # eval_batches batches of the global micro-batch, scored micro_batch rows at a time and
        # shared round-robin by the ranks: the same tokens whatever the world size.
        self.eval_batches = heldout_batches(heldout_tokens, seq_len=cfg.seq_len, batch_size=cfg.micro_batch,
                                            max_batches=cfg.eval_batches * self.dist.world_size)
        self.metrics = MetricsWriter(self.run_dir)
        self.step = 0
        self.last_lr = cfg.lr
        self.elapsed_s = 0.0
        self.evals: dict[str, dict | None] = {"start": None, "last": None, "best": None}
        self.latest_checkpoint: Path | None = None
        self._clock_start: float | None = None  # perf_counter() when fit() started
        self._elapsed_base = 0.0
        # Stability: the monitor judges each step, the policy escalates, snapshots back rollbacks.
        # `data_offset` shifts the batch index after a rollback so the batches that led to the
        # trouble are skipped (0 in a run without rollbacks: exact resume is unchanged).
        monitors = {"fsdp": fsdp.ShardedStabilityMonitor, "ddp": fsdp.ReplicatedStabilityMonitor}
        self.monitor = monitors.get(self.parallel, StabilityMonitor)(stability)
        self._reader = LaggedReader()
        self.monitor.attach(self.model)
        self.events = EventLog(self.run_dir / EVENTS_FILE) if self.dist.is_main else None
        self.policy = RecoveryPolicy(recovery, monitor=self.monitor, events=self.events)
        rc = self.policy.config
        self.snapshots = SnapshotKeeper(rc.snapshot_every, rc.confirm_after)
        self.faults = faults or FaultPlan()
        self.faults.rank = self.dist.rank
        self.faults.check_ranks(self.dist.world_size)
        self.data_offset = 0
        self._last_healthy = True
        self._progress: Progress | None = None
        self._vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        self._new_window()

    # ---- state ---------------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over all ranks."""
        return self.cfg.tokens_per_step * self.dist.world_size

    def _new_window(self) -> None:
        # Sums of (loss, ce, aux) over the micro-batches since the last log line, on the device.
        self._window_sums = torch.zeros(3, dtype=torch.float32, device=self.device)
        self._window_applied = torch.zeros((), dtype=torch.float32, device=self.device)  # updates applied

    @property
    def sharded_checkpoints(self) -> bool:
        """ddp / fsdp runs save through torch.distributed.checkpoint (see muse_lm.training.dcp)."""
        return self.parallel != "none"

    def train_state(self) -> dict:
        """Everything besides the weights that exact resume needs. Collective: every rank must
        call it (each rank's RNG state is gathered). With sharded checkpoints the optimizer
        state is saved in the DCP shards instead (None here)."""
        return {
            "step": self.step,
            "optimizer": None if self.sharded_checkpoints else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": gather_objects(capture_rng(self.device), self.dist),
            "world_size": self.dist.world_size,
            "elapsed_s": self.elapsed_s,
            "evals": dict(self.evals),
            "log_window": self._log_window_state(),
            "data_offset": self.data_offset,
            "stability": self.monitor.state_dict(),
            "recovery": self.policy.state_dict(),
            "faults_fired": self.faults.state_dict(),
        }

    def _log_window_state(self) -> dict:
        """The metrics window in progress, for a checkpoint (collective). Each rank sums its own
        rows' losses; "sums" is their mean over the ranks, what one process training the same
        global batch would hold, and what every rank restores at another world size (the
        all-reduce in `_log` then yields the same means). "rank_sums" lets each rank restore
        exactly its own at the same world size (bit-exact resume)."""
        local = self._window_sums.detach()
        mean = all_reduce_sum(local.clone(), self.dist) / self.dist.world_size
        return {"sums": mean.cpu(), "rank_sums": gather_objects(local.cpu(), self.dist),
                "steps": float(self._window_applied)}

    def load_state(self, ckpt: Checkpoint) -> None:
        """Restores weights, optimizer, scheduler, RNG and counters from a checkpoint, so that the
        next step is exactly the one an uninterrupted run would take."""
        state = ckpt.train_state
        self._load_weights_and_optimizer(ckpt.path, is_sharded_checkpoint(ckpt.path), ckpt.model_state,
                                         state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule follows this run's config (its --steps may be longer than before);
        # lr = base * factor(step) is computed exactly as LambdaLR does, so an unchanged config
        # gives bit-identical learning rates.
        cfg = self.cfg
        factor = WarmupCosine(min(cfg.warmup_steps, cfg.steps), cfg.steps, cfg.min_lr_ratio)
        self.scheduler.lr_lambdas = [factor] * len(self.optimizer.param_groups)
        self.scheduler.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * factor(self.scheduler.last_epoch)
        self.step = int(state["step"])
        self.elapsed_s = float(state["elapsed_s"])
        self.evals = dict(state["evals"])
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            restore_rng(rngs[self.dist.rank], self.device)
        else:
            log.warning("resuming %d-process run state on %d processes: random streams restart from "
                        "the seed", len(rngs), self.dist.world_size)
        window = state["log_window"]
        rank_sums = window.get("rank_sums")  # absent in checkpoints written before it existed
        same_ranks = rank_sums is not None and len(rank_sums) == self.dist.world_size
        self._window_sums = (rank_sums[self.dist.rank] if same_ranks else window["sums"]).to(self.device)
        self._window_applied = torch.tensor(float(window["steps"]), device=self.device)
        self.latest_checkpoint = ckpt.path
        # Checkpoints written before the stability ladder existed lack these keys.
        self.data_offset = int(state.get("data_offset", 0))
        if "stability" in state:
            self.monitor.load_state_dict(state["stability"])
        if "recovery" in state:
            self.policy.load_state_dict(state["recovery"])
        self.faults.load_state_dict(state.get("faults_fired", []))

    def _load_weights_and_optimizer(self, path: Path, sharded: bool, model_state: dict | None,
                                    optimizer_state: dict | None) -> None:
        """From the DCP shards of `path` when `sharded` (any world size, resharded: each rank reads
        its own; `model_state` / `optimizer_state` unused), else from the full `model_state` +
        `optimizer_state` (sharded over the ranks under fsdp)."""
        if sharded:
            load_sharded_state(path, self.model, self.optimizer)
        elif self.parallel == "fsdp":
            load_full_state(self.model, self.optimizer, model_state, optimizer_state, self.cfg.weight_decay)
        else:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimizer step at `self.step`; returns the pre-clip grad norm (a device tensor).

        An unhealthy step is never applied. With lag 0 (CPU) the monitor judges the step at once
        and the policy acts before the next step; with lag >= 1 (CUDA) the device decides the
        skip and the host reads the verdict `lag` steps later, without a sync, then acts."""
        self.engine.train()
        step = self.step
        self.faults.before_step(step, self.model)
        accum = self.cfg.grad_accum
        step_sums = torch.zeros(3, dtype=torch.float32, device=self.device)
        for micro in range(accum):
            last = micro == accum - 1
            x, y = self.batches.batch((step + self.data_offset) * accum + micro)
            scale = 1.0
            if micro == 0:
                x, y, scale = self.faults.corrupt_batch(step, x, y, self._vocab)
            # A step keeps one forward's statistics (each recording replaces the previous one), so
            # only the last micro-batch records them: the hooks' reductions and the scan's final
            # state are not computed accum - 1 times for nothing on stats steps.
            if last:
                self.monitor.collect_activations(step)
            else:
                self.monitor.stop_collecting()
            x, y = self._to_device(x), self._to_device(y)
            with self._grad_sync(last_micro=last):
                with autocast_context(self.device, self.cfg.dtype):
                    loss, ce, aux = self.engine(x, y, return_parts=True)
                if scale != 1.0:
                    loss = loss * scale
                if micro == 0:
                    loss = self.faults.corrupt_loss(step, loss)
                (loss / accum).backward()
            step_sums += torch.stack([loss.detach(), ce.detach(), aux.detach()]).float()
        self.faults.corrupt_grads(step, self.model)
        clip = self.cfg.grad_clip * self.policy.clip_scale
        if self.parallel == "fsdp":
            grad_norm = fsdp.clip_grad_norm_(list(self.model.parameters()), clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        mean_loss = step_sums[0] / accum
        limits = self.monitor.limits()
        rank_flag = None
        if self.dist.enabled:
            # Ranks see different losses. One all-reduce gives the mean loss (the monitor's
            # history, the same on every rank) and whether ANY rank flagged its own loss (a NaN
            # or a corrupted batch on one rank): every rank then takes the same decision.
            local_flag = self.monitor.device_flag(mean_loss, grad_norm, limits)
            reduced = any_rank_flag(torch.stack([mean_loss.float().reshape(()), local_flag]), self.dist)
            mean_loss, rank_flag = reduced[0], reduced[1]
        if self._lag == 0:
            self._judge_now(step, mean_loss, grad_norm, step_sums, rank_flag)
        else:
            self._judge_later(step, mean_loss, grad_norm, step_sums, limits, rank_flag)
        return grad_norm

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A CPU batch `[micro_batch, seq_len]` on the training device. On CUDA it is copied into
        pinned memory first: a `non_blocking` copy from pageable memory is staged by the driver,
        which may wait for the stream (every queued kernel) before it returns; from pinned memory
        the copy is queued like a kernel (the pinned block is reused only after it completes)."""
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def _grad_sync(self, last_micro: bool):
        """Context of one micro-batch's forward + backward: gradients are reduced over the ranks
        on the step's last micro-batch only, once per step whatever `grad_accum` is. DDP:
        `no_sync()` before it. FSDP2 reduce-scatters after every micro-batch (gradients stay
        sharded), unless `fsdp_defer_reduce`: then `fsdp.no_gradient_sync` before the last (each
        rank accumulates unsharded gradients, the last backward reduce-scatters their sum; see
        fsdp.py for the memory this holds)."""
        if last_micro or self.parallel == "none" or (self.parallel == "fsdp" and not self.cfg.fsdp_defer_reduce):
            return contextlib.nullcontext()
        if self.parallel == "ddp":
            return self.engine.no_sync()
        return fsdp.no_gradient_sync(self.model)

    def _observe_all_ranks(self, step: int, mean_loss: torch.Tensor, grad_norm: torch.Tensor,
                           rank_flag: torch.Tensor):
        """`monitor.observe` with the all-reduced flag deciding (several ranks, lag 0)."""
        loss_v, grad_v, flag_v = torch.stack([mean_loss.float().reshape(()), grad_norm.float().reshape(()),
                                              rank_flag]).tolist()
        self.monitor.stop_collecting()
        verdict = self.monitor.judge(step, loss_v, grad_v, flagged=flag_v > 0)
        _explain_rank_flag(verdict)
        if verdict.healthy and step % self.monitor.config.stats_every == 0:
            self.monitor.update_baselines(self.model)
        return verdict

    def _judge_now(self, step: int, mean_loss: torch.Tensor, grad_norm: torch.Tensor,
                   step_sums: torch.Tensor, rank_flag: torch.Tensor | None = None) -> None:
        if rank_flag is None:
            verdict = self.monitor.observe(step, mean_loss, grad_norm, self.model)
        else:
            verdict = self._observe_all_ranks(step, mean_loss, grad_norm, rank_flag)
        suspects = [] if verdict.healthy else self.monitor.suspect_layers(self.model)
        decision = self.policy.step(verdict, suspects)
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the LR this step used (a Python float)
        if decision.apply_update:
            self.optimizer.step()
            self._window_sums += step_sums
            self._window_applied += 1
        self._end_step()
        self._after_verdicts([(verdict, decision)])

    def _judge_later(self, step: int, mean_loss: torch.Tensor, grad_norm: torch.Tensor,
                     step_sums: torch.Tensor, limits: tuple[float, float],
                     rank_flag: torch.Tensor | None = None) -> None:
        """The device flags the step against the monitor's current limits and the fused AdamW
        skips a flagged update (`found_inf`); the numbers go to the lagged reader, and the
        verdicts of steps <= step - lag are judged now. With several ranks the flag is the
        all-reduced one (already on the device: still no host sync)."""
        flag = self.monitor.device_flag(mean_loss, grad_norm, limits)
        if rank_flag is not None:
            flag = torch.maximum(flag, rank_flag)
        parts = [torch.stack([mean_loss.float().reshape(()), grad_norm.float().reshape(()), flag])]
        layer_names, act_names = [], []
        if step % self.monitor.config.stats_every == 0:
            layer_names, layer_values = self.monitor.layer_stats_tensor(self.model)
            act_names, act_values = self.monitor.take_activations()
            parts.append(layer_values.reshape(-1).float())
            if act_values is not None:
                parts.append(act_values.reshape(-1).float())
        self.monitor.stop_collecting()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.found_inf = flag
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self._window_sums += torch.where(flag > 0, torch.zeros_like(step_sums), step_sums)
        self._window_applied += 1 - flag
        self._reader.push(step, torch.cat(parts), meta=(limits, layer_names, act_names))
        judged = [self._judge_entry(entry) for entry in self._reader.ready(step - self._lag)]
        self._end_step()
        self._after_verdicts(judged)

    def _judge_entry(self, entry) -> tuple:
        """(verdict, decision) for one lagged entry (see `_judge_later`)."""
        values = entry.values.tolist()
        limits, layer_names, act_names = entry.meta
        verdict = self.monitor.judge(entry.step, values[0], values[1], limits=limits, flagged=values[2] > 0)
        if self.dist.enabled:
            _explain_rank_flag(verdict)
        if verdict.healthy and layer_names:
            n = len(layer_names)
            rows = [values[3 + 2 * i: 5 + 2 * i] for i in range(n)]
            self.monitor.fold_baselines(self.monitor.stats_from_rows(layer_names, rows))
            if act_names:
                self.monitor.forward_stats = dict(zip(act_names, values[3 + 2 * n:]))
        # Gradients present now are the next step's (or none, when draining): weights single out
        # a blown-up layer either way.
        suspects = [] if verdict.healthy else self.monitor.suspect_layers(self.model)
        return verdict, self.policy.step(verdict, suspects)

    def _end_step(self) -> None:
        self.scheduler.step()
        self._scale_lr(self.policy.lr_scale)
        self.clear_grads()
        self.step += 1

    def clear_grads(self) -> None:
        """Clears the gradients between steps. Under DDP they are views into the all-reduce buckets:
        zeroed in place they stay views, and the next step's no_sync micro-batches accumulate into the
        buckets. Set to None, they would accumulate into fresh tensors beside the buckets (a second
        copy of every gradient until the reducer copies it back; measured on 2 H100s: the 24gb peak
        per GPU went from 16.8-17.6 GiB to 16.0, against 15.8 on one GPU). Elsewhere None frees them."""
        self.optimizer.zero_grad(set_to_none=self.parallel != "ddp")

    def _after_verdicts(self, judged: list[tuple]) -> None:
        """Snapshots and ladder actions for the verdicts just reached, oldest first. The state
        now is `self.step`; a verdict on step s vouches for the state after s + 1 updates."""
        for verdict, decision in judged:
            self._last_healthy = verdict.healthy
            if decision.action is not None:
                before = self.step
                self._act(decision)
                if self.step != before:
                    break  # rolled back: the later verdicts were about steps it undid
            else:
                verified = verdict.step + 1
                self.snapshots.update(verified, True, self._capture, ahead=self.step - verified)

    def _drain(self) -> None:
        """Judges every step still waiting in the lagged reader (one sync; before checkpoints
        and at the end, so a checkpoint only ever holds verified steps)."""
        if self._lag and len(self._reader):
            self._after_verdicts([self._judge_entry(e) for e in self._reader.ready(self.step)])

    def _scale_lr(self, factor: float) -> None:
        # LambdaLR recomputes lr = base * lambda(step) on every step, so a cut lasts exactly as
        # long as the policy keeps asking for it and the schedule resumes afterwards.
        if factor != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] *= factor

    # ---- recovery ------------------------------------------------------------------------------
    def _capture(self) -> dict:
        state = capture_state(self.model, self.optimizer, self.scheduler)
        state.update(step=self.step, rng=capture_rng(self.device))
        return state

    def _act(self, decision: Decision) -> None:
        """Carries out a ladder action beyond skipping the update."""
        self.snapshots.update(self.step, False, self._capture)
        if decision.action in ("rollback", "reinit"):
            self._rollback(decision)
        if decision.action == "reinit":
            layers = decision.suspects
            names = reinit_layers(self.model, self.optimizer, layers)
            if self.parallel == "ddp":
                # Each rank has its own RNG stream: rank 0's fresh weights go to every rank, or
                # the replicas would differ from here on.
                params = dict(self.model.named_parameters())
                for name in names:
                    torch.distributed.broadcast(params[name].data, src=0)
            what = (f"re-initialized {len(names)} weight matrices of {', '.join(layers)}" if layers else
                    "no layer stood out in the statistics, so nothing was re-initialized")
            self.policy.record(decision.step, "reinit", f"{decision.reason}; {what}", layers=layers)
        if decision.action == "stop":
            where = self.latest_checkpoint or "none was written"
            raise TrainingStopped(
                f"training stopped at step {decision.step}: the recovery ladder is exhausted ({decision.reason}); "
                f"the last good checkpoint is {where}; see {self.run_dir / EVENTS_FILE}. Try a lower --set lr=... "
                "or grad_clip, or check the data")

    def _rollback_choice(self, now: int) -> dict | None:
        """The checkpoint every rank rolls back to: rank 0 picks it and broadcasts
        `{"path", "sharded", "train_state"}` (the train state without optimizer state), or None.
        Ranks that looked for themselves could pick different ones (a file-system race, a stale
        view of a network mount) and then load different steps or wait in different collectives."""
        choice = None
        with fail_together(self.dist, "to pick the checkpoint to roll back to"):
            if self.dist.is_main:
                choice = self._pick_rollback_checkpoint(now)
        return broadcast_object(choice, self.dist)

    def _pick_rollback_checkpoint(self, now: int) -> dict | None:
        """(rank 0) The newest verified checkpoint at or before step `now`, or None. Its weights
        are not read here: each rank loads what it needs afterwards."""
        if not list_checkpoints(self.run_dir):
            return None
        try:
            path, state = last_good_train_state(self.run_dir)
        except CheckpointError as err:
            log.warning("muse: warning: rollback impossible: %s", err)
            return None
        # A checkpoint from before an earlier rollback can lie ahead of the replayed steps.
        if int(state["step"]) > now:
            return None
        state = {key: value for key, value in state.items() if key != "optimizer"}
        return {"path": str(path), "sharded": is_sharded_checkpoint(path), "train_state": state}

    def _load_rollback_weights(self, path: Path, sharded: bool) -> None:
        """A sharded checkpoint: each rank reads its own shards (never the full weights on every
        GPU). A single-process one (the checkpoint a 1 -> N resume started from): every rank
        reads it into CPU memory, then keeps its part; a failed read on any rank stops all."""
        if sharded:
            self._load_weights_and_optimizer(path, True, None, None)
            return
        ckpt = None
        with fail_together(self.dist, f"to read checkpoint {path} for a rollback"):
            ckpt = load_checkpoint(path, map_location="cpu")
        self._load_weights_and_optimizer(path, False, ckpt.model_state, ckpt.train_state["optimizer"])

    def _rollback(self, decision: Decision) -> None:
        """Back to the last confirmed snapshot (else the last loadable checkpoint), skipping the
        batches that were used since."""
        now = self.step
        if self.snapshots.good is not None:
            state = self.snapshots.good[1]
            restore_state(state, self.model, self.optimizer, self.scheduler)
            restore_rng(state["rng"], self.device)
            target, source = int(state["step"]), "in-memory snapshot"
        else:
            choice = self._rollback_choice(now)
            if choice is None:
                self.policy.record(decision.step, "rollback", f"{decision.reason}; no good state to roll "
                                   "back to yet (no confirmed snapshot or usable checkpoint): update skipped")
                return
            path, state = Path(choice["path"]), choice["train_state"]
            self._load_rollback_weights(path, choice["sharded"])
            self.scheduler.load_state_dict(state["scheduler"])
            rngs = state["rng"]
            if len(rngs) == self.dist.world_size:
                restore_rng(rngs[self.dist.rank], self.device)
            target, source = int(state["step"]), f"checkpoint {path.name}"
        self.data_offset += now - target
        self.step = target
        self.snapshots.pending = None
        self._reader.clear()
        self._new_window()
        if self._progress is not None:
            self._progress.advance(target - now)
        self.policy.record(decision.step, "rollback", f"{decision.reason}; restored the {source} of step "
                           f"{target}, skipping {now - target} steps of data", to_step=target,
                           data_offset=self.data_offset)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> RunResult:
        """Trains from `self.step` to `stop_at` (default: `cfg.steps`), evaluating, logging and
        checkpointing on the way; always ends with an evaluation, a plot and a checkpoint."""
        stop = self.cfg.steps if stop_at is None else stop_at
        if not self.step < stop <= self.cfg.steps:
            raise ValueError(f"fit: nothing to do from step {self.step} to stop_at={stop} "
                             f"(steps={self.cfg.steps})")
        self._clock_start, self._elapsed_base = time.perf_counter(), self.elapsed_s
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dropped = self.metrics.truncate_after(self.step)
            if dropped:
                log.info("dropped %d metrics records after step %d (replayed from the checkpoint)",
                         dropped, self.step)
        progress = Progress(self.cfg.steps, self.step, enabled=self.show_progress and self.dist.is_main)
        self._progress, self.policy.notify = progress, progress.message
        try:
            if self.step == 0:
                self._evaluate(progress)
            self._loop(stop, progress)
        finally:
            progress.close()
            self._progress, self.policy.notify = None, None
            self.elapsed_s = self._clock()
            self._clock_start = None
        return self.result()

    def _loop(self, stop: int, progress: Progress) -> None:
        ckpt_every = self.cfg.checkpoint_interval()
        window_start, paused = time.perf_counter(), 0.0
        due_ckpt = False
        while self.step < stop:
            grad_norm = self.train_step()
            progress.advance()
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                window_s = time.perf_counter() - window_start - paused
                self._log(grad_norm, window_s, progress)
                window_start, paused = time.perf_counter(), 0.0
            t0 = time.perf_counter()
            if self.step % self.cfg.eval_every == 0 or self.step == stop:
                self._evaluate(progress)
            # A checkpoint is written only after a healthy step (a due one waits for the next):
            # the ladder falls back to checkpoints, so they must hold good states.
            due_ckpt = due_ckpt or self.step % ckpt_every == 0
            if due_ckpt or self.step == stop:
                self._drain()  # may roll back: then the step is no longer `stop`
            if (due_ckpt and self._last_healthy) or self.step == stop:
                self.save(progress)
                due_ckpt = False
            paused += time.perf_counter() - t0

    def _clock(self) -> float:
        """Seconds this run has trained, over all invocations (resumes add up)."""
        if self._clock_start is None:
            return self.elapsed_s
        return self._elapsed_base + time.perf_counter() - self._clock_start

    def _log(self, grad_norm: torch.Tensor, window_s: float, progress: Progress) -> None:
        """Writes one metrics line: means over the window since the last line (one host sync)."""
        # The applied-update count is the same on every rank (one decision for all).
        packed = torch.cat([all_reduce_sum(self._window_sums.clone(), self.dist),
                            self._window_applied.reshape(1)]).tolist()
        steps = packed[3]
        if steps == 0:  # every step of the window was skipped by the recovery ladder
            return
        means = [x / (steps * self.cfg.grad_accum * self.dist.world_size) for x in packed[:3]]
        self._new_window()
        if not self.dist.is_main:
            return
        mem, mem_label = memory_gib(self.device)
        record = {
            "step": self.step,
            "loss": means[0],
            "ce": means[1],
            "aux": means[2],
            "lr": self.last_lr,
            # After DDP's all-reduce every rank holds the same gradients, hence the same norm.
            "grad_norm": float(grad_norm.item()),
            "tokens_per_s": steps * self.tokens_per_step / max(window_s, 1e-9),
            "elapsed_s": self._clock(),
            "mem_gib": mem,
            **self.monitor.forward_stats,  # per-block activation / AR-SSM / BK statistics
        }
        self.metrics.write(record)
        progress.report(f"step {self.step}/{self.cfg.steps} | loss {record['loss']:.4f} | "
                        f"gnorm {record['grad_norm']:.3f} | lr {record['lr']:.2e} | "
                        f"{record['tokens_per_s']:,.0f} tok/s | {mem_label} {mem:.2f} GiB")

    def _evaluate(self, progress: Progress) -> EvalResult:
        info = self.dist
        if self.parallel == "fsdp" and len(self.eval_batches) % info.world_size:
            # A sharded forward is collective: every rank must run as many as the others. When the
            # batches do not split evenly, every rank scores all of them (same result everywhere).
            info = DistInfo()
        result = evaluate_loss(self.model, self.eval_batches, self.device, dtype=self.cfg.dtype,
                               dist_info=info)
        entry = {"step": self.step, "loss": result.loss}
        self.evals["last"] = entry
        self.evals["start"] = self.evals["start"] or entry
        if self.evals["best"] is None or result.loss < self.evals["best"]["loss"]:
            self.evals["best"] = entry
        if self.dist.is_main:
            self.metrics.write({"step": self.step, "eval_loss": result.loss, "eval_ppl": result.perplexity,
                                "eval_tokens": result.tokens, "elapsed_s": self._clock()})
            plot_loss(self.metrics.path, self.run_dir / PLOT_FILE)
            progress.message(f"step {self.step}: held-out loss {result.loss:.4f} "
                             f"(ppl {result.perplexity:.2f}, {result.tokens:,} tokens)")
        return result

    def save(self, progress: Progress | None = None) -> Path:
        """Checkpoints the current step (collective under DDP / FSDP; rank 0 writes)."""
        if self.parallel in ("ddp", "fsdp"):
            fsdp.average_buffers(self.model)
        self.elapsed_s = self._clock()
        state = self.train_state()
        marker = self.faults.save_marker(self.step)
        if marker is not None:  # injected crash_in_save: pickling it kills the process mid-write
            state["injected_fault"] = marker
        if self.sharded_checkpoints:
            path = save_sharded_checkpoint(self.run_dir, self.step, model=self.model, optimizer=self.optimizer,
                                           config=self.run_config, tokenizer_json=self.tokenizer_json,
                                           train_state=state, keep=self.cfg.keep_checkpoints, info=self.dist)
            if progress is not None and self.dist.is_main:
                progress.message(f"step {self.step}: checkpoint {path} (sharded)")
            self.latest_checkpoint = path
            return path
        # --parallel none runs in one process (resolve_parallel refuses several), so the agreement
        # below costs nothing; it keeps this path safe should that ever change.
        path = self.run_dir / f"step-{self.step:07d}"
        with fail_together(self.dist, f"to write checkpoint {path}"):
            if self.dist.is_main:
                path = save_checkpoint(self.run_dir, self.step, model_state=self.model.state_dict(),
                                       config=self.run_config, tokenizer_json=self.tokenizer_json,
                                       train_state=state, keep=self.cfg.keep_checkpoints)
                if progress is not None:
                    progress.message(f"step {self.step}: checkpoint {path}")
        self.latest_checkpoint = path
        return path

    def result(self) -> RunResult:
        start, last = self.evals["start"], self.evals["last"]
        return RunResult(
            run_dir=self.run_dir,
            preset=str(self.run_config.get("preset", "")),
            step=self.step,
            steps=self.cfg.steps,
            latest_checkpoint=self.latest_checkpoint,
            metrics_path=self.metrics.path,
            plot_path=self.run_dir / PLOT_FILE,
            start_eval_loss=start["loss"] if start else None,
            end_eval_loss=last["loss"] if last else None,
            elapsed_s=self.elapsed_s,
        )


_DEVICE_LIMIT_REASON = "at the trend's limit (device comparison)"


def _explain_rank_flag(verdict) -> None:
    """A step flagged by another rank's own loss (its numbers here look healthy) gets a reason
    that says so instead of the monitor's generic "at the limit" one."""
    if not verdict.healthy and verdict.reason == _DEVICE_LIMIT_REASON:
        verdict.reason = ("a rank's own loss was not finite or above the trend's limit (the ranks' flags "
                          "are all-reduced, so every rank skips this step)")

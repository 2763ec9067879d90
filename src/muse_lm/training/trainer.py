"""`Trainer`: the training loop of one run directory.

One optimizer step = `grad_accum` micro-batches of `micro_batch` sequences per rank; the loss of
each micro-batch is divided by `grad_accum` so the gradient is the mean over the step's tokens.
Micro-batch `m` of step `s` is `PackedBatches.batch(s * grad_accum + m)`, a pure function of
the step, so resuming needs only the step (plus model, optimizer, scheduler and RNG state).

No host sync happens on ordinary steps: loss sums and the grad norm stay on the device and are
read once per `log_every` steps.
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

from muse_lm.training.checkpoint import Checkpoint, save_checkpoint
from muse_lm.training.config import TrainConfig
from muse_lm.training.data import PackedBatches, heldout_batches
from muse_lm.training.distributed import DistInfo, all_reduce_sum, barrier, gather_objects
from muse_lm.training.evaluate import EvalResult, autocast_context, evaluate_loss, validate_token_ids
from muse_lm.training.metrics import PLOT_FILE, MetricsWriter, Progress, memory_gib, plot_loss
from muse_lm.training.optim import WarmupCosine, build_optimizer, build_scheduler
from muse_lm.training.options import RunResult
from muse_lm.training.rng import capture_rng, restore_rng

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

    Example:
        >>> trainer = Trainer(model, cfg, train_tokens=tok.train, heldout_tokens=tok.heldout,
        ...                   run_dir="runs/x", tokenizer_json=tokenizer.to_str(), run_config={...})
        >>> result = trainer.fit()
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, *, train_tokens: np.ndarray,
                 heldout_tokens: np.ndarray, run_dir: str | Path, tokenizer_json: str, run_config: dict,
                 seed: int = 0, device: torch.device | str = "cpu", dist_info: DistInfo | None = None,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.dist = dist_info or DistInfo()
        self.run_dir = Path(run_dir)
        self.tokenizer_json = tokenizer_json
        self.run_config = run_config
        self.show_progress = progress
        self.model = model.to(self.device)
        validate_token_ids(self.model, [train_tokens, heldout_tokens])
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        self.engine: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.engine = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
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
        self._new_window()

    # ---- state ---------------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over all ranks."""
        return self.cfg.tokens_per_step * self.dist.world_size

    def _new_window(self) -> None:
        # Sums of (loss, ce, aux) over the micro-batches since the last log line, on the device.
        self._window_sums = torch.zeros(3, dtype=torch.float32, device=self.device)
        self._window_steps = 0

    def train_state(self) -> dict:
        """Everything besides the weights that exact resume needs. Collective: every rank must
        call it (each rank's RNG state is gathered)."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": gather_objects(capture_rng(self.device), self.dist),
            "world_size": self.dist.world_size,
            "elapsed_s": self.elapsed_s,
            "evals": dict(self.evals),
            "log_window": {"sums": self._window_sums.detach().cpu(), "steps": self._window_steps},
        }

    def load_state(self, ckpt: Checkpoint) -> None:
        """Restores weights, optimizer, scheduler, RNG and counters from a checkpoint, so that the
        next step is exactly the one an uninterrupted run would take."""
        state = ckpt.train_state
        self.model.load_state_dict(ckpt.model_state)
        self.optimizer.load_state_dict(state["optimizer"])
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
        self._window_sums = window["sums"].to(self.device)
        self._window_steps = int(window["steps"])
        self.latest_checkpoint = ckpt.path

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimizer step at `self.step`; returns the pre-clip grad norm (a device tensor)."""
        self.engine.train()
        accum = self.cfg.grad_accum
        for micro in range(accum):
            x, y = self.batches.batch(self.step * accum + micro)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            # DDP: all-reduce gradients only on the last micro-batch of the step.
            sync = not self.dist.enabled or micro == accum - 1
            with (contextlib.nullcontext() if sync else self.engine.no_sync()):
                with autocast_context(self.device, self.cfg.dtype):
                    loss, ce, aux = self.engine(x, y, return_parts=True)
                (loss / accum).backward()
            self._window_sums += torch.stack([loss.detach(), ce.detach(), aux.detach()]).float()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip, foreach=True)
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the LR this step used (a Python float)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._window_steps += 1
        return grad_norm

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
        try:
            if self.step == 0:
                self._evaluate(progress)
            self._loop(stop, progress)
        finally:
            progress.close()
            self.elapsed_s = self._clock()
            self._clock_start = None
        return self.result()

    def _loop(self, stop: int, progress: Progress) -> None:
        ckpt_every = self.cfg.checkpoint_interval()
        window_start, paused = time.perf_counter(), 0.0
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
            if self.step % ckpt_every == 0 or self.step == stop:
                self.save(progress)
            paused += time.perf_counter() - t0

    def _clock(self) -> float:
        """Seconds this run has trained, over all invocations (resumes add up)."""
        if self._clock_start is None:
            return self.elapsed_s
        return self._elapsed_base + time.perf_counter() - self._clock_start

    def _log(self, grad_norm: torch.Tensor, window_s: float, progress: Progress) -> None:
        """Writes one metrics line: means over the window since the last line (one host sync)."""
        steps = self._window_steps
        sums = all_reduce_sum(self._window_sums.clone(), self.dist)
        means = (sums / (steps * self.cfg.grad_accum * self.dist.world_size)).tolist()
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
        }
        self.metrics.write(record)
        progress.report(f"step {self.step}/{self.cfg.steps} | loss {record['loss']:.4f} | "
                        f"gnorm {record['grad_norm']:.3f} | lr {record['lr']:.2e} | "
                        f"{record['tokens_per_s']:,.0f} tok/s | {mem_label} {mem:.2f} GiB")

    def _evaluate(self, progress: Progress) -> EvalResult:
        result = evaluate_loss(self.model, self.eval_batches, self.device, dtype=self.cfg.dtype,
                               dist_info=self.dist)
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
        """Checkpoints the current step (collective under DDP; rank 0 writes)."""
        self.elapsed_s = self._clock()
        state = self.train_state()
        barrier(self.dist)
        path = self.run_dir / f"step-{self.step:07d}"
        if self.dist.is_main:
            path = save_checkpoint(self.run_dir, self.step, model_state=self.model.state_dict(),
                                   config=self.run_config, tokenizer_json=self.tokenizer_json,
                                   train_state=state, keep=self.cfg.keep_checkpoints)
            if progress is not None:
                progress.message(f"step {self.step}: checkpoint {path}")
        barrier(self.dist)
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

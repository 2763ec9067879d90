"""Quality at equal tokens (`muse bench --only ppl,ablate`): trained held-out perplexity of MuseLM
against a strong TransformerLM, and ablations of MuseLM's parts.

Every model is trained by the real `Trainer` on the real data pipeline (corpus -> tokenizer -> token
streams), with the same tokenizer, batches (same order), optimizer, LR schedule, batch, sequence
length and token budget (at most one epoch). A model run stops at the token budget or at its time
cap, whichever comes first; a later model of the same part stops at the step the first one reached,
so all of a part's models see the same tokens unless a later one hits its own cap (then
`equal_tokens` is false and the comparison is also given at the last step both evaluated).

Parts are registered in `PARTS` (name -> `BenchPart`); `cmd_bench` runs the ones `--only` names,
writes `<out>/<part>.json` + `<out>/<part>.png` and prints a markdown report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import importlib.metadata
import json
import logging
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch._dynamo.exc import TorchDynamoException

from muse_lm.errors import ConfigError, DataError, MuseUserError
from muse_lm.io import write_text_atomic
from muse_lm.layers import DenseTiedEmbedding, convert_to_lns
from muse_lm.models import MuseConfig, MuseLM, TransformerConfig, TransformerLM
from muse_lm.presets import count_parameters, get_preset
from muse_lm.provenance import git
from muse_lm.training.config import TrainConfig
from muse_lm.training.data import Corpus, load_corpus, tokenize_corpus
from muse_lm.training.distributed import DistInfo
from muse_lm.training.evaluate import evaluate_loss
from muse_lm.training.options import apply_overrides, parse_set_args
from muse_lm.training.rng import seed_everything
from muse_lm.training.run import resolve_device
from muse_lm.training.tokenizer import get_tokenizer
from muse_lm.training.trainer import Trainer

log = logging.getLogger("muse_lm")

GIB = 2**30
COMPILE_MODES = ("auto", "on", "off")
# What each ablation changes in the full model's MuseConfig, and what that removes.
ABLATIONS: dict[str, tuple[dict, str]] = {
    "full": ({}, "the full model"),
    "no_bk": ({"bk_heads": 0}, "no BK spectral features (bk_heads=0)"),
    "fixed_rank": ({"gate_mode": "fixed"}, "no rank gates: every rank always on, no L1 penalty"),
    "dense_embedding": ({"embedding": "dense"}, "dense tied embedding + head instead of HTT"),
}


# ---- settings ----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class QualitySettings:
    """One quality part's run (`ppl` or `ablate`); validated on construction."""

    tokens: int  # token budget per model (capped at one epoch of the training split)
    max_seconds: float  # time cap per model run: compile, training and periodic evaluations
    preset: str = "8gb"  # model shape and training recipe
    data: str | None = None  # corpus spec (None: the embedded python-stdlib corpus)
    max_chars: int = 64_000_000  # training documents kept (whole, in hash order) to cap tokenization time
    device: str | None = None
    compile: str = "auto"  # auto: compile on CUDA, fall back (recorded) if it fails; on: fail loudly
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # MuseConfig / TrainConfig fields (`--set`)
    variants: tuple[str, ...] = tuple(ABLATIONS)  # ablate only; "full" first

    def __post_init__(self) -> None:
        checks = [(isinstance(self.tokens, int) and self.tokens > 0, "--tokens", self.tokens, "a positive integer"),
                  (self.max_seconds > 0 and math.isfinite(self.max_seconds), "--max-seconds", self.max_seconds,
                   "a positive number of seconds"),
                  (isinstance(self.max_chars, int) and self.max_chars > 0, "--max-chars", self.max_chars,
                   "a positive integer"),
                  (self.compile in COMPILE_MODES, "--compile", self.compile, f"one of {COMPILE_MODES}"),
                  (isinstance(self.seed, int) and self.seed >= 0, "--seed", self.seed, "an integer >= 0")]
        for ok, name, value, what in checks:
            if not ok:
                raise ConfigError(f"{name} {value!r} is invalid: it must be {what}")
        unknown = [v for v in self.variants if v not in ABLATIONS]
        if unknown or not self.variants or self.variants[0] != "full" or len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"--variants {','.join(self.variants)!r} is invalid: give distinct names from "
                              f"{', '.join(ABLATIONS)}, starting with full (the reference the others are "
                              "compared with)")


def plan_configs(settings: QualitySettings) -> tuple[MuseConfig, TrainConfig]:
    """The preset's model and recipe with the bench's changes and the user's overrides (steps are set
    later, from the token budget and the corpus)."""
    preset = get_preset(settings.preset)
    # One micro-batch per optimizer step (as `muse train`'s quick job) so a few-minute budget makes
    # hundreds of updates; memory is not the question here, so no activation checkpointing.
    train = dataclasses.replace(preset.train, grad_accum=1, activation_checkpointing=False)
    model, train = apply_overrides(preset.model, train, settings.overrides)
    return model, train


def finalize_recipe(model: MuseConfig, train: TrainConfig, settings: QualitySettings, data: BenchData
                    ) -> tuple[MuseConfig, TrainConfig, bool]:
    """Vocabulary from the tokenizer; steps = tokens // tokens_per_step, at most one epoch; warm-up
    and evaluation spacing scaled to the run (unless set explicitly). Returns (model, train, capped)."""
    model = dataclasses.replace(model, vocab_size=data.vocab_size)
    per_step = train.tokens_per_step
    epoch_steps = (data.train.size - 1) // train.seq_len // (train.micro_batch * train.grad_accum)
    if epoch_steps < 1:
        raise DataError(f"the training split ({data.train.size} tokens) is shorter than one step of {per_step} "
                        "tokens; use more --data or a smaller --set seq_len / micro_batch")
    steps = settings.tokens // per_step
    if steps < 1:
        raise ConfigError(f"--tokens {settings.tokens} is less than one optimizer step ({per_step} tokens = "
                          "seq_len x micro_batch x grad_accum); pass a larger --tokens")
    capped = steps > epoch_steps
    steps = min(steps, epoch_steps)
    set_keys = settings.overrides
    warmup = set_keys.get("warmup_steps", min(train.warmup_steps, max(1, steps // 20)))
    eval_every = set_keys.get("eval_every", max(1, steps // 8))
    train = dataclasses.replace(train, steps=steps, warmup_steps=min(warmup, steps), eval_every=eval_every)
    return model, train, capped


# ---- data --------------------------------------------------------------------------------------
@dataclass
class BenchData:
    """The corpus's tokenizer and token streams, shared by every model of a part."""

    corpus: str
    fingerprint: str
    tokenizer_json: str
    vocab_size: int
    train: np.ndarray
    heldout: np.ndarray
    truncated: bool
    seconds: float

    def record(self) -> dict:
        return {"corpus": self.corpus, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
                "train_tokens": int(self.train.size), "heldout_tokens": int(self.heldout.size),
                "truncated_to_max_chars": self.truncated, "prepare_s": self.seconds}


def _truncate(corpus: Corpus, max_chars: int) -> tuple[Corpus, bool]:
    """Keeps whole training documents, in their hash order, up to `max_chars` characters (the held-out
    split is kept whole); the fingerprint then names the cut, so caches never mix the two."""
    kept, size = [], 0
    for doc in corpus.train_docs:
        if kept and size + len(doc) > max_chars:
            break
        kept.append(doc)
        size += len(doc)
    if len(kept) == len(corpus.train_docs):
        return corpus, False
    fingerprint = hashlib.sha256(f"{corpus.fingerprint}\nmax_chars={max_chars}".encode()).hexdigest()
    return dataclasses.replace(corpus, train_docs=kept, fingerprint=fingerprint), True


def load_bench_data(spec: str | None, vocab_size: int, max_chars: int) -> BenchData:
    """Corpus -> (cached) tokenizer of `vocab_size` -> (cached) token streams."""
    start = time.perf_counter()
    corpus, truncated = _truncate(load_corpus(spec), max_chars)
    tokenizer = get_tokenizer(corpus, vocab_size)
    tokens = tokenize_corpus(corpus, tokenizer)
    return BenchData(corpus.name, corpus.fingerprint, tokenizer.to_str(), tokenizer.get_vocab_size(),
                     tokens.train, tokens.heldout, truncated, time.perf_counter() - start)


# ---- the transformer baseline ------------------------------------------------------------------
def matched_transformer_config(muse: MuseConfig) -> TransformerConfig:
    """A TransformerLM with MuseLM's width, depth and vocabulary whose SwiGLU width (a multiple of 64)
    brings its non-embedding parameters as close as possible to MuseLM's; heads of width 64."""
    body = count_parameters(muse)[1]
    d, layers = muse.d_model, muse.n_layers
    heads = max(1, d // 64)
    while d % heads or (d // heads) % 2:
        heads -= 1
    # Per layer: attention 4 d^2, SwiGLU 3 d hidden, two RMSNorm gains; plus the final norm.
    ffn_budget = (body - d) / layers - 4 * d * d - 2 * d
    hidden = max(64, 64 * round(ffn_budget / (3 * d) / 64))
    return TransformerConfig(vocab_size=muse.vocab_size, d_model=d, n_layers=layers, n_heads=heads,
                             ffn_mult=hidden / d, norm_eps=muse.norm_eps, init_std=muse.init_std)


class CutCrossEntropyHead(DenseTiedEmbedding):
    """The dense tied table whose loss is cut-cross-entropy's fused kernel (CUDA only)."""

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from cut_cross_entropy import linear_cross_entropy as cce

        # CCE wants h and the table in one dtype: the autocast dtype when autocast is on.
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else h.dtype
        return cce(h.to(dtype), self.weight.to(dtype), targets).float()


def transformer_head(device: torch.device) -> dict:
    """{"impl": "cut_cross_entropy" | "linear_cross_entropy", "why": ...}: CCE where it imports on CUDA."""
    if device.type != "cuda":
        return {"impl": "linear_cross_entropy", "why": "cut-cross-entropy needs CUDA"}
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError as err:
        return {"impl": "linear_cross_entropy", "why": f"cut-cross-entropy does not import: {err}"}
    return {"impl": "cut_cross_entropy", "why": "imports on CUDA"}


def build_transformer(cfg: TransformerConfig, head: dict) -> TransformerLM:
    model = TransformerLM(cfg)
    if head["impl"] == "cut_cross_entropy":
        cce = CutCrossEntropyHead(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std)
        cce.load_state_dict(model.embed.state_dict())
        model.embed = cce
    return model


# ---- one model run -----------------------------------------------------------------------------
class Compiler:
    """`torch.compile` of a model's forward under the --compile rule: "auto" compiles on CUDA and, if
    compiling fails, records the error and continues uncompiled; "on" lets the failure propagate."""

    def __init__(self, model: nn.Module, mode: str, device: torch.device) -> None:
        self.model, self.mode = model, mode
        self.active = mode == "on" or (mode == "auto" and device.type == "cuda")
        self.used = self.active
        self.error: str | None = None
        if self.active:
            # The forward, not the module: top-level hooks (the loss recorder) stay outside the graph.
            model.forward = torch.compile(model.forward)

    def call(self, fn: Callable[[], object], cleanup: Callable[[], None] = lambda: None):
        """fn(); on a compile failure under "auto": uncompile, cleanup(), fn() again."""
        try:
            return fn()
        except TorchDynamoException as err:
            if not self.active or self.mode != "auto":
                raise
            self.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:400]}"
            log.warning("torch.compile failed (%s); continuing uncompiled (--compile auto)", self.error)
            del self.model.forward
            torch.compiler.reset()
            self.active, self.used = False, False
            cleanup()
            return fn()

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Runs the model uncompiled inside: evaluation (eval mode, no grad, a short last batch) would
        compile extra graphs that cost more than its few forward passes."""
        if not self.active:
            yield
            return
        compiled = self.model.forward
        del self.model.forward
        try:
            yield
        finally:
            self.model.forward = compiled

    def record(self) -> dict:
        return {"requested": self.mode, "compiled": self.used, "error": self.error, "evaluation": "eager"}


class LossRecorder:
    """Sums the training cross-entropy of every training forward on the device (no host sync) through
    a forward hook; `take()` reads and resets the mean (one sync)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output) -> None:
        if module.training and torch.is_grad_enabled() and isinstance(output, tuple):
            self.sum += output[1].detach().double()  # output = (loss, ce, aux): ce compares across models
            self.count += 1

    def take(self) -> float | None:
        if self.count == 0:
            return None
        mean = float(self.sum.item()) / self.count
        self.sum.zero_()
        self.count = 0
        return mean


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass
class RunLimits:
    max_seconds: float
    stop_at: int  # the step to stop at (<= cfg.steps)
    matched: bool  # stop_at came from an earlier model of the part (equal tokens)


class ModelRun:
    """Trains one model with the real Trainer and records curves, time, throughput and memory."""

    def __init__(self, name: str, trainer: Trainer, compiler: Compiler, limits: RunLimits, start: float) -> None:
        self.name, self.trainer, self.compiler, self.limits, self.start = name, trainer, compiler, limits, start
        self.device, self.cfg = trainer.device, trainer.cfg
        self.recorder = LossRecorder(trainer.model, self.device)
        self.log_every = max(1, limits.stop_at // 50)
        self.train_curve: list[dict] = []
        self.eval_curve: list[dict] = []
        self.eval_s = 0.0
        self.stop_reason = "budget"

    def _point(self, step: int) -> dict:
        return {"step": step, "tokens": step * self.trainer.tokens_per_step,
                "elapsed_s": time.perf_counter() - self.start}

    def evaluate(self) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        tr = self.trainer
        with self.compiler.eager():
            result = evaluate_loss(tr.model, tr.eval_batches, self.device, dtype=self.cfg.dtype)
        self.eval_s += time.perf_counter() - t0
        self.eval_curve.append({**self._point(tr.step), "loss": result.loss, "ppl": _finite(result.perplexity)})
        log.info("%s step %d/%d | held-out loss %.4f (ppl %.2f) | %.0f s", self.name, tr.step, self.limits.stop_at,
                 result.loss, result.perplexity, time.perf_counter() - self.start)

    def _log_point(self) -> None:
        loss = self.recorder.take()
        if loss is not None:
            self.train_curve.append({**self._point(self.trainer.step), "loss": loss})

    def train(self) -> None:
        tr, stop = self.trainer, self.limits.stop_at
        self.evaluate()
        warm = min(3, stop // 4)  # the first steps compile: leave them out of the throughput
        t_warm = eval_warm = step_warm = None
        while tr.step < stop:
            if tr.step > 0 and time.perf_counter() - self.start >= self.limits.max_seconds:
                self.stop_reason = "time"
                break
            self.compiler.call(tr.train_step, cleanup=lambda: tr.optimizer.zero_grad(set_to_none=True))
            if tr.step % self.log_every == 0 or tr.step == stop:
                self._log_point()
            if tr.step == warm and t_warm is None:
                _sync(self.device)
                t_warm, eval_warm, step_warm = time.perf_counter(), self.eval_s, tr.step
            if tr.step % self.cfg.eval_every == 0 or tr.step == stop:
                self.evaluate()
        if self.stop_reason == "time":
            self._log_point()
            if self.eval_curve[-1]["step"] != tr.step:
                self.evaluate()
        elif self.limits.matched and stop < self.cfg.steps:
            self.stop_reason = "matched"
        _sync(self.device)
        end = time.perf_counter()
        self.train_s = end - self.start - self.eval_s
        steady = (tr.step - step_warm) * tr.tokens_per_step / max(end - t_warm - (self.eval_s - eval_warm), 1e-9) \
            if t_warm is not None and tr.step > step_warm else None
        self.tokens_per_s = steady or tr.step * tr.tokens_per_step / max(self.train_s, 1e-9)

    def record(self) -> dict:
        tr, model = self.trainer, self.trainer.model
        mem = {"peak_allocated_gib": None, "peak_reserved_gib": None}
        if self.device.type == "cuda":
            mem = {"peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                   "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB}
        events = tr.run_dir / "events.jsonl"
        final = self.eval_curve[-1]
        return {
            "name": self.name, "model_type": model.model_type, "config": model.config.to_dict(),
            "params": model.num_parameters(), "non_embedding_params": model.num_parameters(exclude_embedding=True),
            "compile": self.compiler.record(), "steps": tr.step, "tokens": tr.step * tr.tokens_per_step,
            "stop_reason": self.stop_reason, "wall_s": time.perf_counter() - self.start, "train_s": self.train_s,
            "eval_s": self.eval_s, "tokens_per_s": self.tokens_per_s, **mem,
            "final": {k: final[k] for k in ("step", "tokens", "loss", "ppl")},
            "effective_ranks": model.effective_ranks() if hasattr(model, "effective_ranks") else None,
            "stability_events": len(events.read_text().splitlines()) if events.exists() else 0,
            "curves": {"train": self.train_curve, "eval": self.eval_curve},
        }


def _fresh_device(device: torch.device) -> None:
    """Frees the previous run's memory so each run's peak is its own."""
    gc.collect()
    torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_model(name: str, make_model: Callable[[], nn.Module], cfg: TrainConfig, data: BenchData, *,
                device: torch.device, limits: RunLimits, compile_mode: str, seed: int) -> dict:
    """Builds (seeded) and trains one model; returns its record (see `ModelRun.record`)."""
    _fresh_device(device)
    start = time.perf_counter()
    seed_everything(seed)
    model = make_model()
    if cfg.lns:  # the recipe's 8-bit LNS FFN weights, trained straight-through (as `muse train` does)
        convert_to_lns(model, "ffn", trainable=True)
    log.info("%s: %.2fM params (%.2fM non-embedding), %d steps of %d tokens", name, model.num_parameters() / 1e6,
             model.num_parameters(exclude_embedding=True) / 1e6, limits.stop_at, cfg.tokens_per_step)
    with tempfile.TemporaryDirectory(prefix=f"muse-bench-{name}-") as tmp:
        trainer = Trainer(model, cfg, train_tokens=data.train, heldout_tokens=data.heldout, run_dir=tmp,
                          tokenizer_json=data.tokenizer_json, run_config={"bench": name}, seed=seed,
                          device=device, progress=False)
        run = ModelRun(name, trainer, Compiler(trainer.model, compile_mode, device), limits, start)
        run.train()
        return run.record()


# ---- environment -------------------------------------------------------------------------------
def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()




def environment(device: torch.device) -> dict:
    """Where and with what the numbers were measured."""
    status = git("status", "--porcelain")
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu": _cpu_name(), "torch": torch.__version__, "triton": _package_version("triton"),
        "cuda": torch.version.cuda, "cut_cross_entropy": _package_version("cut-cross-entropy"),
        "python": platform.python_version(), "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---- the parts ---------------------------------------------------------------------------------
def _prepare(settings: QualitySettings) -> tuple[torch.device, MuseConfig, TrainConfig, BenchData, dict]:
    device = resolve_device(settings.device, DistInfo())
    model_cfg, train_cfg = plan_configs(settings)
    data = load_bench_data(settings.data, model_cfg.vocab_size, settings.max_chars)
    model_cfg, train_cfg, capped = finalize_recipe(model_cfg, train_cfg, settings, data)
    header = {"schema": 1, "environment": environment(device),
              "settings": {**dataclasses.asdict(settings), "variants": list(settings.variants)},
              "data": data.record(), "train": train_cfg.to_dict(), "epoch_capped": capped}
    log.info("data %s: %d train / %d held-out tokens (%.1f s) | %d steps x %d tokens%s", data.corpus,
             data.train.size, data.heldout.size, data.seconds, train_cfg.steps, train_cfg.tokens_per_step,
             " (one epoch: the token budget was capped)" if capped else "")
    return device, model_cfg, train_cfg, data, header


def _common_eval(a: dict, b: dict) -> dict | None:
    """The last step both runs evaluated: {"step", "tokens", "<name>": loss ...}."""
    steps = {p["step"]: p for p in a["curves"]["eval"]}
    common = [p for p in b["curves"]["eval"] if p["step"] in steps]
    if not common:
        return None
    last = common[-1]
    return {"step": last["step"], "tokens": last["tokens"], a["name"]: steps[last["step"]]["loss"],
            b["name"]: last["loss"]}


def compare(muse: dict, other: dict, target: float = 1.05) -> dict:
    """MuseLM's held-out perplexity relative to another run's (ratio = exp(loss difference))."""
    ratio = math.exp(muse["final"]["loss"] - other["final"]["loss"])
    return {"equal_tokens": muse["tokens"] == other["tokens"], "tokens": muse["tokens"],
            "muse_ppl": muse["final"]["ppl"], f"{other['name']}_ppl": other["final"]["ppl"],
            "ppl_ratio": ratio, "target_ratio": target, "within_target": ratio <= target,
            "at_last_common_eval": _common_eval(muse, other)}


def run_ppl(settings: QualitySettings) -> dict:
    """MuseLM vs the matched strong TransformerLM at equal tokens (see the module docstring)."""
    start = time.perf_counter()
    device, muse_cfg, train_cfg, data, header = _prepare(settings)
    tf_cfg = matched_transformer_config(muse_cfg)
    head = transformer_head(device)
    common = dict(device=device, compile_mode=settings.compile, seed=settings.seed)
    muse = train_model("muse", lambda: MuseLM(muse_cfg), train_cfg, data,
                       limits=RunLimits(settings.max_seconds, train_cfg.steps, matched=False), **common)
    tf = train_model("transformer", lambda: build_transformer(tf_cfg, head), train_cfg, data,
                     limits=RunLimits(settings.max_seconds, muse["steps"], matched=True), **common)
    tf["head"] = head
    body = muse["non_embedding_params"]
    return {"part": "ppl", **header, "runs": {"muse": muse, "transformer": tf},
            "param_match": (tf["non_embedding_params"] - body) / body,
            "comparison": compare(muse, tf), "wall_s": time.perf_counter() - start}


def run_ablate(settings: QualitySettings) -> dict:
    """The full MuseLM and each of `settings.variants` without one part, at equal tokens."""
    start = time.perf_counter()
    device, full_cfg, train_cfg, data, header = _prepare(settings)
    runs: dict[str, dict] = {}
    for name in settings.variants:
        changes, what = ABLATIONS[name]
        cfg = dataclasses.replace(full_cfg, **changes)
        stop = runs["full"]["steps"] if runs else train_cfg.steps
        runs[name] = train_model(name, lambda cfg=cfg: MuseLM(cfg), train_cfg, data, device=device,
                                 limits=RunLimits(settings.max_seconds, stop, matched=bool(runs)),
                                 compile_mode=settings.compile, seed=settings.seed)
        runs[name]["change"] = {"config": changes, "what": what}
    return {"part": "ablate", **header, "runs": runs, "rows": ablation_rows(runs),
            "equal_tokens": len({r["tokens"] for r in runs.values()}) == 1, "wall_s": time.perf_counter() - start}


def ablation_rows(runs: dict[str, dict]) -> list[dict]:
    """One row per variant against the full model: held-out loss (delta > 0: the part helps), speed,
    memory."""
    full = runs["full"]
    rows = []
    for name, r in runs.items():
        mem, full_mem = r["peak_allocated_gib"], full["peak_allocated_gib"]
        rows.append({
            "variant": name, "what": r["change"]["what"], "heldout_loss": r["final"]["loss"],
            "ppl": r["final"]["ppl"], "loss_delta_vs_full": r["final"]["loss"] - full["final"]["loss"],
            "tokens_per_s": r["tokens_per_s"], "speed_vs_full": r["tokens_per_s"] / full["tokens_per_s"],
            "peak_allocated_gib": mem, "memory_vs_full": mem / full_mem if mem and full_mem else None,
            "params": r["params"], "tokens": r["tokens"], "stop_reason": r["stop_reason"],
        })
    return rows


# ---- plots and reports -------------------------------------------------------------------------
def _figure(panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * panels, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)


def _curves(ax, runs: dict[str, dict], kind: str, title: str) -> None:
    for name, r in runs.items():
        points = r["curves"][kind]
        style = "o-" if kind == "eval" else "-"
        ax.plot([p["tokens"] / 1e6 for p in points], [p["loss"] for p in points], style, label=name,
                markersize=3, linewidth=1.2)
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_ppl(result: dict, path: Path) -> None:
    fig, (train_ax, eval_ax) = _figure(2)
    _curves(train_ax, result["runs"], "train", "training loss")
    _curves(eval_ax, result["runs"], "eval", "held-out loss")
    _save(fig, path)


def plot_ablate(result: dict, path: Path) -> None:
    rows = result["rows"]
    bars = [("heldout_loss", "final held-out loss", 1.0), ("tokens_per_s", "training tokens/s (k)", 1e-3)]
    if all(row["peak_allocated_gib"] is not None for row in rows):  # CUDA runs only
        bars.append(("peak_allocated_gib", "peak allocated GiB", 1.0))
    fig, (eval_ax, *bar_axes) = _figure(1 + len(bars))
    _curves(eval_ax, result["runs"], "eval", "held-out loss")
    names = [row["variant"] for row in rows]
    for ax, (key, label, scale) in zip(bar_axes, bars):
        values = [row[key] * scale for row in rows]
        ax.bar(names, values)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=20)
        if key == "heldout_loss":  # differences of a few hundredths: zoom in
            spread = max(values) - min(values)
            ax.set_ylim(min(values) - max(spread, 0.01), max(values) + 0.5 * max(spread, 0.01))
    _save(fig, path)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _where(result: dict) -> str:
    env = result["environment"]
    commit = (env["git_commit"] or "unknown")[:10] + (" (dirty)" if env["git_dirty"] else "")
    return f"{env['device_name']} | torch {env['torch']} | commit {commit} | {env['date']}"


def report_ppl(result: dict) -> str:
    lines = [f"### ppl: held-out perplexity at equal tokens ({result['data']['corpus']})", "", _where(result), "",
             "| model | params | non-emb | tokens | stop | held-out loss | ppl | tok/s | peak GiB | compiled |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"].values():
        final, peak = r["final"], _fmt(r["peak_allocated_gib"], ".2f")
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['non_embedding_params'] / 1e6:.2f}M | "
                     f"{r['tokens']:,} | {r['stop_reason']} | {final['loss']:.4f} | {_fmt(final['ppl'], '.2f')} | "
                     f"{r['tokens_per_s']:,.0f} | {peak} | {r['compile']['compiled']} |")
    c = result["comparison"]
    head = result["runs"]["transformer"]["head"]["impl"]
    verdict = "within" if c["within_target"] else "NOT within"
    lines += ["", f"MuseLM / transformer perplexity = {c['ppl_ratio']:.3f} ({verdict} the {c['target_ratio']:.2f} "
              f"target); equal tokens: {c['equal_tokens']}; transformer head: {head}"]
    return "\n".join(lines)


def report_ablate(result: dict) -> str:
    lines = [f"### ablate: MuseLM without each part, equal tokens ({result['data']['corpus']})", "", _where(result),
             "", "| variant | what | held-out loss | delta vs full | ppl | tok/s | speed vs full | peak GiB | "
             "tokens | stop |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['variant']} | {row['what']} | {row['heldout_loss']:.4f} | "
                     f"{row['loss_delta_vs_full']:+.4f} | {_fmt(row['ppl'], '.2f')} | {row['tokens_per_s']:,.0f} | "
                     f"{row['speed_vs_full']:.2f}x | {_fmt(row['peak_allocated_gib'], '.2f')} | {row['tokens']:,} | "
                     f"{row['stop_reason']} |")
    lines += ["", "delta > 0: the variant is worse, i.e. the part it removes helps by that many nats/token"]
    return "\n".join(lines)


# ---- the `muse bench` command ------------------------------------------------------------------
@dataclass(frozen=True)
class BenchPart:
    """One `muse bench --only NAME` part: `plan(args)` validates (before anything runs), `run(plan)` returns
    the JSON record, `plot(record, png)` draws it, `report(record)` is its markdown."""

    name: str
    plan: Callable[[argparse.Namespace], object]
    run: Callable[[object], dict]
    plot: Callable[[dict, Path], None]
    report: Callable[[dict], str]


def _quality_plan(default_tokens: int, default_seconds: float, *, ablate: bool):
    def plan(args: argparse.Namespace) -> QualitySettings:
        variants = tuple(v.strip() for v in args.variants.split(",")) if ablate and args.variants else tuple(ABLATIONS)
        tokens = default_tokens if args.tokens is None else args.tokens
        seconds = default_seconds if args.max_seconds is None else args.max_seconds
        return QualitySettings(tokens=tokens, max_seconds=seconds,
                               preset=args.preset, data=args.data, max_chars=args.max_chars, device=args.device,
                               compile=args.compile, seed=args.seed, overrides=parse_set_args(args.sets),
                               variants=variants)
    return plan


# Defaults sized for one H100: each model run <= 3 min (ppl) / 2 min (ablate), each part < 10 min.
PARTS: dict[str, BenchPart] = {
    "ppl": BenchPart("ppl", _quality_plan(2_000_000, 180.0, ablate=False), run_ppl, plot_ppl, report_ppl),
    "ablate": BenchPart("ablate", _quality_plan(1_500_000, 120.0, ablate=True), run_ablate, plot_ablate,
                        report_ablate),
}


def register_part(part: BenchPart) -> None:
    """Adds a part to `muse bench` (e.g. the model-speed and memory parts)."""
    PARTS[part.name] = part


def add_bench_options(p: argparse.ArgumentParser) -> None:
    """The options of the quality parts (also used by the benchmarks/ scripts)."""
    p.add_argument("--tokens", type=int, default=None,
                   help="token budget per model, at most one epoch (default: ppl 2M, ablate 1.5M)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time cap per model run, compile and evaluations included (default: ppl 180, ablate 120; "
                        "model, memory: the whole part, 540)")
    p.add_argument("--preset", default="8gb", help="model shape and recipe (default: 8gb)")
    p.add_argument("--data", default=None, help="corpus: file, .jsonl, directory, glob, python-stdlib (default) "
                                                "or python-sources")
    p.add_argument("--max-chars", type=int, default=64_000_000,
                   help="keep at most this many characters of training documents (caps tokenization time)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                   help="torch.compile each model: auto (CUDA; a failure is recorded and the run goes on "
                        "uncompiled), on (a failure is an error), off")
    p.add_argument("--cuda-graph", choices=COMPILE_MODES, default="off",
                   help="model: replay each training step as one captured CUDA graph: auto (CUDA; a failed "
                        "capture is recorded and that point runs uncaptured), on (a failure is an error), off "
                        "(default). Throughput only for now: earlier points' graph memory is not returned, so "
                        "later peaks are inflated")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed (default 0)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a MuseConfig/TrainConfig field for every model, e.g. --set lr=6e-4")
    p.add_argument("--quick", action="store_true", help="model, memory: a smaller grid and fewer steps")
    p.add_argument("--variants", default=None,
                   help=f"ablate: comma list starting with full (default: {','.join(ABLATIONS)})")
    p.add_argument("--out", default=None, help="directory for <part>.json and <part>.png "
                                                "(default: runs/bench-<timestamp>; benchmarks/results to publish)")


def add_bench_parser(sub) -> argparse.ArgumentParser:
    """Registers `muse bench` on an argparse subparsers object."""
    p = sub.add_parser("bench", help="benchmarks: trained perplexity vs a transformer (ppl), ablations (ablate), "
                                        "training speed vs T (model), preset memory (memory)")
    p.add_argument("--only", default=None, help=f"comma list of parts: {', '.join(PARTS)} (default: all)")
    add_bench_options(p)
    p.set_defaults(func=cmd_bench)
    return p


def _parts(only: str | None) -> list[BenchPart]:
    names = [n.strip() for n in only.split(",") if n.strip()] if only else list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise ConfigError(f"--only {only!r}: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    return [PARTS[n] for n in dict.fromkeys(names)]


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs the parts, writes <out>/<part>.json and .png, prints the markdown report."""
    parts = _parts(args.only)
    out = Path(args.out) if args.out else Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory")
    args.out = str(out)  # the model and memory parts rewrite <out>/<part>.json as they go
    plans = [part.plan(args) for part in parts]  # every mistake is reported before anything runs
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for part, plan in zip(parts, plans):
        record = part.run(plan)
        write_text_atomic(out / f"{part.name}.json", json.dumps(record, indent=1, allow_nan=False) + "\n")
        part.plot(record, out / f"{part.name}.png")
        reports.append(part.report(record))
        log.info("%s: wrote %s and %s", part.name, out / f"{part.name}.json", out / f"{part.name}.png")
        write_report(out)
    print("\n\n".join(reports))
    return 0


def write_report(out: Path) -> Path:
    """<out>/report.md: the tables and plot of every part whose JSON is in `out` (parts run one at a
    time into one directory add up)."""
    sections = []
    for name, part in PARTS.items():
        if (out / f"{name}.json").exists():
            text = part.report(json.loads((out / f"{name}.json").read_text()))
            png = f"\n\n![{name}]({name}.png)" if (out / f"{name}.png").exists() else ""
            sections.append(text + png)
    path = out / "report.md"
    write_text_atomic(path, "# muse bench\n\n" + "\n\n".join(sections) + "\n")
    return path


def script_main(part: str, argv: list[str] | None = None) -> int:
    """`python benchmarks/<script>.py [options]`: one part, `muse bench`'s options and exit codes."""
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name, description=f"muse bench --only {part}")
    add_bench_options(parser)
    args = parser.parse_args(argv)
    args.only = part
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return cmd_bench(args)
    except MuseUserError as err:
        print(f"{parser.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


# The model-speed and memory parts register themselves (muse_lm.bench_speed imports this module).
from muse_lm import bench_speed  # noqa: E402, F401, I001

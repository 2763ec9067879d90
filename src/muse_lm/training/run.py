"""`train(options)`: turns a `RunOptions` into a `Trainer` and runs it.

Planning (which preset, which configs, which run directory, fresh or resumed) is separate from
building (corpus, tokenizer, model), so every user mistake is reported before any data is read
or anything is written.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch

from muse_lm.errors import CheckpointError, ConfigError
from muse_lm.io import list_checkpoints
from muse_lm.layers import convert_to_lns
from muse_lm.models import MuseConfig, MuseLM
from muse_lm.presets import get_preset, resolve_preset_name
from muse_lm.training import distributed
from muse_lm.training.checkpoint import Checkpoint
from muse_lm.training.config import TrainConfig
from muse_lm.training.data import Corpus, TokenizedCorpus, load_corpus, tokenize_corpus
from muse_lm.training.distributed import DistInfo
from muse_lm.training.faults import FaultPlan
from muse_lm.training.metrics import METRICS_FILE
from muse_lm.training.options import RunOptions, RunResult, apply_overrides
from muse_lm.training.recovery import load_last_good_checkpoint
from muse_lm.training.rng import seed_everything
from muse_lm.training.stability import StabilityConfig
from muse_lm.training.tokenizer import get_tokenizer, load_tokenizer
from muse_lm.training.trainer import Trainer

log = logging.getLogger("muse_lm")

DEFAULT_RUNS_DIR = Path("runs")


@dataclass
class RunPlan:
    """A validated run: what to build and where, before anything is read or written."""

    preset: str
    model: MuseConfig
    train: TrainConfig
    run_dir: Path
    seed: int
    data: str | None
    overrides: dict
    stop_at: int
    resume_from: Checkpoint | None = None


# ---- planning ----------------------------------------------------------------------------------
def resolve_device(requested: str | None, info: DistInfo) -> torch.device:
    """`requested` ("cpu", "cuda", "cuda:N"), or cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: CUDA is not available in this PyTorch build or "
                              "machine; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
    return device


def _quickstart(preset_train: TrainConfig, steps: int) -> TrainConfig:
    """The preset's recipe shortened to the no-argument job's `steps` (no accumulation; warm-up and eval
    spacing scaled down so a short run still warms up, decays and reports held-out loss a few times)."""
    # One micro-batch per step: on a GPU the job makes `steps` updates in a few minutes (the presets'
    # accumulation is for full-length runs).
    return dataclasses.replace(preset_train, steps=steps, grad_accum=1,
                               warmup_steps=min(preset_train.warmup_steps, max(1, steps // 20)),
                               eval_every=min(preset_train.eval_every, max(1, steps // 6)))


def _default_run_dir(preset: str) -> Path:
    """runs/<preset>-<YYYYmmdd-HHMMSS>, with -2, -3, ... when that name is taken."""
    base = DEFAULT_RUNS_DIR / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _has_checkpoints(run_dir: Path) -> bool:
    return (run_dir / "latest").exists() or bool(list_checkpoints(run_dir))


def _plan_fresh(options: RunOptions, info: DistInfo) -> RunPlan:
    name = resolve_preset_name(options.preset or "auto")
    preset = get_preset(name)
    train_cfg = preset.train
    overrides = dict(options.overrides)
    if options.steps is not None:
        overrides["steps"] = options.steps
    elif options.preset is None and "steps" not in overrides:
        train_cfg = _quickstart(train_cfg, preset.quickstart_steps)
    model_cfg, train_cfg = apply_overrides(preset.model, train_cfg, overrides)
    if options.out is not None:
        run_dir = Path(options.out)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--out {run_dir} is a file; choose a directory path")
        if _has_checkpoints(run_dir):
            raise ConfigError(f"--out {run_dir} already has checkpoints: pass --resume to continue it or "
                              "choose another --out")
    else:
        run_dir = distributed.broadcast_object(_default_run_dir(name), info)
    stop_at = _check_stop_at(options.stop_at, 0, train_cfg.steps)
    return RunPlan(name, model_cfg, train_cfg, run_dir, options.seed or 0, options.data, overrides, stop_at)


def _check_stop_at(stop_at: int | None, step: int, steps: int) -> int:
    if stop_at is None:
        return steps
    if stop_at > steps:
        raise ConfigError(f"--stop-at {stop_at} is after the run's last step {steps}: pass a --stop-at "
                          f"<= {steps} (or a larger --steps)")
    if stop_at <= step:
        raise ConfigError(f"--stop-at {stop_at} is not after the checkpoint's step {step}: pass a larger "
                          "--stop-at, or leave it out to train to --steps")
    return stop_at


def _plan_resume(options: RunOptions) -> RunPlan:
    run_dir = Path(options.out)
    if not _has_checkpoints(run_dir):
        raise ConfigError(f"--resume: {run_dir} has no checkpoints to continue; leave out --resume to start "
                          "a new run there, or pass the --out of an existing run")
    # A damaged newest checkpoint (truncated or corrupted file) falls back to the previous one.
    ckpt = load_last_good_checkpoint(run_dir, map_location="cpu")
    config, state = ckpt.config, ckpt.train_state
    if state is None or not {"model", "train", "preset", "run"} <= set(config):
        raise CheckpointError(f"{ckpt.path} was not written by `muse train` (no training state); it can be "
                              "used for generate/eval, not resumed")
    name = config["preset"]
    if options.preset is not None and resolve_preset_name(options.preset) != name:
        raise ConfigError(f"--preset {options.preset} differs from the resumed run's preset {name}; leave "
                          "out --preset when resuming")
    if options.tokenizer is not None:
        raise ConfigError("--tokenizer cannot be used with --resume: the run keeps the tokenizer it was "
                          "trained with (saved in its checkpoints)")
    run = config["run"]
    seed = run["seed"] if options.seed is None else options.seed
    if seed != run["seed"]:
        raise ConfigError(f"--seed {seed} differs from the resumed run's seed {run['seed']} (the seed orders "
                          "the training data); leave out --seed when resuming")
    model_cfg = MuseConfig.from_dict(config["model"])
    overrides = dict(options.overrides)
    if options.steps is not None:
        overrides["steps"] = options.steps
    changed = {k for k in overrides if k in model_cfg.to_dict() and overrides[k] != getattr(model_cfg, k)}
    if changed:
        raise ConfigError(f"--set {', '.join(sorted(changed))}: the model's shape cannot change when "
                          "resuming; start a new run (another --out) instead")
    model_cfg, train_cfg = apply_overrides(model_cfg, TrainConfig.from_dict(config["train"]), overrides)
    step = int(state["step"])
    if step >= train_cfg.steps:
        raise ConfigError(f"--resume: {run_dir} already finished its {train_cfg.steps} steps (at step "
                          f"{step}); pass a larger --steps to train it longer")
    stop_at = _check_stop_at(options.stop_at, step, train_cfg.steps)
    data = options.data if options.data is not None else run.get("data")
    merged = {**run.get("overrides", {}), **overrides}
    return RunPlan(name, model_cfg, train_cfg, run_dir, seed, data, merged, stop_at, resume_from=ckpt)


def plan_run(options: RunOptions, info: DistInfo | None = None) -> RunPlan:
    """Validates `options` against the presets and the run directory (reads at most one
    checkpoint); raises MuseUserError subclasses for every user mistake."""
    info = info or DistInfo()
    return _plan_resume(options) if options.resume else _plan_fresh(options, info)


# ---- building ----------------------------------------------------------------------------------
def _data_spec(corpus: Corpus, requested: str | None) -> str:
    """What to store as the run's data: a builtin corpus name or an absolute path (so that
    `muse eval` finds the data from any working directory)."""
    if requested is None:
        return corpus.name
    path = Path(requested).expanduser()
    return str(path.resolve()) if path.exists() else requested


def _tokenizer_for(plan: RunPlan, options: RunOptions, corpus: Corpus) -> tokenizers.Tokenizer:
    if plan.resume_from is not None:
        if plan.resume_from.tokenizer_json is None:
            raise CheckpointError(f"{plan.resume_from.path} has no tokenizer.json; it cannot be resumed")
        return tokenizers.Tokenizer.from_str(plan.resume_from.tokenizer_json)
    if options.tokenizer is not None:
        return load_tokenizer(options.tokenizer)
    return get_tokenizer(corpus, plan.model.vocab_size)


def _move_stale_metrics(run_dir: Path) -> None:
    """A fresh run in a directory left by a run that never checkpointed: keep its metrics
    under another name instead of mixing them with the new run's."""
    old = run_dir / METRICS_FILE
    if old.exists():
        aside = run_dir / f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        old.rename(aside)
        log.warning("%s held metrics of an earlier run without checkpoints; moved to %s", old, aside.name)


def _load_data(plan: RunPlan, options: RunOptions, info: DistInfo
               ) -> tuple[Corpus, tokenizers.Tokenizer, TokenizedCorpus]:
    """The corpus, its tokenizer and token streams. Rank 0 trains / tokenizes first and fills
    the caches; the other ranks then read them."""
    corpus = load_corpus(plan.data)
    resumed = plan.resume_from
    if resumed is not None and resumed.config.get("corpus_fingerprint") != corpus.fingerprint:
        log.warning("the data %s differs from the corpus this run was trained on (fingerprint %s, now %s)",
                    corpus.name, str(resumed.config.get("corpus_fingerprint"))[:12], corpus.fingerprint[:12])
    if not info.is_main:
        distributed.barrier(info)
    tokenizer = _tokenizer_for(plan, options, corpus)
    tokens = tokenize_corpus(corpus, tokenizer)
    if info.is_main:
        distributed.barrier(info)
    return corpus, tokenizer, tokens


def build_trainer(plan: RunPlan, options: RunOptions, device: torch.device, info: DistInfo,
                  stability: StabilityConfig | None = None, parallel: str | None = None) -> Trainer:
    """Loads the data, builds the model and the Trainer (resumed if planned); `stability`
    overrides the monitor's defaults; `parallel` is the resolved `--parallel` (None: from
    `options` and the world size)."""
    parallel = parallel or distributed.resolve_parallel(options.parallel, info)
    corpus, tokenizer, tokens = _load_data(plan, options, info)
    resumed = plan.resume_from
    model_cfg = plan.model
    vocab = tokenizer.get_vocab_size()
    if vocab != model_cfg.vocab_size:
        if resumed is not None:
            raise CheckpointError(f"{resumed.path}: tokenizer.json has {vocab} tokens but the model has "
                                  f"{model_cfg.vocab_size}; the checkpoint is inconsistent")
        log.info("vocab_size %d -> %d (the tokenizer's size)", model_cfg.vocab_size, vocab)
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab)
    seed_everything(plan.seed)
    model = MuseLM(model_cfg)
    if plan.train.lns:
        # 8-bit LNS FFN weights trained straight-through on latent fp32 weights (same keys as nn.Linear).
        convert_to_lns(model, "ffn", trainable=True)
    # Same init on every rank (DDP also broadcasts rank 0's weights); different random streams.
    seed_everything(plan.seed + info.rank)
    run_config = {
        "model": model_cfg.to_dict(), "train": plan.train.to_dict(), "preset": plan.preset,
        "corpus_fingerprint": corpus.fingerprint, "model_type": MuseLM.model_type, "vocab_size": vocab,
        "run": {"seed": plan.seed, "data": _data_spec(corpus, plan.data), "overrides": plan.overrides,
                "world_size": info.world_size, "parallel": parallel,
                "tokenizer": "checkpoint" if resumed else (options.tokenizer or "trained")},
    }
    if resumed is None and info.is_main:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        _move_stale_metrics(plan.run_dir)
    trainer = Trainer(model, plan.train, train_tokens=tokens.train, heldout_tokens=tokens.heldout,
                      run_dir=plan.run_dir, tokenizer_json=tokenizer.to_str(), run_config=run_config,
                      seed=plan.seed, device=device, dist_info=info, progress=options.progress,
                      faults=FaultPlan.parse(options.faults), stability=stability, parallel=parallel)
    if resumed is not None:
        trainer.load_state(resumed)
    _log_start(plan, trainer, corpus, tokens, info)
    return trainer


def _log_start(plan: RunPlan, trainer: Trainer, corpus: Corpus, tokens: TokenizedCorpus, info: DistInfo
               ) -> None:
    if not info.is_main:
        return
    model = trainer.model
    log.info("run %s | preset %s | %s%s%s | %.2fM params (%.2fM non-embedding)", plan.run_dir, plan.preset,
             trainer.device, f" x {info.world_size} ranks" if info.enabled else "",
             f" ({trainer.parallel})" if trainer.parallel != "none" else "",
             model.num_parameters() / 1e6, model.num_parameters(exclude_embedding=True) / 1e6)
    log.info("data %s: %d train / %d held-out tokens | %d tokens per step | steps %d..%d of %d",
             corpus.name, tokens.train.size, tokens.heldout.size, trainer.tokens_per_step, trainer.step,
             plan.stop_at, plan.train.steps)


# ---- entry point -------------------------------------------------------------------------------
def train(options: RunOptions) -> RunResult:
    """Runs (or resumes) a training run as `muse train` does and returns where its outputs are.

    Under `torchrun` (WORLD_SIZE > 1) it joins/creates the process group and trains with DDP or
    FSDP2 (`options.parallel`); only rank 0 writes files. `--parallel ddp|fsdp` in one process
    runs on a one-rank group. The group is destroyed at the end if this call created it.
    """
    info = distributed.env_dist_info()
    parallel = distributed.resolve_parallel(options.parallel, info)
    device = resolve_device(options.device, info)
    owns_group = parallel != "none" and not torch.distributed.is_initialized()
    info = distributed.setup(device, single_rank_group=parallel != "none")
    trainer = None
    try:
        plan = plan_run(options, info)
        trainer = build_trainer(plan, options, device, info, parallel=parallel)
        result = trainer.fit(plan.stop_at)
        distributed.barrier(info)  # every rank done with its collectives before the group goes
        return result
    finally:
        if owns_group:
            # The sharded model holds the device mesh, which holds the process group: free them
            # (they sit in reference cycles) while the interpreter is alive, or gloo's worker
            # threads are torn down during interpreter shutdown and abort the process.
            trainer = None
            gc.collect()
            distributed.teardown()

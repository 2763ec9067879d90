"""Speed and memory at model level (`muse bench --only model,memory`).

`model`: full training steps (forward, backward, fused AdamW; bf16 autocast on CUDA) of MuseLM and
TransformerLM baselines at T in {1024 ... 16384} with the same tokens per step (B = tokens / T):
tokens/s (median of CUDA-event-timed steps after warm-up), peak memory (DESIGN.md: the steady
steps' max_memory_reserved + the CUDA context, measured on the same steps as the speed) and a
log-log fit of time per token against T. OOM is a recorded result.

`memory`: every training preset at full size runs real `Trainer` steps (activation checkpointing,
micro-batch, accumulation and dtype as the preset says); its peak is checked against 0.9 x budget
and against `muse estimate`. The inference preset is measured on generation.

Both parts rewrite `<out>/<part>.json` (`"complete": false`) after every measurement, so a run cut
short still leaves its results; `python -m muse_lm.bench_speed --readme README.md` puts the
tables of benchmarks/results/{model,memory}.json into the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from muse_lm.bench_quality import (
    BenchPart,
    Compiler,
    CutCrossEntropyHead,
    _figure,
    _fmt,
    _save,
    _where,
    environment,
    matched_transformer_config,
    register_part,
)
from muse_lm.errors import ConfigError
from muse_lm.io import write_text_atomic
from muse_lm.layers import DenseTiedEmbedding, convert_to_lns
from muse_lm.models import MuseConfig, MuseLM, TransformerConfig, TransformerLM
from muse_lm.presets import count_parameters, estimate_memory, get_preset
from muse_lm.training.config import TrainConfig
from muse_lm.training.distributed import DistInfo
from muse_lm.training.evaluate import autocast_context
from muse_lm.training.optim import build_optimizer
from muse_lm.training.options import apply_overrides, parse_set_args
from muse_lm.training.rng import seed_everything
from muse_lm.training.run import resolve_device
from muse_lm.training.trainer import Trainer

log = logging.getLogger("muse_lm")

GIB = 2**30
LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (1024, 4096, 16384)
MODELS: dict[str, str] = {
    "muse": "MuseLM, the preset's shape",
    "standard": "TransformerLM, SDPA, plain logits + F.cross_entropy, non-embedding params matched",
    "strong": "TransformerLM, SDPA + the faster fused head, non-embedding params matched",
    "strong_equal_total": "the strong TransformerLM with a narrower SwiGLU: MuseLM's total params",
}
QUICK_MODELS = ("muse", "standard", "strong")
MEMORY_PRESETS = ("8gb", "10gb", "24gb", "max_quality", "max_efficiency")
MAX_SECONDS = 540.0  # a part's default time cap: under 10 minutes on one H100 with set-up and plots


# ---- settings ----------------------------------------------------------------------------------
def _check(checks: list[tuple[bool, str, object, str]]) -> None:
    for ok, name, value, what in checks:
        if not ok:
            raise ConfigError(f"{name} {value!r} is invalid: it must be {what}")


@dataclass(kw_only=True)
class ModelBenchSettings:
    """The `model` part: which models, at which lengths, for how many steps."""

    preset: str = "8gb"  # MuseLM's shape; the transformers are matched to it
    lengths: tuple[int, ...] = LENGTHS
    tokens_per_step: int = 16384  # every length runs B = tokens_per_step / T rows
    warmup_steps: int = 3  # untimed (compile, autotune, allocator warm-up)
    timed_steps: int = 10  # tokens/s from their median
    models: tuple[str, ...] = tuple(MODELS)
    max_seconds: float = MAX_SECONDS  # later points are recorded as skipped once this is spent
    device: str | None = None
    compile: str = "auto"
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # MuseConfig / TrainConfig fields (`--set`)
    out: Path | None = None  # where model.json is rewritten after every point

    def __post_init__(self) -> None:
        self.lengths, self.models = tuple(self.lengths), tuple(self.models)
        _check([
            (bool(self.lengths) and all(isinstance(t, int) and t > 0 and self.tokens_per_step % t == 0
                                        for t in self.lengths), "lengths", self.lengths,
             f"positive divisors of tokens_per_step={self.tokens_per_step}"),
            (self.warmup_steps >= 1 and self.timed_steps >= 1, "steps", (self.warmup_steps, self.timed_steps),
             ">= 1 warm-up and >= 1 timed step"),
            (bool(self.models) and set(self.models) <= set(MODELS) and len(set(self.models)) == len(self.models),
             "models", self.models, f"distinct names from {', '.join(MODELS)}"),
            (self.max_seconds > 0, "--max-seconds", self.max_seconds, "a positive number of seconds"),
        ])


@dataclass(kw_only=True)
class MemorySettings:
    """The `memory` part: the presets measured and how many real optimizer steps each runs."""

    presets: tuple[str, ...] = MEMORY_PRESETS
    steps: int = 2  # optimizer steps (x the preset's accumulation); the 2nd has the AdamW state
    inference: bool = True  # also the inference preset, on generation
    new_tokens: int = 64  # generated after a prompt of the preset's seq_len
    max_seconds: float = MAX_SECONDS
    device: str | None = None
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # applied to every preset (tests shrink them)
    out: Path | None = None

    def __post_init__(self) -> None:
        self.presets = tuple(self.presets)
        for name in self.presets:
            if get_preset(name).budget_gb is None:
                raise ConfigError(f"preset {name} has no memory budget (CPU preset); choose from "
                                  f"{', '.join(MEMORY_PRESETS)}")
        _check([(self.steps >= 1, "steps", self.steps, ">= 1"),
                (self.new_tokens >= 1, "new_tokens", self.new_tokens, ">= 1"),
                (self.max_seconds > 0, "--max-seconds", self.max_seconds, "a positive number of seconds")])


# ---- devices, timing, memory -------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device(device: torch.device) -> None:
    """Drops cached blocks and compiled graphs so the next measurement's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measured_memory(device: torch.device) -> dict:
    """Peak since the last reset, GiB: reserved + the CUDA context (memory the process holds outside
    the caching allocator: driver context, cuBLAS/cuDNN handles, loaded kernels). None on a CPU."""
    if device.type != "cuda":
        return {"peak_gib": None, "peak_reserved_gib": None, "peak_allocated_gib": None, "context_gib": None}
    free, total = torch.cuda.mem_get_info(device)
    context = (total - free - torch.cuda.memory_reserved(device)) / GIB
    reserved = torch.cuda.max_memory_reserved(device) / GIB
    return {"peak_gib": reserved + context, "peak_reserved_gib": reserved,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB, "context_gib": context}


def time_steps(fn: Callable[[], object], steps: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` back-to-back calls; CUDA events between the steps, one sync at
    the end, so the host never waits between steps (as in training)."""
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        fn()
        events[i + 1].record()
    events[-1].synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]


class PartialWriter:
    """Rewrites `<out>/<part>.json` after each measurement (atomically), so a timeout keeps them."""

    def __init__(self, out: Path | None, part: str) -> None:
        self.path = None if out is None else Path(out) / f"{part}.json"

    def write(self, record: dict) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(record, indent=1, allow_nan=False) + "\n")


def _oom_text(err: torch.OutOfMemoryError) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else "CUDA out of memory"


# ---- the models --------------------------------------------------------------------------------
class PlainLogitsHead(DenseTiedEmbedding):
    """The tied table scored as most users do: full logits [N, V], then F.cross_entropy."""

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = h @ self.weight.to(h.dtype).T
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


HEADS = {"plain": PlainLogitsHead, "linear_cross_entropy": DenseTiedEmbedding,
         "cut_cross_entropy": CutCrossEntropyHead}


def equal_total_transformer_config(muse: MuseConfig) -> TransformerConfig:
    """`matched_transformer_config`'s shape with the SwiGLU narrowed (a multiple of 64) so the
    total parameters, dense embedding included, come closest to MuseLM's total."""
    base = matched_transformer_config(muse)
    d, layers = base.d_model, base.n_layers
    ffn_budget = (count_parameters(muse)[0] - muse.vocab_size * d - d) / layers - 4 * d * d - 2 * d
    if ffn_budget < 3 * d * 64:
        raise ConfigError(f"a TransformerLM of d_model {d}, {layers} layers and a dense {muse.vocab_size}-row table "
                          "cannot have MuseLM's total parameters (the table alone is too big); drop "
                          "strong_equal_total from the models")
    return dataclasses.replace(base, ffn_mult=64 * round(ffn_budget / (3 * d) / 64) / d)


def build_transformer(cfg: TransformerConfig, head: str) -> TransformerLM:
    """TransformerLM whose tied table scores with `head` (a key of HEADS); same initial weights."""
    model = TransformerLM(cfg)
    if head != "linear_cross_entropy":
        table = HEADS[head](cfg.vocab_size, cfg.d_model, init_std=cfg.init_std)
        table.load_state_dict(model.embed.state_dict())
        model.embed = table
    return model


def race_heads(device: torch.device, d_model: int, vocab: int, tokens: int, repeats: int = 5) -> dict:
    """Picks the strong baseline's head: forward + backward of cut-cross-entropy and of our
    linear_cross_entropy on [tokens, d_model] x [vocab, d_model], the faster wins. CCE is optional
    (CUDA only): if it does not import, ours is used and the reason recorded."""
    if device.type != "cuda":
        return {"impl": "linear_cross_entropy", "cut_cross_entropy": "unavailable: needs CUDA", "ms": {}}
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError as err:
        return {"impl": "linear_cross_entropy", "cut_cross_entropy": f"unavailable: {err}", "ms": {}}
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, d_model, device=device, generator=gen, dtype=torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    ms = {}
    for impl in ("cut_cross_entropy", "linear_cross_entropy"):
        head = HEADS[impl](vocab, d_model).to(device)

        def step(head=head):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = head.loss(h, targets)
            loss.backward()

        time_steps(step, 2, device)
        ms[impl] = 1e3 * statistics.median(time_steps(step, repeats, device))
        del head
    return {"impl": min(ms, key=ms.get), "cut_cross_entropy": "available", "ms": ms}


class DynamicCompiler(Compiler):
    """`Compiler` with dynamic shapes: one graph per model serves every (B, T) of the grid. Static
    shapes would compile each model once per length (about 20 compiles: over the 10-minute budget)."""

    def __init__(self, model: nn.Module, mode: str, device: torch.device) -> None:
        super().__init__(model, "off", device)
        self.mode = mode
        self.active = self.used = mode == "on" or (mode == "auto" and device.type == "cuda")
        if self.active:
            model.forward = torch.compile(model.forward, dynamic=True)

    def record(self) -> dict:
        return {**super().record(), "shapes": "dynamic", "evaluation": None}


# ---- the `model` part --------------------------------------------------------------------------
def model_configs(settings: ModelBenchSettings) -> tuple[MuseConfig, TrainConfig, dict]:
    """(MuseLM config, the preset's recipe for AdamW's settings, {model: its config})."""
    preset = get_preset(settings.preset)
    muse, train = apply_overrides(preset.model, preset.train, settings.overrides)
    configs = {"muse": muse, "standard": matched_transformer_config(muse), "strong": matched_transformer_config(muse)}
    if "strong_equal_total" in settings.models:
        configs["strong_equal_total"] = equal_total_transformer_config(muse)
    return muse, train, {name: configs[name] for name in settings.models}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, targets: torch.Tensor,
               device: torch.device) -> None:
    """Forward (bf16 autocast on CUDA) + backward + AdamW step."""
    with autocast_context(device, "bf16"):
        loss = model(ids, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_point(model: nn.Module, optimizer: torch.optim.Optimizer, compiler: Compiler, seq_len: int,
                  settings: ModelBenchSettings, device: torch.device) -> dict:
    """One (model, T): warm-up steps, then timed steps whose peak memory is measured (the cache is
    emptied and the peak reset in between, so compile/autotune transients are not counted)."""
    batch = settings.tokens_per_step // seq_len
    point = {"seq_len": seq_len, "batch": batch, "tokens": batch * seq_len}
    gen = torch.Generator().manual_seed(settings.seed * 100_003 + seq_len)
    data = step = None
    try:
        data = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
        step = lambda ids=data[:, :-1], targets=data[:, 1:]: train_step(model, optimizer, ids, targets, device)
        t0 = time.perf_counter()
        for _ in range(settings.warmup_steps):
            compiler.call(step, cleanup=lambda: optimizer.zero_grad(set_to_none=True))
        _sync(device)
        point["warmup_s"] = time.perf_counter() - t0
        free_device(device)
        times = time_steps(step, settings.timed_steps, device)
        median = statistics.median(times)
        point.update(step_s=median, step_s_min=min(times), step_s_max=max(times),
                     tokens_per_s=point["tokens"] / median, **measured_memory(device))
    except torch.OutOfMemoryError as err:
        point["oom"] = _oom_text(err)
    del data, step  # outside the except: its traceback no longer pins the step's tensors
    if "oom" in point:
        optimizer.zero_grad(set_to_none=True)
        free_device(device)
    return point


def loglog_fit(points: list[dict]) -> dict | None:
    """Slope of log(time per token) against log(T) over the measured points (0: linear in T at fixed
    tokens; 1: time per token proportional to T), and how far time per token and peak memory move from
    the shortest T (max |x(T) / x(T_min) - 1|)."""
    ok = [p for p in points if "step_s" in p]
    if len(ok) < 2:
        return None
    x = np.log([p["seq_len"] for p in ok])
    per_token = [p["step_s"] / p["tokens"] for p in ok]
    slope = float(np.polyfit(x, np.log(per_token), 1)[0])
    spread = lambda v: max(abs(a / v[0] - 1) for a in v)
    peaks = [p["peak_gib"] for p in ok]
    return {"slope": slope, "points": len(ok), "time_per_token_spread": spread(per_token),
            "peak_spread": spread(peaks) if None not in peaks else None}


def bench_model(name: str, cfg, settings: ModelBenchSettings, train: TrainConfig, head: str, device: torch.device,
                deadline: float, on_point: Callable[[dict], None]) -> dict:
    """Builds one model (seeded) and measures it at every length; returns its record."""
    free_device(device)
    torch.compiler.reset()
    seed_everything(settings.seed)
    model = MuseLM(cfg) if name == "muse" else build_transformer(cfg, "plain" if name == "standard" else head)
    model = model.to(device)
    model.check_ids = False  # a host sync per step; the ids are in range by construction
    record = {"name": name, "what": MODELS[name], "config": cfg.to_dict(), "params": model.num_parameters(),
              "non_embedding_params": model.num_parameters(exclude_embedding=True),
              "head": _head_name(name, cfg, head), "points": []}
    log.info("model %s: %.2fM params (%.2fM non-embedding)", name, record["params"] / 1e6,
             record["non_embedding_params"] / 1e6)
    optimizer = build_optimizer(model, train, device)
    compiler = DynamicCompiler(model, settings.compile, device)
    for seq_len in settings.lengths:
        if time.perf_counter() > deadline:
            point = {"seq_len": seq_len, "skipped": f"the part's time cap ({settings.max_seconds:.0f} s) was spent"}
        else:
            point = measure_point(model, optimizer, compiler, seq_len, settings, device)
        record["points"].append(point)
        record["compile"] = compiler.record()
        log.info("model %s T=%d: %s", name, seq_len, _point_line(point))
        on_point(record)
    record["fit"] = loglog_fit(record["points"])
    del model, optimizer, compiler
    free_device(device)
    return record


def _head_name(name: str, cfg, strong_head: str) -> str:
    if name == "muse":
        return "tt_linear_cross_entropy" if cfg.embedding == "htt" else "linear_cross_entropy"
    return "plain" if name == "standard" else strong_head


def _point_line(p: dict) -> str:
    if "tokens_per_s" in p:
        return f"{p['tokens_per_s']:,.0f} tok/s, {1e3 * p['step_s']:.1f} ms/step, peak {_fmt(p['peak_gib'], '.2f')} GiB"
    return f"OOM ({p['oom']})" if "oom" in p else p["skipped"]


def _point(record: dict | None, seq_len: int, key: str):
    for p in (record or {}).get("points", []):
        if p["seq_len"] == seq_len:
            return p.get(key)
    return None


def criteria(models: dict[str, dict], lengths: tuple[int, ...]) -> list[dict]:
    """The issue's targets on this run's numbers ({"what", "value", "target", "met"}; value None: not
    measured). Speed at the shortest and longest T, memory at T=2048, flatness over T."""
    muse, strong, std = (models.get(k) for k in ("muse", "strong", "standard"))
    lo, hi = min(lengths), max(lengths)

    def ratio(a, b, t, key):
        x, y = _point(a, t, key), _point(b, t, key)
        return x / y if x is not None and y else None

    fit = lambda r, k: ((r or {}).get("fit") or {}).get(k)
    rows = [(f"muse / strong tokens/s at T={lo}", ratio(muse, strong, lo, "tokens_per_s"), ">=", 1.0),
            (f"muse / strong tokens/s at T={hi}", ratio(muse, strong, hi, "tokens_per_s"), ">=", 2.0),
            (f"muse / strong tokens/s at T={hi} (stretch)", ratio(muse, strong, hi, "tokens_per_s"), ">=", 3.0),
            ("muse / standard peak memory at T=2048", ratio(muse, std, 2048, "peak_gib"), "<=", 0.7),
            ("muse / strong peak memory at T=2048", ratio(muse, strong, 2048, "peak_gib"), "<=", 0.9),
            (f"muse time per token, max change from T={lo}", fit(muse, "time_per_token_spread"), "<=", 0.15),
            (f"muse peak memory, max change from T={lo}", fit(muse, "peak_spread"), "<=", 0.10),
            ("strong time-per-token log-log slope (grows: > 0)", fit(strong, "slope"), ">", 0.0)]
    ops = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, ">": lambda v, t: v > t}
    return [{"what": what, "value": value, "target": f"{op} {target:g}",
             "met": None if value is None else bool(ops[op](value, target))} for what, value, op, target in rows]


def run_model_part(settings: ModelBenchSettings) -> dict:
    """The `model` part (see the module docstring); returns its JSON record."""
    start = time.perf_counter()
    device = resolve_device(settings.device, DistInfo())
    muse_cfg, train, configs = model_configs(settings)
    head = race_heads(device, muse_cfg.d_model, muse_cfg.vocab_size, settings.tokens_per_step)
    log.info("strong head: %s (%s; ms %s)", head["impl"], head["cut_cross_entropy"], head["ms"])
    record = {"part": "model", "schema": 1, "complete": False, "environment": environment(device),
              "settings": {**dataclasses.asdict(settings), "out": None if settings.out is None else str(settings.out)},
              "step": "forward + backward + AdamW (fused on CUDA), bf16 autocast on CUDA, no clipping, "
                      "no activation checkpointing, random token ids",
              "strong_head": head, "models": {}}
    writer = PartialWriter(settings.out, "model")
    deadline = start + settings.max_seconds
    for name, cfg in configs.items():
        def on_point(rec: dict, name=name) -> None:
            record["models"][name] = rec
            record["wall_s"] = time.perf_counter() - start
            writer.write(record)
        on_point(bench_model(name, cfg, settings, train, head["impl"], device, deadline, on_point))
    muse_body = record["models"].get("muse", {}).get("non_embedding_params")
    for rec in record["models"].values():
        rec["body_vs_muse"] = rec["non_embedding_params"] / muse_body - 1 if muse_body else None
    record.update(criteria=criteria(record["models"], settings.lengths), complete=True,
                  wall_s=time.perf_counter() - start)
    return record


# ---- the `memory` part -------------------------------------------------------------------------
def _random_stream(vocab: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=size, dtype=np.int64)


def _checks(row: dict, budget: float | None, estimate: float | None) -> None:
    peak = row.get("peak_gib")
    row["limit_gib"] = None if budget is None else 0.9 * budget
    row["fits"] = None if peak is None or budget is None else peak <= 0.9 * budget
    row["estimate_error"] = None if peak is None or estimate is None else estimate / peak - 1
    row["estimate_within_10pct"] = None if row["estimate_error"] is None else abs(row["estimate_error"]) <= 0.10


def measure_training_preset(name: str, settings: MemorySettings, device: torch.device) -> dict:
    """`settings.steps` real Trainer steps of preset `name` at its configured size (plus overrides)."""
    preset = get_preset(name)
    model_cfg, train = apply_overrides(preset.model, preset.train, settings.overrides)
    train = dataclasses.replace(train, steps=settings.steps, warmup_steps=min(train.warmup_steps, settings.steps))
    estimate = estimate_memory(dataclasses.replace(preset, model=model_cfg, train=train))
    row = {"preset": name, "kind": "training", "seq_len": train.seq_len, "micro_batch": train.micro_batch,
           "grad_accum": train.grad_accum, "activation_checkpointing": train.activation_checkpointing,
           "dtype": train.dtype, "params": estimate["params"], "budget_gib": preset.budget_gb,
           "estimate_gib": estimate["peak_gib"], "steps": settings.steps}
    per_step = train.micro_batch * train.grad_accum * (train.seq_len + 1)
    stream = _random_stream(model_cfg.vocab_size, per_step * settings.steps + 1, settings.seed)
    free_device(device)
    seed_everything(settings.seed)
    trainer = model = None
    try:
        with tempfile.TemporaryDirectory(prefix=f"muse-memory-{name}-") as tmp:
            model = MuseLM(model_cfg)
            if train.lns:  # as `muse train`: 8-bit LNS FFN weights, trained straight-through
                convert_to_lns(model, "ffn", trainable=True)
            trainer = Trainer(model, train, train_tokens=stream, heldout_tokens=stream[:train.seq_len + 1],
                              run_dir=tmp, tokenizer_json="{}", run_config={"bench": "memory"}, seed=settings.seed,
                              device=device, progress=False)
            times = time_steps(trainer.train_step, settings.steps, device)
            row.update(step_s=times, tokens_per_s=train.tokens_per_step / times[-1], **measured_memory(device))
    except torch.OutOfMemoryError as err:
        row["oom"] = _oom_text(err)
    del trainer, model  # outside the except: nothing pins the model, optimizer state or activations now
    free_device(device)
    _checks(row, preset.budget_gb, estimate["peak_gib"])
    return row


def measure_inference(settings: MemorySettings, device: torch.device) -> dict:
    """The inference preset on generation: one prompt of the preset's seq_len, then `new_tokens`
    decoded from the recurrent state; FFN weights as 8-bit LNS codes when the preset says LNS
    (`convert_to_lns`, inference form), the rest fp32 as `muse generate` loads it."""
    preset = get_preset("inference")
    model_cfg, train = apply_overrides(preset.model, preset.train, settings.overrides)
    row = {"preset": "inference", "kind": "generation", "seq_len": train.seq_len, "batch": 1,
           "new_tokens": settings.new_tokens, "budget_gib": preset.budget_gb, "estimate_gib": None,
           "lns": "ffn" if train.lns else None}
    free_device(device)
    seed_everything(settings.seed)
    model = prompt = out = None
    try:
        model = MuseLM(model_cfg)
        if train.lns:
            convert_to_lns(model, "ffn")
        model = model.to(device).eval()
        row["params"] = model.num_parameters()
        prompt = torch.from_numpy(_random_stream(model_cfg.vocab_size, train.seq_len, settings.seed))[None].to(device)
        t0 = time.perf_counter()
        out = model.generate(prompt, settings.new_tokens, seed=settings.seed)
        _sync(device)
        row.update(generate_s=time.perf_counter() - t0, generated=out.shape[1] - train.seq_len,
                   **measured_memory(device))
    except torch.OutOfMemoryError as err:
        row["oom"] = _oom_text(err)
    del model, prompt, out
    free_device(device)
    _checks(row, preset.budget_gb, None)
    return row


def run_memory_part(settings: MemorySettings) -> dict:
    """The `memory` part (see the module docstring); returns its JSON record."""
    start = time.perf_counter()
    device = resolve_device(settings.device, DistInfo())
    record = {"part": "memory", "schema": 1, "complete": False, "environment": environment(device),
              "settings": {**dataclasses.asdict(settings), "out": None if settings.out is None else str(settings.out)},
              "full_size": not settings.overrides, "rows": []}
    writer = PartialWriter(settings.out, "memory")
    jobs = [(name, lambda name=name: measure_training_preset(name, settings, device)) for name in settings.presets]
    if settings.inference:
        jobs.append(("inference", lambda: measure_inference(settings, device)))
    for name, job in jobs:
        if time.perf_counter() - start > settings.max_seconds:
            row = {"preset": name, "skipped": f"the part's time cap ({settings.max_seconds:.0f} s) was spent"}
        else:
            row = job()
        record["rows"].append(row)
        log.info("memory %s: peak %s GiB (estimate %s, limit %s)%s", name, _fmt(row.get("peak_gib"), ".2f"),
                 _fmt(row.get("estimate_gib"), ".2f"), _fmt(row.get("limit_gib"), ".1f"),
                 f" OOM: {row['oom']}" if "oom" in row else "")
        record["wall_s"] = time.perf_counter() - start
        writer.write(record)
    record.update(complete=True, wall_s=time.perf_counter() - start)
    return record


# ---- plots and reports -------------------------------------------------------------------------
def plot_model(record: dict, path: Path) -> None:
    fig, (speed_ax, mem_ax) = _figure(2)
    for name, rec in record["models"].items():
        ok = [p for p in rec["points"] if "step_s" in p]
        lengths = [p["seq_len"] for p in ok]
        speed_ax.plot(lengths, [p["tokens_per_s"] / 1e3 for p in ok], "o-", label=name)
        if all(p["peak_gib"] is not None for p in ok):
            mem_ax.plot(lengths, [p["peak_gib"] for p in ok], "o-", label=name)
    for ax, label in ((speed_ax, "training tokens/s (k)"), (mem_ax, "peak GiB (reserved + context)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T (same tokens per step)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    _save(fig, path)


def _cell(p: dict | None, key: str, spec: str) -> str:
    if p is None or "skipped" in p:
        return "-"
    return "OOM" if "oom" in p else _fmt(p.get(key), spec)


def report_model(record: dict) -> str:
    models = record["models"]
    lengths = sorted({p["seq_len"] for rec in models.values() for p in rec["points"]})
    head = record["strong_head"]
    lines = [f"### model: training speed and memory against T ({record['settings']['tokens_per_step']:,} tokens "
             "per step)" + ("" if record["complete"] else " (INCOMPLETE: partial results)"), "", _where(record), "",
             "| model | params | non-emb | head | compiled | log-log slope | time/token change | memory change |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rec in models.items():
        fit, comp = rec.get("fit") or {}, rec.get("compile", {})
        compiled = str(comp.get("compiled")) + (f" ({comp['error'][:60]})" if comp.get("error") else "")
        lines.append(f"| {name} | {rec['params'] / 1e6:.1f}M | {rec['non_embedding_params'] / 1e6:.2f}M | "
                     f"{rec['head']} | {compiled} | {_fmt(fit.get('slope'), '.3f')} | "
                     f"{_fmt(fit.get('time_per_token_spread'), '+.1%')} | {_fmt(fit.get('peak_spread'), '+.1%')} |")
    for title, key, spec in (("tokens/s", "tokens_per_s", ",.0f"), ("peak GiB", "peak_gib", ".2f")):
        lines += ["", f"| {title} | " + " | ".join(f"T={t}" for t in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for name, rec in models.items():
            cells = [_cell(next((p for p in rec["points"] if p["seq_len"] == t), None), key, spec) for t in lengths]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"strong head: {head['impl']} (cut-cross-entropy {head['cut_cross_entropy']}"
              + "".join(f"; {k} {v:.1f} ms" for k, v in head["ms"].items()) + ")"]
    for c in record.get("criteria", []):
        verdict = {True: "met", False: "NOT met", None: "not measured"}[c["met"]]
        lines.append(f"- {c['what']}: {_fmt(c['value'], '.3f')} (target {c['target']}): {verdict}")
    return "\n".join(lines)


def plot_memory(record: dict, path: Path) -> None:
    fig, (ax,) = _figure(1)
    rows = [r for r in record["rows"] if r.get("budget_gib") is not None and "skipped" not in r]
    x = np.arange(len(rows))
    for offset, key, label in ((-0.27, "peak_gib", "measured peak"), (0.0, "estimate_gib", "muse estimate"),
                               (0.27, "limit_gib", "0.9 x budget")):
        ax.bar(x + offset, [r.get(key) or 0.0 for r in rows], width=0.27, label=label)
    ax.set_xticks(x, [r["preset"] for r in rows], rotation=20)
    ax.set_ylabel("GiB")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def report_memory(record: dict) -> str:
    yes, ckpt = {True: "yes", False: "NO", None: "-"}, {True: "yes", False: "no"}
    lines = ["### memory: presets at full size against their budgets" + ("" if record["full_size"] else
             " (REDUCED by --set: not a validation)") + ("" if record["complete"] else " (INCOMPLETE)"), "",
             _where(record), "",
             "| preset | run | params | seq x batch | ckpt | peak GiB | estimate GiB | estimate error | "
             "0.9 x budget | fits | estimate within 10% | tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['preset']} | skipped: {r['skipped']} |" + " |" * 10)
            continue
        batch = f"{r['micro_batch']} x {r['grad_accum']}" if r["kind"] == "training" else f"{r['batch']} (generate)"
        peak = "OOM" if "oom" in r else _fmt(r.get("peak_gib"), ".2f")
        lines.append(f"| {r['preset']} | {r['kind']} | {_fmt((r.get('params') or 0) / 1e6, '.1f')}M | "
                     f"{r['seq_len']} x {batch} | {ckpt.get(r.get('activation_checkpointing'), '-')} | {peak} | "
                     f"{_fmt(r.get('estimate_gib'), '.2f')} | {_fmt(r.get('estimate_error'), '+.1%')} | "
                     f"{_fmt(r.get('limit_gib'), '.1f')} | {yes[r.get('fits')]} | "
                     f"{yes[r.get('estimate_within_10pct')]} | {_fmt(r.get('tokens_per_s'), ',.0f')} |")
    lines += ["", "peak = max_memory_reserved + CUDA context (DESIGN.md); estimate = `muse estimate`"]
    return "\n".join(lines)


# ---- README ------------------------------------------------------------------------------------
README_PARTS = {"model": report_model, "memory": report_memory}


def update_readme(readme: Path, results: Path) -> list[str]:
    """Replaces the text between `<!-- bench-PART -->` and `<!-- /bench-PART -->` in `readme` with
    the report of `results/PART.json` (GPU, date and commit included), for each part whose JSON
    exists. Returns the parts written."""
    if not readme.is_file():
        raise ConfigError(f"--readme {readme} is not a file; give the README to update")
    text, done = readme.read_text(), []
    for part, report in README_PARTS.items():
        path = results / f"{part}.json"
        if not path.exists():
            continue
        begin, end = f"<!-- bench-{part} -->", f"<!-- /bench-{part} -->"
        if begin not in text or end not in text.split(begin, 1)[1]:
            raise ConfigError(f"{readme} has no {begin} ... {end} block; add the two lines where the {part} "
                              "table goes, then run this again")
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{report(json.loads(path.read_text()))}\n{end}{rest.split(end, 1)[1]}"
        done.append(part)
    write_text_atomic(readme, text)
    return done


# ---- registration ------------------------------------------------------------------------------
def _out(args: argparse.Namespace) -> Path | None:
    return Path(args.out) if args.out else None


def plan_model(args: argparse.Namespace) -> ModelBenchSettings:
    quick = getattr(args, "quick", False)
    settings = ModelBenchSettings(
        preset=args.preset, lengths=QUICK_LENGTHS if quick else LENGTHS, warmup_steps=2 if quick else 3,
        timed_steps=5 if quick else 10, models=QUICK_MODELS if quick else tuple(MODELS),
        max_seconds=args.max_seconds or MAX_SECONDS, device=args.device, compile=args.compile, seed=args.seed,
        overrides=parse_set_args(args.sets), out=_out(args))
    model_configs(settings)  # shape mistakes are reported before anything runs
    return settings


def plan_memory(args: argparse.Namespace) -> MemorySettings:
    settings = MemorySettings(steps=1 if getattr(args, "quick", False) else 2, max_seconds=args.max_seconds or
                              MAX_SECONDS, device=args.device, seed=args.seed, overrides=parse_set_args(args.sets),
                              out=_out(args))
    for name in (*settings.presets, "inference"):
        preset = get_preset(name)
        apply_overrides(preset.model, preset.train, settings.overrides)
    return settings


register_part(BenchPart("model", plan_model, run_model_part, plot_model, report_model))
register_part(BenchPart("memory", plan_memory, run_memory_part, plot_memory, report_memory))


def main(argv: list[str] | None = None) -> int:
    """`python -m muse_lm.bench_speed --readme README.md [--results benchmarks/results]`."""
    parser = argparse.ArgumentParser(prog="python -m muse_lm.bench_speed", description=update_readme.__doc__)
    parser.add_argument("--readme", required=True, type=Path)
    parser.add_argument("--results", default=Path("benchmarks/results"), type=Path)
    args = parser.parse_args(argv)
    try:
        parts = update_readme(args.readme, args.results)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.readme}: updated {', '.join(parts) or 'nothing (no model.json / memory.json)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

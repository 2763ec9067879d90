"""The `model` part: training-step throughput and peak memory of MuseLM and the transformer
baselines over T at a fixed number of tokens per step."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from muse_lm.bench_quality import (
    Compiler,
    _fmt,
    environment,
    matched_transformer_config,
)
from muse_lm.bench_speed.common import (
    MODELS,
    DynamicCompiler,
    ModelBenchSettings,
    PartialWriter,
    _oom_text,
    _sync,
    build_transformer,
    equal_total_transformer_config,
    free_device,
    measured_memory,
    race_heads,
    time_steps,
)
from muse_lm.bench_speed.graphed import GraphedStep, make_capturable
from muse_lm.errors import ConfigError
from muse_lm.models import MuseConfig, MuseLM
from muse_lm.presets import get_preset
from muse_lm.training.config import TrainConfig
from muse_lm.training.distributed import DistInfo
from muse_lm.training.evaluate import autocast_context
from muse_lm.training.optim import build_optimizer
from muse_lm.training.options import apply_overrides
from muse_lm.training.rng import seed_everything
from muse_lm.training.run import resolve_device

log = logging.getLogger("muse_lm")



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
                  settings: ModelBenchSettings, device: torch.device, pool: tuple | None = None,
                  uncapturable: str | None = None) -> dict:
    """One (model, T): warm-up steps, then timed steps whose peak memory is measured (the cache is
    emptied and the peak reset in between, so compile/autotune transients are not counted)."""
    batch = settings.tokens_per_step // seq_len
    point = {"seq_len": seq_len, "batch": batch, "tokens": batch * seq_len}
    gen = torch.Generator().manual_seed(settings.seed * 100_003 + seq_len)
    data = step = graphed = None
    try:
        data = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
        step = lambda ids=data[:, :-1], targets=data[:, 1:]: train_step(model, optimizer, ids, targets, device)
        t0 = time.perf_counter()
        for _ in range(settings.warmup_steps):
            compiler.call(step, cleanup=lambda: optimizer.zero_grad(set_to_none=True))
        graphed = _capture(step, optimizer, settings, device, point, pool, uncapturable)
        _sync(device)
        point["warmup_s"] = time.perf_counter() - t0
        free_device(device)
        times = time_steps(graphed or step, settings.timed_steps, device)
        median = statistics.median(times)
        point.update(step_s=median, step_s_min=min(times), step_s_max=max(times),
                     tokens_per_s=point["tokens"] / median, **measured_memory(device))
    except torch.OutOfMemoryError as err:
        point["oom"] = _oom_text(err)
    if graphed is not None:
        graphed.release()
    del data, step, graphed  # outside the except: its traceback no longer pins the step's tensors
    if "oom" in point:
        optimizer.zero_grad(set_to_none=True)
    free_device(device)  # the next point starts from an emptied cache, its graph's memory returned
    return point


def graphs_wanted(settings: ModelBenchSettings, device: torch.device) -> bool:
    if settings.cuda_graph == "on" and device.type != "cuda":
        raise ConfigError(f"--cuda-graph on needs a CUDA device, got {device}; use --cuda-graph auto or off")
    return settings.cuda_graph == "on" or (settings.cuda_graph == "auto" and device.type == "cuda")


# Heads whose step a CUDA graph cannot capture, and why. A capture that fails part-way leaves its
# private memory pool reserved for the life of the process, so the point's memory would count it.
UNCAPTURABLE_HEADS = {
    "cut_cross_entropy": "cut-cross-entropy finds the valid targets with nonzero() on every call "
                         "(cut_cross_entropy/utils.py, _build_flat_valids): a host sync, which a capture refuses",
}


def _capture(step: Callable[[], None], optimizer: torch.optim.Optimizer, settings: ModelBenchSettings,
             device: torch.device, point: dict, pool: tuple | None = None,
             uncapturable: str | None = None) -> GraphedStep | None:
    """The step captured as a CUDA graph when --cuda-graph asks for it (point["cuda_graph"]: True, or
    why not). Under "auto" a model known not to capture (`uncapturable`: why) is not tried, and a failed
    capture is recorded (its first error, which a retry's can hide) and the point runs uncaptured."""
    if not graphs_wanted(settings, device):
        point["cuda_graph"] = False
        return None
    if uncapturable is not None and settings.cuda_graph == "auto":
        point["cuda_graph"] = f"not attempted: {uncapturable}"
        return None
    errors = []
    for _ in range(2):  # a second try: a first capture can trip over one-time lazy initialization
        try:
            graphed = GraphedStep(step, warmup=1, pool=pool)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            if settings.cuda_graph == "on":
                raise
            errors.append(f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}")
            torch.cuda.synchronize(device)
            optimizer.zero_grad(set_to_none=True)
            continue
        point["cuda_graph"] = True if not errors else f"captured on the second try (first: {errors[0]})"
        return graphed
    point["cuda_graph"] = f"capture failed: {errors[0]}" + (f"; retry: {errors[1]}" if errors[1] != errors[0] else "")
    log.warning("CUDA graph capture failed (%s); this point runs uncaptured", point["cuda_graph"])
    return None


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
    pool = None
    if graphs_wanted(settings, device):
        make_capturable(optimizer)
        pool = torch.cuda.graph_pool_handle()  # one per model: its points' graphs reuse it in turn
    compiler = DynamicCompiler(model, settings.compile, device)
    for seq_len in settings.lengths:
        if time.perf_counter() > deadline:
            point = {"seq_len": seq_len, "skipped": f"the part's time cap ({settings.max_seconds:.0f} s) was spent"}
        else:
            point = measure_point(model, optimizer, compiler, seq_len, settings, device, pool,
                                  UNCAPTURABLE_HEADS.get(record["head"]))
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
                      "no activation checkpointing, random token ids; with cuda_graph, the whole step is "
                      "captured once per point and replayed (AdamW capturable)",
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



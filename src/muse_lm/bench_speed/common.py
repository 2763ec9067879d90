"""Shared pieces of the model and memory parts: settings, timing and memory on the device, the
baseline models and heads (see the package docstring)."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from muse_lm.bench_quality import (
    Compiler,
    CutCrossEntropyHead,
    matched_transformer_config,
)
from muse_lm.errors import ConfigError
from muse_lm.io import write_text_atomic
from muse_lm.layers import DenseTiedEmbedding
from muse_lm.models import MuseConfig, TransformerConfig, TransformerLM
from muse_lm.presets import count_parameters, get_preset

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
    # Replay each step as one captured CUDA graph (see graphed.py). Off by default: on an H100 the
    # graphs' memory pools were not returned between points (peaks grew ~7 GiB a point and the
    # transformers then ran out of memory), so graphed runs are for throughput only until that is fixed.
    cuda_graph: str = "off"
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
            (self.cuda_graph in ("auto", "on", "off"), "--cuda-graph", self.cuda_graph, "one of auto, on, off"),
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



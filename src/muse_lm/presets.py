"""Presets: each fixes the whole run (model shape + training recipe) for a memory budget.

`get_preset(name)` returns a fresh copy; aliases resolve to canonical names; `auto` picks the largest
GPU preset whose budget fits the free GPU memory, else `tiny`.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field, replace

import torch

from muse_lm.errors import ConfigError
from muse_lm.models.config import MuseConfig
from muse_lm.training.config import TrainConfig

GIB = 1024**3
# CUDA context + allocator slack that max_memory_reserved() does not see (measured on H100, torch 2.11).
CUDA_CONTEXT_GIB = 0.5
# Measured / modelled activation memory of the torch reference ops (benchmarks/probe_presets.py on one
# H100: 1.38-1.53 across the presets; benchmarks/results/presets_reference.json). Re-fit with the kernels.
ACTIVATION_CALIBRATION = 1.45


@dataclass
class Preset:
    name: str
    description: str
    model: MuseConfig
    train: TrainConfig
    aliases: tuple[str, ...] = ()
    # Peak-memory budget in GiB the run must stay under (x 0.9); None for the CPU preset.
    budget_gb: float | None = None
    # Length of the no-argument `muse train` job with this preset (a run that ends in minutes).
    quickstart_steps: int = 300
    notes: list[str] = field(default_factory=list)


def _gpu(seq_len: int, micro_batch: int, grad_accum: int, steps: int, lr: float, ckpt: bool, **kw) -> TrainConfig:
    return TrainConfig(seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum, steps=steps, lr=lr,
                       warmup_steps=min(1000, steps // 20), dtype="bf16", activation_checkpointing=ckpt,
                       eval_every=max(100, steps // 50), eval_batches=16, **kw)


def _build() -> dict[str, Preset]:
    gpt2_body = dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, ssm_expand=1, max_rank=32,
                     min_rank=4, bk_heads=4, tt_rank=16)
    presets = [
        Preset("tiny", "CPU default: small model, trains in ~5 min on 2 cores",
               MuseConfig(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, ssm_expand=2, max_rank=16,
                          min_rank=4, bk_heads=4, tt_rank=16),
               TrainConfig(seq_len=128, micro_batch=16, grad_accum=1, steps=600, lr=3e-3, warmup_steps=30,
                           dtype="fp32", eval_every=100, eval_batches=8, log_every=10),
               quickstart_steps=600),
        Preset("8gb", "GPT-2-small body (~85M non-embedding) on an 8 GB card",
               MuseConfig(**gpt2_body),
               _gpu(1024, 8, 8, 20000, 1e-3, ckpt=True),
               aliases=("memory_oriented",), budget_gb=8),
        Preset("10gb", "wider model (d 1024) on a 10-12 GB card",
               MuseConfig(vocab_size=32768, d_model=1024, n_layers=12, n_heads=16, ssm_expand=1, max_rank=32,
                          min_rank=4, bk_heads=4, tt_rank=16),
               _gpu(1024, 8, 8, 20000, 8e-4, ckpt=True),
               aliases=("balanced",), budget_gb=10),
        Preset("24gb", "fastest steps on a 24 GB card: no activation checkpointing, long context",
               MuseConfig(vocab_size=32768, d_model=1024, n_layers=16, n_heads=16, ssm_expand=1, max_rank=32,
                          min_rank=4, bk_heads=4, tt_rank=16),
               _gpu(2048, 4, 8, 20000, 8e-4, ckpt=False),
               aliases=("speed_oriented",), budget_gb=24),
        Preset("inference", "8gb model shape with 8-bit LNS weights for generation",
               MuseConfig(**gpt2_body),
               _gpu(1024, 8, 8, 20000, 1e-3, ckpt=True, lns=True),
               budget_gb=8,
               notes=["FFN linears are LNSLinear(trainable=True): 8-bit LNS codes (sign + 7-bit log, F = 3, "
                      "per-row scale) in the forward, straight-through gradients to fp32 latent weights; "
                      "convert_to_lns(model, 'ffn') after training keeps only the codes (half of bf16's bytes)"]),
        Preset("max_quality", "deepest model with the highest ranks that fits 24 GB",
               MuseConfig(vocab_size=32768, d_model=1024, n_layers=24, n_heads=16, ssm_expand=1, max_rank=64,
                          min_rank=8, bk_heads=8, tt_rank=32),
               _gpu(2048, 4, 8, 40000, 6e-4, ckpt=True),
               aliases=("quality",), budget_gb=24),
        Preset("max_efficiency", "smallest state and TT ranks: most tokens/s per GB on an 8 GB card",
               MuseConfig(vocab_size=32768, d_model=512, n_layers=8, n_heads=8, ssm_expand=1, max_rank=16,
                          min_rank=2, bk_heads=2, tt_rank=8),
               _gpu(1024, 16, 2, 20000, 1.5e-3, ckpt=False),
               aliases=("efficiency",), budget_gb=8),
    ]
    return {p.name: p for p in presets}


_PRESETS = _build()
_ALIASES = {alias: p.name for p in _PRESETS.values() for alias in p.aliases}
GPU_PRESETS_BY_SIZE = ("24gb", "10gb", "8gb")


def list_presets() -> list[str]:
    """Canonical names, plus `auto`."""
    return [*list(_PRESETS), "auto"]


def _names_help() -> str:
    aliases = ", ".join(f"{a} -> {n}" for a, n in _ALIASES.items())
    return f"presets: {', '.join(list_presets())}; aliases: {aliases}"


def resolve_preset_name(name: str) -> str:
    """Alias or canonical name -> canonical name; `auto` -> the preset it picks here."""
    if name == "auto":
        return auto_preset_name()
    if name in _PRESETS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise ConfigError(f"unknown preset {name!r}; {_names_help()}")


def get_preset(name: str) -> Preset:
    """A fresh, independent copy of the preset `name` (aliases and `auto` accepted)."""
    return copy.deepcopy(_PRESETS[resolve_preset_name(name)])


def free_gpu_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return free / GIB


def auto_preset_name() -> str:
    """The largest GPU preset whose budget fits the free memory of GPU 0, else `tiny`."""
    free = free_gpu_gib()
    if free is None:
        return "tiny"
    for name in GPU_PRESETS_BY_SIZE:
        if _PRESETS[name].budget_gb <= free:
            return name
    return "tiny"


def with_overrides(preset: Preset, overrides: dict[str, object]) -> Preset:
    """A copy of `preset` with MuseConfig / TrainConfig fields replaced by name."""
    model_fields = set(MuseConfig.__dataclass_fields__) - {"extra"}
    train_fields = set(TrainConfig.__dataclass_fields__)
    model_kw = {k: v for k, v in overrides.items() if k in model_fields}
    train_kw = {k: v for k, v in overrides.items() if k in train_fields}
    unknown = sorted(set(overrides) - model_fields - train_fields)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; valid keys: {sorted(model_fields | train_fields)}")
    return replace(preset, model=replace(preset.model, **model_kw), train=replace(preset.train, **train_kw))


# ---- sizes and memory --------------------------------------------------------------------------
def count_parameters(config: MuseConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters, counted on the meta device (nothing is allocated)."""
    from muse_lm.models import MuseLM

    with torch.device("meta"):
        model = MuseLM(config)
    total = model.num_parameters()
    return total, total - model.embed.num_parameters()


def estimate_memory(preset: Preset) -> dict:
    """Peak training memory model in GiB (DESIGN.md: max_memory_reserved + CUDA context).

    Weights, grads and AdamW moments in fp32 (16 B/param); activations per token and layer from the
    tensors autograd keeps (bf16 projections, the scan's chunk states counted in fp32, though bf16 inputs now
    save them in bf16, times a measured calibration), all layers' worth without
    activation checkpointing, one layer plus every block input with it; the fused head keeps only a
    [tokens x vocab block] fp32 tile. Calibrated against measurements in the model-benchmark issue.
    """
    m, t = preset.model, preset.train
    total, body = count_parameters(m)
    tokens = t.seq_len * t.micro_batch
    act_bytes = 2 if t.dtype == "bf16" else 4
    proj = m.head_dim * m.n_heads + 2 * m.n_heads * m.max_rank + m.n_heads + m.max_rank
    # 5 d-rows: the norms hand on the autocast dtype (one fp32 row, two bf16 units, became one bf16);
    # 2 ffn rows: the SwiGLU keeps its w13 output, not the product; 2 d_inner rows (the scan's values,
    # now their own GEMM's output with no copy beside the projection, and its output): the eager step
    # (`benchmarks/saved_activations.py`). A compiled block keeps less (layers/recompute.py).
    per_token_layer = (
        act_bytes * (5 * m.d_model + 2 * proj + 2 * m.head_dim * m.n_heads + 2 * m.ffn_hidden)
        + 4 * (m.n_heads * (m.chunk_size + 2 * m.max_rank + 2 * m.head_dim) + 4 * m.bk_heads)
    )
    if t.activation_checkpointing:
        activations = tokens * (per_token_layer + m.n_layers * m.d_model * act_bytes)
    else:
        activations = tokens * per_token_layer * m.n_layers
    activations *= ACTIVATION_CALIBRATION
    head = tokens * (4096 * 4 + 3 * m.d_model * 4)
    states = 16 * total
    context = CUDA_CONTEXT_GIB * GIB if preset.budget_gb is not None else 0
    peak = (states + activations + head) * 1.1 + context
    return {
        "preset": preset.name,
        "params": total,
        "non_embedding_params": body,
        "weights_optimizer_gib": states / GIB,
        "activations_gib": activations / GIB,
        "head_gib": head / GIB,
        "peak_gib": peak / GIB,
        "budget_gib": preset.budget_gb,
        "fits": None if preset.budget_gb is None else peak / GIB <= 0.9 * preset.budget_gb,
    }


def preset_rows() -> list[dict]:
    rows = []
    for name in _PRESETS:
        p = _PRESETS[name]
        est = estimate_memory(p)
        rows.append({
            "preset": name, "aliases": ", ".join(p.aliases) or "-",
            "d_model": p.model.d_model, "layers": p.model.n_layers, "heads": p.model.n_heads,
            "rank": f"{p.model.min_rank}-{p.model.max_rank}", "tt_rank": p.model.tt_rank,
            "vocab": p.model.vocab_size, "seq": p.train.seq_len,
            "batch": f"{p.train.micro_batch}x{p.train.grad_accum}",
            "ckpt": "yes" if p.train.activation_checkpointing else "no", "dtype": p.train.dtype,
            "lns": "ffn" if p.train.lns else "no",
            "params": est["params"], "body": est["non_embedding_params"],
            "est_peak_gib": est["peak_gib"], "budget": p.budget_gb,
        })
    return rows


def print_preset_comparison(file=None) -> None:
    """One row per preset with its aliases, parameters and estimated peak VRAM."""
    file = file or sys.stdout
    rows = preset_rows()
    cols = [("preset", "preset"), ("aliases", "aliases"), ("d_model", "d"), ("layers", "L"), ("heads", "H"),
            ("rank", "rank"), ("tt_rank", "TT r"), ("vocab", "vocab"), ("seq", "seq"), ("batch", "mb x acc"),
            ("ckpt", "ckpt"), ("dtype", "dtype"), ("lns", "LNS"), ("params", "params"), ("body", "non-emb"),
            ("est_peak_gib", "est. peak"), ("budget", "budget")]

    def fmt(key, value):
        if key in ("params", "body"):
            return f"{value / 1e6:.1f}M"
        if key == "est_peak_gib":
            return f"{value:.2f} GiB"
        if key == "budget":
            return "CPU" if value is None else f"{value:g} GiB"
        return str(value)

    table = [[title for _, title in cols]] + [[fmt(k, r[k]) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=file)
    print("auto: the largest GPU preset whose budget fits the free GPU memory, else tiny", file=file)


def _check() -> None:
    for p in _PRESETS.values():
        if p.budget_gb is not None and not math.isfinite(p.budget_gb):
            raise ConfigError(f"preset {p.name}: budget must be finite")


_check()


def presets_markdown() -> str:
    """The README's preset table (tests check that the README carries exactly this)."""
    lines = ["| preset | aliases | d_model | layers | heads | rank | TT r | vocab | seq | micro-batch x accum "
             "| act. ckpt | dtype | params | est. peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in preset_rows():
        budget = "CPU" if r["budget"] is None else f"{r['est_peak_gib']:.1f} GiB of {r['budget']:g}"
        lns = " + LNS FFN" if r["lns"] == "ffn" else ""
        lines.append(f"| {r['preset']} | {r['aliases']} | {r['d_model']} | {r['layers']} | {r['heads']} | "
                     f"{r['rank']} | {r['tt_rank']} | {r['vocab']} | {r['seq']} | {r['batch']} | {r['ckpt']} | "
                     f"{r['dtype']}{lns} | {r['params'] / 1e6:.1f}M | {budget} |")
    return "\n".join(lines)

"""Issue 4's mixer benchmark on one GPU: every competitor in the same run, forward+backward.

At a fixed 65536 tokens per call (B = 65536 / T), T in {1024, 2048, 4096, 8192, 16384, 65536}, 16 heads,
P = R = 64, bf16:
1. scan: `semiseparable_scan` (impl=None: the Triton kernel on CUDA) against SDPA causal attention
   (flash forced; head dim 64, 16 heads, same tokens) at every T.
2. layer: the full `AdaptiveRankSemiseparableLayer(d_model=1024, max_rank=64, num_heads=16, expand=1)`
   (projections, gates, conv, scan; fp32 weights under bf16 autocast, as training runs it), tokens/s.
3. bandwidth: `linear_recurrence` (fp32, 64K channels x T 8192) and `bk_resolvent` (B 16, T 8192, K 512)
   forward GB/s (inputs read once, outputs written once) against the copy bandwidth of this run.
4. fla: the scan against flash-linear-attention's `chunk_linear_attn` at equal state size (K = V = 64),
   T 2048 and 8192 first, then the other lengths; the two are timed in alternation over
   `Settings.fla_rounds` rounds and each cell is the median round (with --host-diagnostics, then each
   side's host time per call and its device time replayed from a CUDA graph). Last: a crash inside a
   competitor's kernel poisons the CUDA context, so everything else is measured (and written)
   before it.
Derived numbers (ours/SDPA, ns per token and its change from the shortest T, ours/FLA) and the issue's
targets with whether each is met are recomputed and the JSON rewritten after every cell, so a timeout
or a crash keeps what was measured. An OOM in a cell is recorded there ("oom") and the run goes on.

    PYTHONPATH=src python benchmarks/bench_mixer.py [--out benchmarks/results/mixer.json]
    PYTHONPATH=src python benchmarks/bench_mixer.py --smoke --out /tmp/mixer.json   # CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench, do_bench_cudagraph

from bench_scans import _fwd_bwd, fla_competitors
from muse_lm.layers.ar_ssm import AdaptiveRankSemiseparableLayer, initial_decay_params
from muse_lm.ops import bk_resolvent, linear_recurrence, semiseparable_scan
from muse_lm.provenance import git_commit
from muse_lm.training.evaluate import autocast_context

DEFAULT_OUT = Path(__file__).parent / "results" / "mixer.json"
PARTS = ("scan", "layer", "bandwidth", "fla")  # fla last: see the module docstring


@dataclass(frozen=True)
class Settings:
    """One run's sizes. B = tokens // T at every T."""

    device: str
    dtype: torch.dtype
    tokens: int
    lengths: tuple[int, ...]
    heads: int
    head_dim: int  # P: values per head (and SDPA's head dim)
    rank: int  # R: state R x P per head; FLA runs K = R, V = P
    layer: dict = field(default_factory=dict)
    linrec_shape: tuple[int, int, int] = (1, 8192, 65536)  # (B, T, D), fp32
    bk_shape: tuple[int, int, int] = (16, 8192, 512)  # (B, T, K), fp32 v
    copy_bytes: int = 1 << 31
    flash: bool = True  # force SDPA's flash backend (CUDA only)
    run_fla: bool = True
    fla_target_lengths: tuple[int, ...] = (2048, 8192)
    sdpa_target_length: int = 8192
    # Ours and FLA are timed in alternation, this many rounds each (the cell is the median round): FLA's
    # own time moved by up to 20% between runs on the H100, so back-to-back rounds keep a slow spell
    # (clocks, a neighbour) from landing on one side only.
    fla_rounds: int = 5
    decay: str = "layer_init"  # the scan's log-decays: see _log_decays
    # After each FLA pair, each side's host time per call and CUDA-graphed device time (untried on a GPU
    # as of 2026-11-27, so off unless asked for: --host-diagnostics).
    host_diagnostics: bool = False

    def __post_init__(self):
        bad = [t for t in self.lengths if t > self.tokens or self.tokens % t]
        if bad:
            raise ValueError(f"tokens={self.tokens} must be a multiple of every T (not of {bad}): B = tokens / T")
        missing = [t for t in (*self.fla_target_lengths, self.sdpa_target_length) if t not in self.lengths]
        if missing:
            raise ValueError(f"target lengths {missing} are not among lengths={self.lengths}; add them")
        if self.fla_rounds < 1:
            raise ValueError(f"fla_rounds={self.fla_rounds} must be >= 1")
        if self.decay not in ("layer_init", "fast"):
            raise ValueError(f"decay={self.decay!r} must be 'layer_init' or 'fast' (see _log_decays)")

    def to_json(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # as JSON reads back
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        return d


FULL = Settings(device="cuda", dtype=torch.bfloat16, tokens=65536, lengths=(1024, 2048, 4096, 8192, 16384, 65536),
                heads=16, head_dim=64, rank=64,
                layer={"d_model": 1024, "max_rank": 64, "num_heads": 16, "expand": 1})
# CPU, torch reference paths, fp32 (the references compute in fp32 anyway), SDPA's default backend, no FLA.
SMOKE = Settings(device="cpu", dtype=torch.float32, tokens=256, lengths=(16, 32), heads=2, head_dim=8, rank=8,
                 layer={"d_model": 16, "max_rank": 8, "num_heads": 2, "expand": 1},
                 linrec_shape=(1, 32, 256), bk_shape=(2, 32, 4), copy_bytes=1 << 20, flash=False, run_fla=False,
                 fla_target_lengths=(16, 32), sdpa_target_length=32)


# ---------------------------------------------------------------- timing and cells


def _cpu_ms(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall time of fn in ms after one warm-up call (the CPU smoke run's stand-in for do_bench)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _gpu_ms(fn: Callable[[], object]) -> float:
    """Median ms by do_bench. rep 200 ms, not bench_scans' 50: SDPA at T 65536 takes tens of ms a call,
    and 50 ms of repetitions would be a median of one or two calls."""
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def _host_ms(s: Settings, fn: Callable[[], object], calls: int = 20) -> float:
    """Host time to issue one call, ms: `calls` calls enqueued back to back, the clock stopped before
    the device is waited for. A call whose host time nears its device time is timed at the host's pace
    by do_bench, which records its start event right after the L2 flush."""
    fn()
    if s.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    if s.device == "cuda":
        torch.cuda.synchronize()
    return 1e3 * host / calls


def _graphed_cell(fn: Callable[[], object]) -> dict:
    """{"ms": median device time of fn replayed from a CUDA graph} (no host time in it), or {"error":
    why the capture failed}; CUDA only."""
    try:
        return {"ms": float(do_bench_cudagraph(fn, rep=200, return_mode="median"))}
    except RuntimeError as err:
        return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}


def _timer(s: Settings) -> Callable[[Callable[[], object]], float]:
    return _gpu_ms if s.device == "cuda" else _cpu_ms


def _cell(s: Settings, make_step: Callable[[], Callable[[], object]]) -> dict:
    """{"ms": median time of the closure make_step() builds}, or {"oom": message}: one cell's OOM
    (inputs included, since make_step allocates them) must not end the run."""
    try:
        return {"ms": _timer(s)(make_step())}
    except torch.OutOfMemoryError as err:
        msg = str(err).splitlines()[0]
    # Outside the except block: the traceback (and the tensors its frames hold) is gone by now.
    if s.device == "cuda":
        torch.cuda.empty_cache()
    return {"oom": msg}


def _paired_cells(s: Settings, makers: dict[str, Callable[[], Callable[[], object]]], rounds: int) -> dict:
    """{name: cell} for competitors timed in alternation: each builds its step once, then every round
    times each in turn. A cell is {"ms": median of its rounds, "rounds_ms": [...]}, or {"oom": message}
    when building or running its step ran out of memory (the others go on)."""
    steps, cells = {}, {}
    for name, make in makers.items():
        cells[name] = _cell(s, lambda name=name, make=make: steps.setdefault(name, make()))
    rounds_ms = {name: [cells[name]["ms"]] for name in steps if "ms" in cells[name]}
    for _ in range(rounds - 1):
        for name in list(rounds_ms):
            cell = _cell(s, lambda name=name: steps[name])
            if "oom" in cell:
                cells[name] = cell
                del rounds_ms[name], steps[name]
            else:
                rounds_ms[name].append(cell["ms"])
    for name, times in rounds_ms.items():
        cells[name] = {"ms": statistics.median(times), "rounds_ms": times}
    return cells


# ---------------------------------------------------------------- competitors


def _gen(s: Settings, seed: int) -> torch.Generator:
    return torch.Generator(device=s.device).manual_seed(seed)


def _log_decays(s: Settings, b: int, t: int, g: torch.Generator) -> torch.Tensor:
    """log_a [B,T,H] fp32 by `s.decay`. "layer_init": the AR-SSM layer's decays at initialization
    (`initial_decay_params`: A in [1, 16], dt in [1e-3, 1e-1]), -A_h softplus(n + dt_bias_h) with
    per-token jitter n ~ N(0, 0.5^2): the slow heads carry a state across whole
    sequences, so the two-level walk's fix-up has every state of theirs to fix, while the fast heads
    forget within a chunk (a fix-up skips a chunk whose carried decay underflowed to 0). "fast": the
    runs before 2026-11-27's last, -0.2 softplus(n), n ~ N(0, 1): every head forgets within ~10 chunks."""
    n = torch.randn(b, t, s.heads, device=s.device, generator=g)
    if s.decay == "fast":
        return -F.softplus(n) * 0.2
    a_log, dt_bias = initial_decay_params(s.heads, s.device)
    return -torch.exp(a_log) * F.softplus(0.5 * n + dt_bias)


def _scan_step(s: Settings, b: int, t: int) -> Callable[[], None]:
    """Ours: x [B,T,H,P], u and v [B,T,H,R] (scaled so y stays O(1)), log_a [B,T,H] fp32 in (-inf, 0]."""
    g, kw = _gen(s, t), {"device": s.device, "dtype": s.dtype}
    x = torch.randn(b, t, s.heads, s.head_dim, generator=g, **kw)
    u = torch.randn(b, t, s.heads, s.rank, generator=g, **kw) * s.rank**-0.5
    v = torch.randn(b, t, s.heads, s.rank, generator=g, **kw) * s.rank**-0.5
    log_a = _log_decays(s, b, t, g)
    inputs = [z.requires_grad_() for z in (x, u, v, log_a)]
    return _fwd_bwd(lambda *a: semiseparable_scan(*a)[0], inputs)


def _sdpa_step(s: Settings, b: int, t: int) -> Callable[[], None]:
    """Causal attention on the same tokens: q, k, v [B,H,T,P]; flash forced on CUDA (an error if it can't run)."""
    g = _gen(s, t + 1)
    q, k, v = (torch.randn(b, s.heads, t, s.head_dim, device=s.device, dtype=s.dtype, generator=g).requires_grad_()
               for _ in range(3))

    def attn(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if s.flash else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return _fwd_bwd(attn, [q, k, v])


def _layer_step(s: Settings, b: int, t: int) -> Callable[[], None]:
    """The full layer (training mode, fp32 weights, bf16 autocast on CUDA); x [B,T,D] needs its gradient too."""
    dev = torch.device(s.device)
    layer = AdaptiveRankSemiseparableLayer(**s.layer).to(dev)
    x = torch.randn(b, t, s.layer["d_model"], device=dev, generator=_gen(s, t + 2)).requires_grad_()
    with autocast_context(dev, "bf16"):
        grad = torch.randn_like(layer(x)[0])

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with autocast_context(dev, "bf16"):
            y, penalty, _ = layer(x)
        torch.autograd.backward((y, penalty), (grad, torch.ones_like(penalty)))

    return step


def _fla_step(s: Settings, fn: Callable, b: int, t: int) -> Callable[[], None]:
    """q, k [B,T,H,K=R] and v [B,T,H,V=P]: a K x V = R x P state per head, the size of ours."""
    g = _gen(s, t + 3)
    q, k = (torch.randn(b, t, s.heads, s.rank, device=s.device, dtype=s.dtype, generator=g) * s.rank**-0.5
            for _ in range(2))
    v = torch.randn(b, t, s.heads, s.head_dim, device=s.device, dtype=s.dtype, generator=g)
    return _fwd_bwd(fn, [z.requires_grad_() for z in (q, k, v)])


# ---------------------------------------------------------------- parts


def part_scan(s: Settings, res: dict, save: Callable[[], None]) -> None:
    rows = res.setdefault("scan", {})
    for t in s.lengths:
        b = s.tokens // t
        rows[f"T{t}"] = {"B": b, "T": t, "ours": _cell(s, partial(_scan_step, s, b, t)),
                         "sdpa": _cell(s, partial(_sdpa_step, s, b, t))}
        print("scan", rows[f"T{t}"], flush=True)
        save()


def part_layer(s: Settings, res: dict, save: Callable[[], None]) -> None:
    rows = res.setdefault("layer", {})
    for t in s.lengths:
        b = s.tokens // t
        row = {"B": b, "T": t, "fwd_bwd": _cell(s, partial(_layer_step, s, b, t))}
        if "ms" in row["fwd_bwd"]:
            row["tokens_per_s"] = b * t / (row["fwd_bwd"]["ms"] / 1e3)
        rows[f"T{t}"] = row
        print("layer", row, flush=True)
        save()


def _copy_gb_s(s: Settings) -> float:
    src = torch.empty(s.copy_bytes // 4, device=s.device)
    dst = torch.empty_like(src)
    return 2 * s.copy_bytes / _timer(s)(lambda: dst.copy_(src)) / 1e6  # read + write


def _bandwidth_row(s: Settings, make_fwd: Callable[[], Callable[[], object]], shape, moved: int, copy: float) -> dict:
    cell = _cell(s, make_fwd)
    row = {"shape": list(shape), "bytes_moved": moved, "pass": "forward", "fwd": cell}
    if "ms" in cell:
        row["gb_s"] = moved / cell["ms"] / 1e6
        row["fraction_of_copy"] = row["gb_s"] / copy
    return row


def _linrec_fwd(s: Settings) -> Callable[[], object]:
    g = _gen(s, 4)
    a = torch.rand(s.linrec_shape, device=s.device, generator=g) * 0.5 + 0.5
    b = torch.randn(s.linrec_shape, device=s.device, generator=g)
    return lambda: linear_recurrence(a, b)


def _bk_fwd(s: Settings) -> Callable[[], object]:
    v = torch.randn(s.bk_shape, device=s.device, generator=_gen(s, 5))
    z = torch.full((s.bk_shape[2],), complex(0.1, 0.5), device=s.device, dtype=torch.complex64)
    return lambda: bk_resolvent(v, z)


def part_bandwidth(s: Settings, res: dict, save: Callable[[], None]) -> None:
    copy = _copy_gb_s(s)
    res["bandwidth"] = {"copy_gb_s": copy, "copy_bytes": s.copy_bytes}
    n = math.prod(s.linrec_shape)
    res["bandwidth"]["linear_recurrence"] = _bandwidth_row(
        s, partial(_linrec_fwd, s), s.linrec_shape, 3 * n * 4, copy)  # read fp32 a and b, write h
    save()
    n = math.prod(s.bk_shape)
    res["bandwidth"]["bk_resolvent"] = _bandwidth_row(
        s, partial(_bk_fwd, s), s.bk_shape, n * (4 + 8), copy)  # read fp32 v, write complex64 G
    print("bandwidth", res["bandwidth"], flush=True)
    save()


def _fla_version() -> str:
    for dist in ("fla-core", "flash-linear-attention"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown (importable, no package metadata)"


def _host_diagnostics(s: Settings, makers: dict[str, Callable[[], Callable[[], object]]]) -> dict:
    """Whether paired rounds that disagree differ in host time or in device time: each side's host time
    per call and its device time replayed from a CUDA graph (one step each, built again; no target)."""
    steps = {name: make() for name, make in makers.items()}
    return {"host_ms": {name: _host_ms(s, step) for name, step in steps.items()},
            "graphed": {name: _graphed_cell(step) for name, step in steps.items()}}


def part_fla(s: Settings, res: dict, save: Callable[[], None]) -> None:
    if not s.run_fla:
        res["fla"] = {"skipped": "this run does not measure flash-linear-attention (--smoke)"}
        return
    fns, why = fla_competitors()
    if why:
        res["fla"] = {"error": why}
        return
    (fn,) = fns.values()
    res["fla"] = {"version": _fla_version(), "call": "chunk_linear_attn(q, k, v, scale=1.0, normalize=False)"}
    order = [*s.fla_target_lengths, *(t for t in s.lengths if t not in s.fla_target_lengths)]
    for t in order:
        b = s.tokens // t
        makers = {"ours": partial(_scan_step, s, b, t), "fla": partial(_fla_step, s, fn, b, t)}
        res["fla"][f"T{t}"] = {"B": b, "T": t, **_paired_cells(s, makers, s.fla_rounds)}
        save()
        if s.host_diagnostics:
            res["fla"][f"T{t}"].update(_host_diagnostics(s, makers))
            save()
        print("fla", res["fla"][f"T{t}"], flush=True)


# ---------------------------------------------------------------- derived numbers and targets


def _ms_of(cell: dict | None) -> float | None:
    return cell.get("ms") if cell else None


def _per_token(s: Settings, rows: dict, cell: str) -> dict:
    """ns per token of rows[T][cell] at each measured T and its relative change from the shortest T."""
    ns = {t: 1e6 * ms / s.tokens for t in s.lengths
          if (ms := _ms_of(rows.get(f"T{t}", {}).get(cell))) is not None}
    out = {"ns_per_token": {str(t): v for t, v in ns.items()}, "measured_all": len(ns) == len(s.lengths)}
    base = ns.get(s.lengths[0])
    if base is not None:
        out["change_from_shortest"] = {str(t): v / base - 1 for t, v in ns.items()}
        out["max_abs_change"] = max(abs(v / base - 1) for v in ns.values())
    return out


def _ratios(rows: dict, num: str, den: str) -> dict:
    """{"T<t>": time of cell num / time of cell den} for the rows where both were measured."""
    out = {}
    for key, row in rows.items():
        if key.startswith("T") and (a := _ms_of(row.get(num))) is not None and (b := _ms_of(row.get(den))) is not None:
            out[key] = a / b
    return out


def derive(s: Settings, res: dict) -> dict:
    """Ratios and per-token times from the cells measured so far (missing cells are left out)."""
    scan, layer = res.get("scan", {}), res.get("layer", {})
    return {"ours_over_sdpa": _ratios(scan, "ours", "sdpa"),
            "scan_per_token": _per_token(s, scan, "ours"),
            "sdpa_per_token": _per_token(s, scan, "sdpa"),
            "layer_per_token": _per_token(s, layer, "fwd_bwd"),
            "ours_over_fla": _ratios(res.get("fla", {}), "ours", "fla")}


def _target(text: str, value: float | None, met: Callable[[float], bool]) -> dict:
    return {"target": text, "value": value, "met": None if value is None else bool(met(value))}


def targets(s: Settings, res: dict, derived: dict) -> dict:
    """The issue's "done when" numbers; met is None where the number was not measured (or not fully)."""
    out = {f"scan_over_fla_T{t}": _target(f"ours / chunk_linear_attn fwd+bwd <= 1.0 at T {t}, state {s.rank}x"
                                          f"{s.head_dim}", derived["ours_over_fla"].get(f"T{t}"), lambda v: v <= 1.0)
           for t in s.fla_target_lengths}
    t = s.sdpa_target_length
    out[f"scan_over_sdpa_T{t}"] = _target(f"ours / SDPA causal fwd+bwd <= 0.25 at T {t}",
                                          derived["ours_over_sdpa"].get(f"T{t}"), lambda v: v <= 0.25)
    per_token = derived["scan_per_token"]
    out["scan_time_per_token_change"] = _target(
        f"ours' time per token within +-15% of T {s.lengths[0]}'s at every T up to {s.lengths[-1]}",
        per_token.get("max_abs_change") if per_token["measured_all"] else None, lambda v: v <= 0.15)
    band = res.get("bandwidth", {})
    for name, floor in (("linear_recurrence", 0.8), ("bk_resolvent", 0.5)):
        out[f"{name}_fraction_of_copy"] = _target(f"{name} forward >= {floor:.0%} of the copy bandwidth",
                                                  band.get(name, {}).get("fraction_of_copy"), lambda v, f=floor: v >= f)
    out["all_met"] = all(v["met"] is True for v in out.values())
    return out


# ---------------------------------------------------------------- run


def _header(s: Settings, smoke: bool) -> dict:
    gpu = torch.cuda.get_device_name() if s.device == "cuda" else f"none (CPU {platform.machine()})"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit(),
            "smoke": smoke, "settings": s.to_json(), "parts_done": [],
            "pass": "forward+backward unless a row says otherwise",
            "sdpa_backend": "flash (forced)" if s.flash else "default", "ours": "semiseparable_scan(impl=None)",
            "layer_setup": "eager, training mode, fp32 weights under bf16 autocast on CUDA (fp32 on the CPU)"}


def run(s: Settings, out: Path, parts: tuple[str, ...] = PARTS, *, smoke: bool = False) -> dict:
    """Measures `parts` (always in PARTS order, so FLA runs last) and writes the JSON to `out` after every cell.

    Returns the results dict as written: header, one key per part, "derived", "targets", "wall_s".
    """
    start = time.time()
    res = _header(s, smoke)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        for key in ("derived", "targets", "wall_s"):  # re-inserted: they stay last in the file
            res.pop(key, None)
        res["derived"] = derive(s, res)
        res["targets"] = targets(s, res, res["derived"])
        res["wall_s"] = time.time() - start
        out.write_text(json.dumps(res, indent=1) + "\n")

    runners = {"scan": part_scan, "layer": part_layer, "bandwidth": part_bandwidth, "fla": part_fla}
    for name in PARTS:
        if name in parts:
            runners[name](s, res, save)
            res["parts_done"].append(name)
            save()
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON path (default {DEFAULT_OUT})")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU in seconds (CI); no FLA")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--decay", choices=("layer_init", "fast"), default="layer_init",
                    help="the scan's log-decays (see _log_decays; default layer_init)")
    ap.add_argument("--host-diagnostics", action="store_true",
                    help="after each FLA pair, host time per call and CUDA-graphed time of both sides")
    args = ap.parse_args(argv)
    parts = tuple(args.parts.split(","))
    if unknown := [p for p in parts if p not in PARTS]:
        ap.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("the full benchmark needs a CUDA GPU (issue 4 measures on one H100); use --smoke on the CPU")
    settings = replace(SMOKE if args.smoke else FULL, decay=args.decay, host_diagnostics=args.host_diagnostics)
    res = run(settings, args.out, parts, smoke=args.smoke)
    print(json.dumps(res["targets"], indent=1), f"\nwall {res['wall_s']:.0f} s -> {args.out}", flush=True)
    return res


if __name__ == "__main__":
    main()

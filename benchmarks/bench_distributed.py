"""DDP vs FSDP2 on 1 and 2 GPUs: throughput, memory, the largest model per GPU, 1- vs 2-GPU loss
curves and resuming a 2-GPU checkpoint on 1 GPU (and briefly on the CPU).

One command on a 2-GPU machine, about 8 minutes on 2 H100s (`--fit-budget-s` / `--steps` trade time):

    PYTHONPATH=src python benchmarks/bench_distributed.py --out benchmarks/results

writes `OUT/distributed.json` and `OUT/distributed_loss.png`. The driver (this process, no GPU
work) starts `torchrun --nproc_per_node {1,2}` workers (this file with `--worker JOB`):

- throughput: the 8gb and 24gb presets' models with their own micro-batch per GPU and their own
  grad_accum (8 for both: how users run them; DDP and FSDP2 then reduce gradients once per 8
  micro-batches), synthetic tokens, through the real `Trainer.train_step` (monitor, clipping,
  fused AdamW): tokens/s over all GPUs, peak memory per GPU (`max_memory_reserved` + the CUDA
  context, as DESIGN.md counts it), model-state bytes resident on each rank between steps
  (parameters + gradients + AdamW state; DTensor shards counted by their local size), and the
  bytes allocated between two micro-batches of a step (`allocated_mid_step_gib_per_gpu`: under
  FSDP2 that includes the unsharded gradients accumulated before the step's one reduce-scatter);
- fit: on 2 GPUs, the most layers of the 24gb preset's width that train (2 steps, activation
  checkpointing on, micro-batch 1, grad_accum 1) with DDP and with FSDP2 under a per-GPU memory cap
  (`--fit-gib`, default 24: a 24 GB card; at 80 GB each try builds billions of weights on the CPU
  and the search outruns its budget): from the size whose measured model state fills 80% of the cap,
  growing by 1.25 while it fits, then bisection, within `--fit-budget-s` per mode, timed and decided
  by rank 0 alone (`first_failing_layers: null` means the budget ran out first: `max_layers_fit` is
  then a lower bound);
- loss curve: `muse train --preset 8gb` for `--curve-steps` steps (grad_accum 1, to keep it
  short) on 1 GPU (micro-batch 8) and on 2 GPUs with FSDP2 (micro-batch 4 each: the same global
  batch), then the 2-GPU run resumed on 1 GPU from its middle checkpoint (same global batch: the
  curves should overlap), and one step of it on the CPU (micro-batch 1, seq_len 256: it shows the
  checkpoint loads and trains).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from muse_lm.provenance import git_commit  # noqa: E402

PRESETS = ("8gb", "24gb")
# The fit search trains micro-batch 1 without accumulation: FSDP2 then never holds unsharded
# gradients (with grad_accum > 1 it does between micro-batches: see muse_lm/training/fsdp.py).
FIT_GRAD_ACCUM = 1
CURVE_GRAD_ACCUM = 1  # the loss curves: short runs that still compare 1 and 2 GPUs on one global batch


# ---- worker side (runs under torchrun) ---------------------------------------------------------
def _context_bytes() -> int:
    """CUDA context + allocator overhead: device memory in use beyond what torch reserved."""
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def _state_bytes(trainer) -> dict:
    """Bytes of parameters, gradients and optimizer state resident on this rank, from one extra
    step of two micro-batches run as the trainer runs them (then cleared): `allocated_mid_step`
    is everything allocated after the first backward (activations are freed by then; gradients
    kept for accumulation are not), the others are counted after the second, synced backward."""
    from muse_lm.training.evaluate import autocast_context
    from muse_lm.training.fsdp import local

    def nbytes(t):
        t = local(t)
        return t.numel() * t.element_size()

    def backward(index: int) -> None:
        x, y = trainer.batches.batch(index)
        with autocast_context(trainer.device, trainer.cfg.dtype):
            loss = trainer.engine(x.to(trainer.device), y.to(trainer.device))
        loss.backward()

    trainer.clear_grads()  # as between training steps: DDP's gradients stay views into its buckets
    with trainer._grad_sync(last_micro=False):  # no gradient reduction before a step's last micro-batch
        backward(0)
    torch.cuda.synchronize()
    mid_step = torch.cuda.memory_allocated()
    backward(1)
    params = sum(nbytes(p) for p in trainer.model.parameters())
    grads = sum(nbytes(p.grad) for p in trainer.model.parameters() if p.grad is not None)
    trainer.clear_grads()
    optim = sum(nbytes(v) for s in trainer.optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return {"params": params, "grads": grads, "optimizer": optim, "total": params + grads + optim,
            "allocated_mid_step": mid_step}


def _trainer(preset: str, parallel: str, info, run_dir: str, model_over: dict, train_over: dict,
             device: torch.device | None = None):
    from muse_lm.models import MuseLM
    from muse_lm.presets import get_preset
    from muse_lm.training.trainer import Trainer

    p = get_preset(preset)
    model_cfg = dataclasses.replace(p.model, **model_over)
    cfg = dataclasses.replace(p.train, steps=1000, warmup_steps=10, **train_over)  # the preset's grad_accum
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_cfg.vocab_size, size=cfg.seq_len * cfg.micro_batch * info.world_size * 64 + 1)
    torch.manual_seed(0)
    model = MuseLM(model_cfg)
    device = device or torch.device("cuda", info.local_rank)
    return Trainer(model, cfg, train_tokens=tokens, heldout_tokens=tokens[: cfg.seq_len * 4 + 1], run_dir=run_dir,
                   tokenizer_json="{}", run_config={}, device=device, dist_info=info, progress=False,
                   parallel=parallel)


def _compile_over(preset: str, compile_blocks: bool) -> dict:
    """TrainConfig overrides for `--compile`: compiled blocks where the preset allows them (not with
    activation checkpointing, see TrainConfig.compile)."""
    from muse_lm.presets import get_preset

    return {"compile": True} if compile_blocks and not get_preset(preset).train.activation_checkpointing else {}


def _throughput(preset: str, parallel: str, info, steps: int, warmup: int, compile_blocks: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = _trainer(preset, parallel, info, run_dir, {}, _compile_over(preset, compile_blocks))
        torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            trainer.train_step()
        torch.cuda.synchronize()
        times = []  # per step (a sync after each: ~1 s steps, so it costs nothing): shows the spread
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        seconds = sum(times)
        peak = torch.cuda.max_memory_reserved() + _context_bytes()
        state = _state_bytes(trainer)
        result = {"preset": preset, "parallel": parallel, "gpus": info.world_size, "steps": steps,
                  "tokens_per_s": steps * trainer.tokens_per_step / seconds, "step_s": seconds / steps,
                  "peak_gib_per_gpu": peak / 2**30, "model_state_gib_per_gpu": state["total"] / 2**30,
                  "allocated_mid_step_gib_per_gpu": state["allocated_mid_step"] / 2**30,
                  "model_state_bytes": state, "params": trainer.model.num_parameters(),
                  "micro_batch_per_gpu": trainer.cfg.micro_batch, "grad_accum": trainer.cfg.grad_accum,
                  "tokens_per_step": trainer.tokens_per_step, "seq_len": trainer.cfg.seq_len,
                  "compiled_blocks": trainer.cfg.compile,
                  "step_times_s": times}
        if info.world_size > 1:
            result["allreduce_grads_s"] = _allreduce_seconds(state["grads"] // 4, info)
        del trainer
    _free()
    return result


def _allreduce_seconds(numel: int, info, repeats: int = 5) -> float:
    """Median seconds of one NCCL all-reduce of `numel` fp32 values (this rank's gradient bytes under
    DDP): what a step's gradient reduction costs at best, to compare with the measured step overhead."""
    buf = torch.ones(numel, device=torch.device("cuda", info.local_rank))
    torch.distributed.all_reduce(buf)  # warm-up (NCCL connects lazily)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.distributed.all_reduce(buf)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del buf
    return float(np.median(times))


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _fits(parallel: str, layers: int, info) -> bool:
    """Whether `layers` blocks of the 24gb width train for 2 steps on every rank."""
    import torch.distributed as dist

    ok = torch.ones((), device="cuda")
    trainer = None
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = _trainer("24gb", parallel, info, run_dir, {"n_layers": layers},
                               {"micro_batch": 1, "grad_accum": FIT_GRAD_ACCUM, "activation_checkpointing": True})
            for _ in range(2):
                trainer.train_step()
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        ok.zero_()
    del trainer
    _free()
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _next_layers(layers: int, lo: int, hi: int | None, elapsed_s: float, budget_s: float,
                 grow: float = 2.0) -> int | None:
    """The next size to try after `layers` (lo: largest that fit so far, hi: smallest that did
    not), or None to stop: the budget is spent, or the bracket is within 1/8 of lo."""
    if elapsed_s >= budget_s:
        return None
    if hi is None:
        return max(layers + 1, int(layers * grow))
    if lo == 0:  # nothing fit yet: step down by the growth factor, keeping the head start of a good guess
        smaller = min(layers - 1, int(layers / grow))
        return smaller if smaller >= 1 else None
    if hi - lo <= max(4, lo // 8):
        return None
    return (lo + hi) // 2


def _layer_params(n_layers: int) -> int:
    """Parameters of the 24gb preset's model with `n_layers` blocks, counted on the meta device."""
    from muse_lm.models import MuseLM
    from muse_lm.presets import get_preset

    cfg = dataclasses.replace(get_preset("24gb").model, n_layers=n_layers)
    with torch.device("meta"):  # counted without building (and initializing) billions of weights
        return sum(p.numel() for p in MuseLM(cfg).parameters())


def first_guess_layers(state_bytes_per_param: float, cap_bytes: float, fixed: int, per_layer: int,
                       margin: float = 0.8) -> int:
    """Where the fit search starts: the layers whose model state (measured bytes per parameter of
    this parallel mode, from its throughput row) fills `margin` of the memory cap; the rest is left
    for activations (micro-batch 1, checkpointed), the allocator and NCCL. At least 1."""
    params = margin * cap_bytes / state_bytes_per_param
    return max(1, int((params - fixed) // per_layer))


def _fit_search(parallel: str, info, budget_s: float, start_layers: int = 96, grow: float = 2.0) -> dict:
    """Collective: every rank runs the same tries. Whether to go on, and with what size, is
    decided by rank 0 alone (its clock, its bookkeeping) and broadcast: ranks timing the budget
    on their own clocks could disagree about one more try and wait in different collectives.
    start_layers: the first try (96 is ~1.2B parameters at the 24gb width; `first_guess_layers`
    starts near the answer); grow: the factor while every try has fit."""
    from muse_lm.training.distributed import broadcast_object

    start, lo, hi, tried = time.perf_counter(), 0, None, []
    layers: int | None = start_layers
    while layers is not None:
        fits = _fits(parallel, layers, info)  # the same on every rank (a MIN all-reduce)
        tried.append({"n_layers": layers, "fits": fits})
        if fits:
            lo = layers
        else:
            hi = layers
        nxt = _next_layers(layers, lo, hi, time.perf_counter() - start, budget_s, grow) if info.is_main else None
        layers = broadcast_object(nxt, info)
    from muse_lm.presets import get_preset

    params = _layer_params(lo) if lo else 0
    return {"parallel": parallel, "gpus": info.world_size, "d_model": get_preset("24gb").model.d_model,
            "micro_batch_per_gpu": 1,
            "grad_accum": FIT_GRAD_ACCUM, "max_layers_fit": lo,
            "first_failing_layers": hi, "params_at_max": params, "tried": tried,
            "budget_s": budget_s, "searched_s": time.perf_counter() - start}


def _fit_all(modes: list[str], info, job: dict, rows: list[dict], save) -> list[dict]:
    """The fit search of each mode under a per-process memory cap of `fit_gib` (a 24 GB card by default:
    the cards this project is for, and tries small enough to build in seconds; 0 = the whole GPU).
    The cap bounds PyTorch's caching allocator; the CUDA context and NCCL's buffers come on top.
    `save(fits)` is called after each mode (rank 0 rewrites its results file)."""
    from muse_lm.training.distributed import broadcast_object

    total = torch.cuda.get_device_properties(info.local_rank).total_memory
    cap = job.get("fit_gib", 0) * 2**30 or total
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), info.local_rank)
    one, two = _layer_params(1), _layer_params(2)
    per_layer, fixed = two - one, 2 * one - two
    out = []
    for mode in modes:
        row = next((r for r in rows if r["preset"] == "24gb" and r["parallel"] == mode), None)
        start = 96
        if row is not None:
            per_param = row["model_state_bytes"]["total"] / row["params"]
            start = first_guess_layers(per_param, cap, fixed, per_layer)
        # Rank 0's guess for all: FSDP2 shards differ by a row between ranks, and so could the rounding.
        start = broadcast_object(start, info)
        result = _fit_search(mode, info, job["fit_budget_s"], start_layers=start, grow=1.25)
        out.append({**result, "memory_cap_gib": cap / 2**30, "start_layers": start})
        save(out)
    torch.cuda.set_per_process_memory_fraction(1.0, info.local_rank)
    return out


def worker(job: dict) -> None:
    from muse_lm.training import distributed

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    info = distributed.setup(device, single_rank_group=True)
    results = {"throughput": [], "fit": []}
    modes = ["none"] if info.world_size == 1 else ["ddp", "fsdp"]
    for preset in job["presets"]:
        for mode in modes:
            results["throughput"].append(_throughput(preset, mode, info, job["steps"], job["warmup"],
                                                     job.get("compile", False)))
    def save(fits: list[dict] | None = None) -> None:
        if fits is not None:
            results["fit"] = fits
        if info.is_main:
            Path(job["out"]).write_text(json.dumps(results))

    save()  # the throughput rows are kept even if a fit try hangs and the driver kills the worker
    if job.get("fit_budget_s") and info.world_size > 1:
        _fit_all(modes, info, job, results["throughput"], save)
    save()
    distributed.barrier(info)
    gc.collect()  # the trainers' meshes hold the process group: free them before teardown
    distributed.teardown()


# ---- driver side -------------------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
            "127.0.0.1", "--master_port", str(_port())]


def threads_per_process() -> int:
    """CPU threads each worker gets: the cores split over the GPUs, for the 1- and 2-GPU runs alike.
    torchrun would otherwise set OMP_NUM_THREADS=1 for its workers while a plain 1-GPU process keeps
    every core; one thread measured a 24gb step 15% slower on an H100 (1.63 vs 1.42 s), which
    would count against the 2-GPU run. An OMP_NUM_THREADS set by the caller is kept."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 2) // max(1, torch.cuda.device_count()))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads_per_process()),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}


def _call(cmd: list[str], timeout: float, extra_env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env={**_env(), **(extra_env or {})}, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    out = {"ok": proc.returncode == 0, "wall_s": time.perf_counter() - t0}
    if proc.returncode:
        out["error"] = proc.stderr[-3000:]
    if extra_env and "NCCL_DEBUG" in extra_env:
        log = proc.stdout + proc.stderr
        out["nccl_transport"] = [ln.strip()[-200:] for ln in log.splitlines()
                                 if " via " in ln or "NVLS" in ln or "P2P" in ln][:12]
    return out


def _run_workers(nproc: int, job: dict, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        job = {**job, "out": f.name}
    cmd = [*_torchrun(nproc), __file__, "--worker", json.dumps(job)]
    # NCCL's INIT log says which transport links the GPUs (P2P/NVLink, SHM, NET): kept with the results.
    status = _call(cmd, timeout, extra_env={"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT"} if nproc > 1 else None)
    # Rank 0 rewrites its results after every part, so a worker that failed or timed out later (a fit
    # try that hung) still hands back what it measured.
    out = Path(job["out"])
    if out.exists() and out.stat().st_size:
        status.update(json.loads(out.read_text()))
    return status


def _train_cmd(nproc: int, out: Path, *args: str) -> list[str]:
    launcher = _torchrun(nproc) if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "muse_lm", "train", "--out", str(out), "--no-progress", *args]


def _losses(run_dir: Path) -> dict[int, float]:
    from muse_lm.training.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def _loss_curves(work: Path, steps: int, timeout: float) -> dict:
    mid = steps // 2
    common = ["--preset", "8gb", "--steps", str(steps), "--set", f"grad_accum={CURVE_GRAD_ACCUM}",
              "--set", "log_every=1", "--set", f"checkpoint_every={mid}", "--set", f"eval_every={mid}",
              "--set", "eval_batches=2", "--set", "warmup_steps=10"]
    one, two, resumed, cpu = (work / n for n in ("gpu1", "gpu2", "gpu2_resumed_on_1", "gpu2_resumed_on_cpu"))
    out = {"steps": steps, "global_batch_rows": 8, "grad_accum": CURVE_GRAD_ACCUM}
    out["one_gpu"] = _call(_train_cmd(1, one, *common, "--set", "micro_batch=8"), timeout)
    out["two_gpus_fsdp"] = _call(_train_cmd(2, two, *common, "--set", "micro_batch=4", "--parallel", "fsdp"),
                                 timeout)
    # The noise floor: the same global batch on 1 GPU as 2 micro-batches of 4 (the 2-GPU split, without
    # a second GPU). Its gap to the 1-GPU curve is bf16 rounding order alone, the yardstick for the 2-GPU gap.
    floor = work / "gpu1_accum2"
    out["one_gpu_accum2"] = _call(_train_cmd(1, floor, *common, "--set", "micro_batch=4", "--set", "grad_accum=2"),
                                  timeout)
    if not (out["one_gpu"]["ok"] and out["two_gpus_fsdp"]["ok"]):
        return out
    a, b = _losses(one), _losses(two)
    out["loss_one_gpu"], out["loss_two_gpus"] = a, b
    shared = sorted(set(a) & set(b))
    out["max_abs_loss_diff"] = max(abs(a[s] - b[s]) for s in shared)
    out["mean_abs_loss_diff"] = sum(abs(a[s] - b[s]) for s in shared) / len(shared)
    if out["one_gpu_accum2"]["ok"]:
        c = out["loss_one_gpu_accum2"] = _losses(floor)
        both = sorted(set(a) & set(c))
        out["noise_floor_max_abs_loss_diff"] = max(abs(a[s] - c[s]) for s in both)
        out["noise_floor_mean_abs_loss_diff"] = sum(abs(a[s] - c[s]) for s in both) / len(both)
    # On the CPU: one step with a short batch (it shows the checkpoint loads and trains there).
    cpu_extra = ["--stop-at", str(mid + 1), "--set", "seq_len=256", "--set", "eval_batches=1"]
    for target, device, extra in ((resumed, "cuda", []), (cpu, "cpu", cpu_extra)):
        shutil.copytree(two, target)
        for path in target.glob("step-*"):
            if int(path.name.split("-")[1]) > mid:
                shutil.rmtree(path)
        (target / "latest").write_text(f"step-{mid:07d}\n")
        micro = "8" if device == "cuda" else "1"
        key = "resume_on_one_gpu" if device == "cuda" else "resume_on_cpu"
        out[key] = _call(_train_cmd(1, target, "--resume", "--device", device, "--set", f"micro_batch={micro}",
                                    *extra), timeout)
        if out[key]["ok"]:
            c = _losses(target)
            out[key]["losses_after_resume"] = {s: c[s] for s in sorted(c) if s > mid}
            if device == "cuda":
                out[key]["max_abs_diff_vs_two_gpus"] = max(abs(c[s] - b[s]) for s in c if s > mid and s in b)
    return out


def _plot(curves: dict, path: Path) -> None:
    """The 1- vs 2-GPU loss curves; nothing is drawn when neither run produced a curve (an empty
    chart would look like a result)."""
    if not (curves.get("loss_one_gpu") or curves.get("loss_two_gpus")):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss_one_gpu", "1 GPU, micro-batch 8"), ("loss_two_gpus", "2 GPUs FSDP2, 4 + 4"),
                       ("loss_one_gpu_accum2", "1 GPU, 2 x micro-batch 4 (noise floor)")):
        data = curves.get(key) or {}
        ax.plot(list(map(int, data)), list(data.values()), label=label)
    resumed = (curves.get("resume_on_one_gpu") or {}).get("losses_after_resume") or {}
    if resumed:
        ax.plot(list(map(int, resumed)), list(resumed.values()), "--", label="2-GPU checkpoint resumed on 1 GPU")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("8gb preset: same global batch on 1 and 2 GPUs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _environment() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpus else None,
            "python": sys.version.split()[0], "commit": git_commit(), "omp_threads_per_process": threads_per_process(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _summary(tp: list[dict]) -> dict:
    by = {(r["preset"], r["parallel"], r["gpus"]): r for r in tp}
    out = {}
    for preset in PRESETS:
        one = by.get((preset, "none", 1))
        ddp, fsdp = by.get((preset, "ddp", 2)), by.get((preset, "fsdp", 2))
        if not (one and ddp and fsdp):
            continue
        best = max(ddp["tokens_per_s"], fsdp["tokens_per_s"])
        out[preset] = {"grad_accum": one["grad_accum"], "speedup_2gpu_best": best / one["tokens_per_s"],
                       "fsdp_over_ddp_model_state": fsdp["model_state_gib_per_gpu"] / ddp["model_state_gib_per_gpu"],
                       "fsdp_over_ddp_allocated_mid_step": (fsdp["allocated_mid_step_gib_per_gpu"]
                                                            / ddp["allocated_mid_step_gib_per_gpu"]),
                       "peak_gib_per_gpu": {"1gpu": one["peak_gib_per_gpu"], "ddp": ddp["peak_gib_per_gpu"],
                                            "fsdp": fsdp["peak_gib_per_gpu"]},
                       "estimated_max_params_per_80gib_gpu": {m: _max_params_estimate(r) for m, r in
                                                               (("ddp", ddp), ("fsdp", fsdp))}}
    return out


def _max_params_estimate(row: dict, gpu_gib: float = 80.0) -> int:
    """Parameters that would fit one 80 GiB GPU at this preset's width and micro-batch: what the
    measured peak holds besides model state (activations, buffers, context) is kept fixed and the
    rest is filled at the measured model-state bytes per parameter. An estimate from one measured
    size (the fit search, `--fit-budget-s`, measures it, at much more device time)."""
    per_param = row["model_state_bytes"]["total"] / row["params"]
    other = (row["peak_gib_per_gpu"] - row["model_state_gib_per_gpu"]) * 2**30
    return int((gpu_gib * 2**30 - other) / per_param)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="directory for distributed.json + png")
    # A 24gb step with grad_accum 8 takes ~0.85 s on one H100 (8gb: ~1.2 s): 5 timed steps are 40
    # micro-batches per configuration and keep the whole script near 8 minutes.
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (autotuning, allocator)")
    parser.add_argument("--fit-budget-s", type=float, default=60.0, help="seconds of layer search per mode")
    parser.add_argument("--curve-steps", type=int, default=40, help="loss-curve steps; 0 skips the curves")
    parser.add_argument("--compile", action="store_true",
                        help="throughput with TrainConfig.compile (presets without activation checkpointing); "
                             "the first warm-up steps then include compilation")
    parser.add_argument("--fit-gib", type=float, default=24.0,
                        help="memory cap per GPU of the fit search in GiB (a 24 GB card; 0 = the whole GPU)")
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help=f"comma list of the presets to time (default {','.join(PRESETS)})")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker))
        return
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"bench_distributed needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    presets = [p for p in args.presets.split(",") if p]
    if not presets or set(presets) - set(PRESETS):
        parser.error(f"--presets takes a comma list of {', '.join(PRESETS)}, got {args.presets!r}")
    job = {"presets": presets, "steps": args.steps, "warmup": args.warmup, "compile": args.compile}
    t0 = time.perf_counter()
    worker_s = 420 if args.compile else 180
    single = _run_workers(1, job, timeout=worker_s)
    (out_dir / "distributed.json").write_text(json.dumps(  # kept if the 2-GPU run is stopped
        {"environment": _environment(), "throughput": single.get("throughput", []),
         "loss_curves": "not run yet (the run stopped before them)"}, indent=2) + "\n")
    pair = _run_workers(2, {**job, "fit_budget_s": args.fit_budget_s, "fit_gib": args.fit_gib},
                        timeout=worker_s + 2 * args.fit_budget_s + 60)
    throughput = single.get("throughput", []) + pair.get("throughput", [])
    partial = {"environment": _environment(), "throughput": throughput, "summary": _summary(throughput),
               "fit": pair.get("fit", []), "loss_curves": "not run yet (the run stopped before them)"}
    (out_dir / "distributed.json").write_text(json.dumps(partial, indent=2) + "\n")  # kept if stopped later
    print(json.dumps(partial["summary"]), flush=True)
    curves = "skipped (--curve-steps 0)"
    if args.curve_steps > 0:
        with tempfile.TemporaryDirectory() as work:
            curves = _loss_curves(Path(work), args.curve_steps, timeout=240)
    result = {"environment": _environment(), "throughput": throughput, "summary": _summary(throughput),
              "fit": pair.get("fit", []), "loss_curves": curves,
              "workers": {"1gpu": {k: single[k] for k in ("ok", "wall_s", "error") if k in single},
                          "2gpu": {k: pair[k] for k in ("ok", "wall_s", "error", "nccl_transport") if k in pair}},
              "total_s": time.perf_counter() - t0,
              "command": "PYTHONPATH=src python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:])}
    (out_dir / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    if isinstance(curves, dict):
        _plot(curves, out_dir / "distributed_loss.png")
    print(json.dumps({"summary": result["summary"], "fit": [{k: f[k] for k in ("parallel", "max_layers_fit")}
                                                            for f in result["fit"]],
                      "total_s": result["total_s"]}))


if __name__ == "__main__":
    main()

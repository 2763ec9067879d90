"""Per-thread local memory (ptxas stack frame, spills) of every Triton kernel one eager decode step launches.

Why: a kernel launched with an S-byte per-thread stack frame makes the driver grow the context's
local-memory reservation to about S x (SMs x max resident threads per SM) bytes, and it stays. On an
H100 (132 SMs x 2048 threads = 270,336 threads) 20 KB a thread is ~5.2 GiB outside PyTorch's allocator,
which is what `probe_inference_memory.py` saw after the first eager decode of the inference preset.

How, with no GPU:
1. Build the preset's model on the CPU (FFN linears converted to LNS codes, as the probe and
   `muse generate` do), prefill a short prompt with the torch reference ops, then run ONE eager decode
   step (`trunk(next_id, states)` + `head_logits`, as `GenerationMixin._eager_stepper` does) with every
   op's impl=None dispatch forced to its Triton launcher and `JITFunction.run` / `Autotuner.run`
   replaced by recorders: the real launchers run (their block sizes, flags, grids), no kernel does.
   generate() runs the model's fp32 weights without autocast, so the step is fp32 (`--autocast bf16`
   shows the bf16 alternative).
2. Compile each distinct launch (an autotuned one: every declared config) for GPUTarget("cuda", 90, 64)
   with the specialization Triton's launcher would compute from the same arguments (M = 1 becomes a
   constexpr, 16-divisible sizes and pointers get tt.divisibility), as tests/ops/test_lns_triton.py
   compiles "for real GPU targets (no GPU needed)".
3. Read the cubin's REG / STACK with cuobjdump, and the spill bytes from ptxas -v re-run on the PTX with
   Triton's own flags (the two stack sizes must agree).

Usage: PYTHONPATH=src python benchmarks/ptxas_decode_kernels.py [--preset inference] [--autocast none|bf16]
       [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

import muse_lm.ops
from muse_lm import MuseLM, get_preset
from muse_lm.layers import convert_to_lns
from muse_lm.ops import _dispatch
from muse_lm.ops.lns_linear.triton import LNSLinearConfig, _lns_mm_kernel
from muse_lm.provenance import git_commit

GIB = 2**30
TARGET = GPUTarget("cuda", 90, 64)
H100_SMS = 132
THREADS_PER_SM = 2048  # max resident threads per SM on sm_90
H100_MAX_SHARED = 232448  # bytes of shared memory per block on an H100 (what the lns autotuner prunes against)

# ---- step 1: record the launches of one eager decode step -----------------------------------------
@dataclass
class Launch:
    """One kernel launch as the launcher made it: the JITFunction, its arguments (CPU tensors with the
    decode step's shapes and dtypes), and the autotuner in front of it (None for a direct launch)."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    tuner: Autotuner | None = None


@contextlib.contextmanager
def _triton_dispatch_on_cpu() -> Iterator[None]:
    """impl=None picks the Triton launcher for CPU tensors too (resolve_impl picks the torch reference
    there), so the CPU step walks the code path a CUDA step walks. Every module that imported
    `resolve_impl` by name is patched, and restored afterwards."""
    for info in pkgutil.walk_packages(muse_lm.ops.__path__, "muse_lm.ops."):
        importlib.import_module(info.name)  # the lazily imported launcher modules bind resolve_impl too
    original = _dispatch.resolve_impl

    def forced(op, impl, *tensors, has_triton_kernel):
        if impl is None and has_triton_kernel:
            return "triton"
        return original(op, impl, *tensors, has_triton_kernel=has_triton_kernel)

    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("muse_lm") and getattr(m, "resolve_impl", None) is original]
    for module in modules:
        module.resolve_impl = forced
    try:
        yield
    finally:
        for module in modules:
            module.resolve_impl = original


@contextlib.contextmanager
def _recording(launches: list[Launch]) -> Iterator[None]:
    """Kernel launches append to `launches` instead of compiling or running anything (the outputs the
    launchers allocated stay uninitialised: only shapes and dtypes flow on)."""
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    def record_tuned(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        launches.append(Launch(self.fn, args, kwargs, self))

    JITFunction.run, Autotuner.run = record_jit, record_tuned
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run


def record_decode_step(preset_name: str, autocast: str) -> list[Launch]:
    """The kernel launches of one eager decode step of `preset_name` (batch 1, T = 1), fp32 weights
    with FFN linears as LNS codes; autocast "bf16" runs the step under CPU autocast instead."""
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    model = MuseLM(preset.model)
    if preset.train.lns:
        convert_to_lns(model, "ffn")
    model.eval()
    prompt = torch.randint(0, preset.model.vocab_size, (1, 8))
    launches: list[Launch] = []
    with torch.no_grad():
        _, _, states = model.trunk(prompt, return_state=True)  # torch reference ops: nothing recorded
        nxt = torch.randint(0, preset.model.vocab_size, (1,))
        amp = torch.autocast("cpu", torch.bfloat16) if autocast == "bf16" else contextlib.nullcontext()
        with _triton_dispatch_on_cpu(), _recording(launches), amp:
            h, _, _ = model.trunk(nxt[:, None], states)
            model.head_logits(h[:, 0])
    return launches


# ---- step 2: the specializations and configs to compile --------------------------------------------
@dataclass
class Variant:
    """One binary to compile: a kernel, its specialization and launch options, the launches using it."""

    fn: JITFunction
    label: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    role: str  # "launched" | "pruned on H100" | "candidate"
    calls: list[str] = field(default_factory=list)


def _spec_of(fn: JITFunction, backend, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) exactly as `JITFunction.run` derives them (Triton 3.6)."""
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _lns_fits_h100(cfg: triton.Config, elem_bytes: int) -> bool:
    """lns_linear.triton._prune_configs at an H100's shared memory (it asks the driver, which is absent here)."""
    k = cfg.kwargs
    need = LNSLinearConfig(k["BM"], k["BN"], k["BK"], cfg.num_warps, cfg.num_stages).smem_bytes(elem_bytes)
    return need <= H100_MAX_SHARED


def _configs_of(launch: Launch) -> list[tuple[dict, str]]:
    """(launch kwargs, role) per binary the launch may run: the direct launch's own, or every declared
    autotune config (those the H100 prune drops marked)."""
    if launch.tuner is None:
        return [(launch.kwargs, "launched")]
    if launch.fn is not _lns_mm_kernel:
        raise ValueError(f"{launch.fn.__name__}: an autotuned kernel this script cannot prune offline; add its "
                         "H100 prune next to _lns_fits_h100")
    elem = launch.args[0].element_size()  # a_ptr
    out = [({**launch.kwargs, **cfg.all_kwargs()}, "launched" if _lns_fits_h100(cfg, elem) else "pruned on H100")
           for cfg in launch.tuner.configs]
    return out


def _call_label(launch: Launch) -> str:
    shapes = ", ".join("x".join(map(str, a.shape)) + f" {str(a.dtype).removeprefix('torch.')}"
                       for a in launch.args if isinstance(a, torch.Tensor))
    return f"{launch.fn.__name__}({shapes})"


def _config_label(fn: JITFunction, constexprs: dict, options) -> str:
    names = [p.name for p in fn.params]
    consts = " ".join(f"{names[path[0]]}={value}" for path, value in constexprs.items())
    return f"{consts} warps={options.num_warps} stages={options.num_stages}"


def variants_of(launches: list[Launch]) -> list[Variant]:
    """Distinct binaries over all launches (two launches with the same specialization share one)."""
    backend = make_backend(TARGET)
    found: dict[str, Variant] = {}
    for launch in launches:
        for kwargs, role in _configs_of(launch):
            signature, constexprs, attrs, options = _spec_of(launch.fn, backend, launch.args, kwargs)
            key = repr((launch.fn.__name__, signature, constexprs, attrs, options.hash()))
            if key not in found:
                label = _config_label(launch.fn, constexprs, options)
                found[key] = Variant(launch.fn, label, signature, constexprs, attrs, options, role)
            found[key].calls.append(_call_label(launch))
    return list(found.values())


# ---- step 3: compile and read ptxas's resource usage -----------------------------------------------
def _ptxas_log(ptx: str, options) -> str:
    """ptxas -v on `ptx` with the flags Triton's make_cubin uses (line info, fmad, extra options)."""
    flags = ["-lineinfo", *([] if options.enable_fp_fusion else ["--fmad=false"]), "-v",
             *(options.ptx_options.split(" ") if options.ptx_options else [])]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(TARGET.arch).path, *flags, f"--gpu-name={sm_arch_from_capability(TARGET.arch)}",
               str(src), "-o", str(src.with_suffix(".cubin"))]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


def _cubin_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the cubin Triton produced (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def _spills(log: str) -> dict[str, int]:
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m is None:
        raise RuntimeError(f"no 'bytes stack frame' line in the ptxas log:\n{log}")
    return {"ptxas_stack": int(m[1]), "spill_stores": int(m[2]), "spill_loads": int(m[3])}


def compile_variant(v: Variant, threads: int) -> dict:
    """One table row: resources of `v` compiled for sm_90, and stack x `threads` in GiB."""
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(v.fn, v.signature, v.constexprs, v.attrs), target=TARGET,
                            options=v.options.__dict__)
    compile_s = time.perf_counter() - t0
    usage = _cubin_usage(kernel.asm["cubin"])
    spills = _spills(_ptxas_log(kernel.asm["ptx"], v.options))
    if spills["ptxas_stack"] != usage["stack"]:
        raise RuntimeError(f"{v.fn.__name__} {v.label}: ptxas re-run gives a {spills['ptxas_stack']} B frame but "
                           f"Triton's cubin {usage['stack']} B: the flags in _ptxas_log no longer match Triton's")
    return {"kernel": v.fn.__name__, "config": v.label, "role": v.role, "num_warps": v.options.num_warps,
            "registers": usage["reg"], "stack_bytes": usage["stack"], "spill_stores": spills["spill_stores"],
            "spill_loads": spills["spill_loads"], "shared_bytes": kernel.metadata.shared,
            "local_gib": usage["stack"] * threads / GIB, "launches_per_step": len(v.calls),
            "calls": sorted(set(v.calls)), "signature": v.signature, "compile_s": round(compile_s, 2)}


# ---- report ---------------------------------------------------------------------------------------
def print_table(rows: list[dict], threads: int) -> None:
    head = f"{'kernel':<16} {'role':<14} {'warps':>5} {'regs':>4} {'stack B':>7} {'spill st/ld B':>15} " \
           f"{'smem KiB':>8} {'GiB@' + str(threads):>11} {'calls':>5}  config"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['kernel']:<16} {r['role']:<14} {r['num_warps']:>5} {r['registers']:>4} {r['stack_bytes']:>7} "
              f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>15} {r['shared_bytes'] / 1024:>8.0f} "
              f"{r['local_gib']:>11.2f} {r['launches_per_step']:>5}  {r['config']}")
    launched = [r for r in rows if r["role"] == "launched"]
    worst = max(launched, key=lambda r: r["stack_bytes"])
    print(f"\nlargest frame launched on an H100: {worst['kernel']} {worst['config']}: {worst['stack_bytes']} B x "
          f"{threads} threads = {worst['local_gib']:.2f} GiB of local memory held by the context")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="inference")
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none",
                        help="none: what generate() runs (fp32 weights, no autocast); bf16: the step under autocast")
    parser.add_argument("--sms", type=int, default=H100_SMS)
    parser.add_argument("--threads-per-sm", type=int, default=THREADS_PER_SM)
    parser.add_argument("--out", default=None, help="write the rows and settings as JSON here")
    args = parser.parse_args()
    threads = args.sms * args.threads_per_sm
    launches = record_decode_step(args.preset, args.autocast)
    variants = variants_of(launches)
    print(f"{len(launches)} launches in one eager decode step -> {len(variants)} binaries to compile for "
          f"{sm_arch_from_capability(TARGET.arch)}", flush=True)
    rows = []
    for v in variants:
        rows.append(compile_variant(v, threads))
        print(f"  compiled {v.fn.__name__} {v.label} in {rows[-1]['compile_s']:.1f} s", flush=True)
    rows.sort(key=lambda r: (-r["stack_bytes"], r["kernel"], r["config"]))
    print()
    print_table(rows, threads)
    if args.out:
        ptxas = subprocess.run([get_ptxas(TARGET.arch).path, "--version"], capture_output=True, text=True).stdout
        record = {"preset": args.preset, "autocast": args.autocast, "target": sm_arch_from_capability(TARGET.arch),
                  "resident_threads": threads, "triton": triton.__version__, "torch": torch.__version__,
                  "ptxas": ptxas.strip().splitlines()[-1], "commit": git_commit(), "rows": rows}
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

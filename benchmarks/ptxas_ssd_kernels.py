"""Registers, spills and shared memory of the SSD scan's chunk kernels, compiled offline for sm_90.

No GPU needed: each kernel of `ops/semiseparable/triton.py` that reads the chunk states
(`_chunk_output_kernel`, `_chunk_dx_kernel`, `_chunk_duv_kernel`) is compiled for
GPUTarget("cuda", 90, 64) at the mixer's shape (bf16 inputs and states, 16-bit products, chunk 64,
R = P = 64) under a few launch configs, and ptxas -v reports its registers and spill bytes
(`ptxas_decode_kernels.py`'s helpers). Why: `_chunk_duv_kernel` is 43% of the scan's time at half its
bandwidth floor (`benchmarks/results/profile_scan.json`), and its register use tells which rework
can pay.

    PYTHONPATH=src python benchmarks/ptxas_ssd_kernels.py [--out benchmarks/results/ptxas_ssd.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import triton
from triton.compiler import ASTSource, make_backend

from muse_lm.ops.semiseparable import triton as ssd
from muse_lm.provenance import git_commit
from ptxas_decode_kernels import TARGET, _cubin_usage, _ptxas_log, _spills

# (BP, num_warps, num_stages): the autotuner's usual pick for each kernel, the sweep's fastest for
# `_chunk_duv_kernel`, and 8-warp configs.
LAUNCHES = ((64, 4, 1), (32, 4, 3), (64, 8, 1), (32, 8, 1))
KERNELS = (ssd._chunk_output_kernel, ssd._chunk_dx_kernel, ssd._chunk_duv_kernel)


def _signature(kernel) -> tuple[dict, dict]:
    """(signature, constexprs) at the mixer's shape, bf16 tensors, fp32 decays and d log_a."""
    sig = {name: "constexpr" for name in kernel.arg_names}
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            sig[name] = {"la_ptr": "*fp32", "dla_ptr": "*fp32", "tab_ptr": "*i32"}.get(name, "*bf16")
    sig.update({name: "i32" for name in ("T", "H", "R", "NC", "LOG_BH", "LOG_NC")})
    consts = dict(C=64, RB=64, VARLEN=False, PREC="tf32", RAW=True, RAW_S=True)
    if kernel is ssd._chunk_duv_kernel:
        consts["P"] = 64  # walks P itself
    else:
        sig["P"] = "i32"
    return sig, consts


def compile_row(kernel, block_p: int, warps: int, stages: int) -> dict:
    backend = make_backend(TARGET)
    sig, consts = _signature(kernel)
    options = backend.parse_options({"num_warps": warps, "num_stages": stages})
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs={**consts, "BP": block_p}),
                              target=TARGET, options=options.__dict__)
    usage = _cubin_usage(compiled.asm["cubin"])
    spills = _spills(_ptxas_log(compiled.asm["ptx"], options))
    return dict(kernel=kernel.fn.__name__, block_p=block_p, num_warps=warps, num_stages=stages,
                registers=usage["reg"], spill_stores=spills["spill_stores"], spill_loads=spills["spill_loads"],
                shared_bytes=compiled.metadata.shared)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ptxas_ssd.json")
    args = ap.parse_args()
    rows = [compile_row(k, *launch) for k in KERNELS for launch in LAUNCHES]
    for r in rows:
        print(f"{r['kernel']:<22} BP {r['block_p']:>2} warps {r['num_warps']} stages {r['num_stages']}: "
              f"{r['registers']} regs, spill {r['spill_stores']}/{r['spill_loads']} B, smem {r['shared_bytes']} B")
    res = dict(target="sm_90", triton=triton.__version__, commit=git_commit(),
               shape=dict(C=64, R=64, P=64, dtype="bf16", states="bf16"), rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

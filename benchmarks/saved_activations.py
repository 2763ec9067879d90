"""What one MuseLM block saves for its backward, per token: the tensors autograd keeps between the
forward and the backward of a bf16-autocast training step, grouped by shape and dtype, in bytes per
token (what does not grow with T, the weights and their bf16 casts, is counted apart).

Runs on the CPU: the ops' GPU dispatch (scan, BK and causal-conv custom ops) is forced onto CPU
tensors under Triton's interpreter, and `--compiled` traces the block with the same min-cut
partitioner Inductor uses (`aot_eager_decomp_partition`), which decides what a compiled step
recomputes instead of saving. The numbers are a model of the GPU's activation memory, not a
measurement of it (`bench_model.py` and `validate_memory.py` measure that).

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/saved_activations.py [--preset 8gb] [--seq-len 128] [--compiled]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from dataclasses import replace

import torch

_BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4, torch.float64: 8, torch.int64: 8,
          torch.complex64: 8, torch.bool: 1}


def _force_kernel_dispatch() -> None:
    """The ops take their Triton path on CPU tensors (the interpreter runs the kernels), as on CUDA."""
    import muse_lm.ops.causal_conv as conv_ops
    import muse_lm.ops.scan as scan_ops
    import muse_lm.ops.semiseparable as ss_ops
    from muse_lm.ops._dispatch import resolve_impl

    def force(op, impl, *tensors, has_triton_kernel):
        return resolve_impl(op, "triton", *tensors, has_triton_kernel=True)

    for module in (ss_ops, scan_ops, conv_ops):
        module.resolve_impl = force
    # The CUDA path's Im z check, in its traceable form.
    scan_ops._check_z = lambda op, z, k, ref: torch._assert_async((z.imag > 0).all(), op)


def _saved(block, d_model: int, seq_len: int, compiled: bool) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    torch._dynamo.reset()
    fn = torch.compile(block, backend="aot_eager_decomp_partition", dynamic=False) if compiled else block
    x = torch.randn(1, seq_len, d_model, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)[0].sum().backward()
    return [t for t in saved if isinstance(t, torch.Tensor)]


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * _BYTES.get(t.dtype, 4)


def _storage_bytes(saved: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `saved`: views of one buffer (a norm output saved in 3-D
    for one op and 2-D for a matmul, gate and up split from one projection) are held once."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}.values())


def saved_per_token(preset: str, seq_len: int, compiled: bool) -> dict:
    """{"activations": [[shape at seq_len, dtype, count, bytes per token]], "per_token": total,
    "fixed_bytes": what does not grow with T (weights, their casts), "per_token_distinct_storage": the
    same growth counting each storage once}: the block is run at seq_len and
    2 seq_len, and each saved tensor's growth divided by the added tokens is its cost per token."""
    from muse_lm.models import MuseLM
    from muse_lm.presets import get_preset

    cfg = replace(get_preset(preset).model, n_layers=1)
    torch.manual_seed(0)
    block = MuseLM(cfg).blocks[0].train()
    short, long = (_saved(block, cfg.d_model, t, compiled) for t in (seq_len, 2 * seq_len))
    if len(short) != len(long):
        raise RuntimeError(f"saved_activations.py: the block saved {len(short)} tensors at T {seq_len} but "
                           f"{len(long)} at T {2 * seq_len}; the graphs differ, so per-token costs cannot be paired")
    groups: collections.Counter = collections.Counter()
    fixed = 0
    for a, b in zip(short, long):
        grown = (_bytes(b) - _bytes(a)) / seq_len
        if grown == 0:
            fixed += _bytes(a)
            continue
        groups[(tuple(a.shape), str(a.dtype).removeprefix("torch."), grown)] += 1
    rows = sorted(([list(shape), dtype, count, grown * count] for (shape, dtype, grown), count in groups.items()),
                  key=lambda r: -r[3])
    return {"preset": preset, "seq_len": seq_len, "compiled": compiled, "d_model": cfg.d_model,
            "activations": rows, "per_token": sum(r[3] for r in rows), "fixed_bytes": fixed,
            "per_token_distinct_storage": (_storage_bytes(long) - _storage_bytes(short)) / seq_len}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="8gb")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("saved_activations.py: set TRITON_INTERPRET=1 (the kernels run in Triton's interpreter)")
    _force_kernel_dispatch()
    res = saved_per_token(args.preset, args.seq_len, args.compiled)
    print(f"{res['preset']} block, T {res['seq_len']}, {'compiled' if res['compiled'] else 'eager'}:")
    for shape, dtype, count, per_token in res["activations"]:
        print(f"  {count} x {shape} {dtype}: {per_token:,.0f} B/token")
    print(f"  activations: {res['per_token']:,.0f} B/token/layer "
          f"({res['per_token'] / (2 * res['d_model']):.1f} x d_model in bf16); not growing with T (weights, "
          f"their casts): {res['fixed_bytes'] / 2**20:.1f} MiB")
    print(f"  counting each storage once: {res['per_token_distinct_storage']:,.0f} B/token/layer")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

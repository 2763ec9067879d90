"""LNSLinear benchmark part: speed and weight bytes against a bf16 nn.Linear, and what 8-bit LNS FFN
weights cost a trained model in held-out perplexity.

1. Forward of x [16384, 1024] bf16 through LNSLinear (uint8 codes decoded inside the Triton matmul)
   vs nn.Linear(1024, 4096) in bf16 (cuBLAS), `do_bench` medians in the same run, weight bytes of both.
   Done-when: LNSLinear <= 1.15x nn.Linear.
2. A small MuseLM trained by the real Trainer on the real data pipeline (as `muse bench` does) for
   about 90 s, evaluated on the held-out split before and after `convert_to_lns(model, "ffn")`
   (trainable=False). Done-when: perplexity within 2% of the float model's.

    PYTHONPATH=src python benchmarks/lns_linear_part.py [--out PATH] [--train-seconds 90]

About 3 minutes on one H100 (tokenizer training on a fresh cache included).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from triton.testing import do_bench

from muse_lm.bench_quality import QualitySettings, environment, finalize_recipe, load_bench_data, plan_configs
from muse_lm.layers import LNSLinear, SwiGLU, convert_to_lns
from muse_lm.models import MuseLM
from muse_lm.training.evaluate import evaluate_loss
from muse_lm.training.trainer import Trainer

M, K, N = 16384, 1024, 4096
SPEED_TARGET = 1.15
PPL_TARGET = 1.02
# A small model and recipe (the 8gb preset's recipe, narrower and shallower, 8192-token vocabulary).
SMALL = {"vocab_size": 8192, "d_model": 512, "n_layers": 6, "n_heads": 8, "tt_rank": 16, "seq_len": 512,
         "micro_batch": 16}


def _median_ms(fn) -> float:
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def speed(device: torch.device) -> dict:
    """LNSLinear vs bf16 nn.Linear forward at M x K -> N, same inputs, same run."""
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=False, device=device)
    lns = LNSLinear.from_linear(lin)  # encoded from the fp32 weight
    lin = lin.to(torch.bfloat16)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        y_lns, y_lin = lns(x), lin(x)  # also runs the autotuner once, outside the timing
        rel = ((y_lns.float() - y_lin.float()).norm() / y_lin.float().norm()).item()
        t_lns = _median_ms(lambda: lns(x))
        t_lin = _median_ms(lambda: lin(x))
        from muse_lm.ops.lns_linear.triton import _lns_mm_tuned, lns_matmul_forward

        # The fused kernel alone (what runs below DECODE_GEMM_MIN_ROWS rows), here at full M, and at the
        # small batches of decoding, where reading half the weight bytes is the point.
        t_fused = _median_ms(lambda: lns_matmul_forward(x, lns.codes, lns.scale))
        small = {}
        for rows in (1, 16, 64):
            xs = x[:rows].contiguous()
            small[str(rows)] = {"fused_ms": _median_ms(lambda xs=xs: lns_matmul_forward(xs, lns.codes, lns.scale)),
                                "bf16_linear_ms": _median_ms(lambda xs=xs: lin(xs))}
    flops = 2 * M * K * N

    best = getattr(_lns_mm_tuned, "best_config", None)
    return {
        "shape": {"M": M, "K": K, "N": N}, "dtype": "bf16",
        "lns_ms": t_lns, "bf16_linear_ms": t_lin, "ratio": t_lns / t_lin, "target_ratio": SPEED_TARGET,
        "fused_kernel_ms": t_fused, "fused_over_bf16_linear": t_fused / t_lin, "small_batches": small,
        "path": "decode once (Triton) + cuBLAS GEMM at this M; the fused kernel below DECODE_GEMM_MIN_ROWS",
        "within_target": t_lns / t_lin <= SPEED_TARGET,
        "lns_tflops": flops / t_lns / 1e9, "bf16_tflops": flops / t_lin / 1e9,
        "lns_weight_bytes": lns.weight_bytes(), "bf16_weight_bytes": lin.weight.numel() * 2,
        "output_rel_diff_vs_float_weights": rel, "autotuned_config": str(best) if best is not None else None,
    }


def quality(device: torch.device, train_seconds: float) -> dict:
    """Held-out loss of a small trained MuseLM, float FFN weights vs 8-bit LNS FFN weights."""
    settings = QualitySettings(tokens=10**9, max_seconds=train_seconds, preset="8gb", overrides=dict(SMALL),
                               max_chars=16_000_000, device=str(device), compile="off")
    model_cfg, train_cfg = plan_configs(settings)
    data = load_bench_data(settings.data, model_cfg.vocab_size, settings.max_chars)
    model_cfg, train_cfg, _ = finalize_recipe(model_cfg, train_cfg, settings, data)
    torch.manual_seed(0)
    model = MuseLM(model_cfg)
    with tempfile.TemporaryDirectory(prefix="muse-bench-lns-") as tmp:
        trainer = Trainer(model, train_cfg, train_tokens=data.train, heldout_tokens=data.heldout, run_dir=tmp,
                          tokenizer_json=data.tokenizer_json, run_config={"bench": "lns_linear"}, seed=0,
                          device=device, progress=False)
        start = time.perf_counter()
        while trainer.step < train_cfg.steps and time.perf_counter() - start < train_seconds:
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - start

        def heldout() -> float:
            return evaluate_loss(trainer.model, trainer.eval_batches, device, dtype=train_cfg.dtype).loss

        float_loss = heldout()
        ffn_params = sum(lin.weight.numel() for ffn in trainer.model.modules() if isinstance(ffn, SwiGLU)
                         for lin in ffn.children())
        convert_to_lns(trainer.model, "ffn")
        lns_loss = heldout()
    ratio = math.exp(lns_loss - float_loss)
    return {
        "config": model_cfg.to_dict(), "train": train_cfg.to_dict(), "data": data.record(),
        "steps": trainer.step, "tokens": trainer.step * trainer.tokens_per_step, "train_s": train_s,
        "ffn_weights": ffn_params,
        "float_loss": float_loss, "float_ppl": math.exp(float_loss),
        "lns_loss": lns_loss, "lns_ppl": math.exp(lns_loss),
        "ppl_ratio": ratio, "target_ratio": PPL_TARGET, "within_target": ratio <= PPL_TARGET,
    }


def run(device: torch.device | str = "cuda", train_seconds: float = 90.0) -> dict:
    """Both parts on `device` (CUDA); returns the JSON record."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"lns_linear_part.run: needs a CUDA device (the Triton kernel and do_bench), got {device}")
    start = time.perf_counter()
    record = {"part": "lns_linear", "environment": environment(device), "speed": speed(device)}
    record["quality"] = quality(device, train_seconds)
    record["wall_s"] = time.perf_counter() - start
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/lns_linear.json", help="JSON file to write")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-seconds", type=float, default=90.0)
    args = parser.parse_args(argv)
    record = run(args.device, args.train_seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, sort_keys=True))
    s, q = record["speed"], record["quality"]
    print(f"forward {M}x{K}->{N} bf16: LNSLinear {s['lns_ms']:.3f} ms vs nn.Linear {s['bf16_linear_ms']:.3f} ms "
          f"= {s['ratio']:.3f}x (target <= {SPEED_TARGET}); weights {s['lns_weight_bytes']} vs "
          f"{s['bf16_weight_bytes']} bytes")
    print(f"held-out ppl after {q['steps']} steps: float {q['float_ppl']:.3f}, LNS FFN {q['lns_ppl']:.3f} "
          f"= {q['ppl_ratio']:.4f}x (target <= {PPL_TARGET}); wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

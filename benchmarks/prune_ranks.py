"""Rank pruning (issue 4): held-out loss and forward time per token before and after
`MuseLM.prune_ranks(threshold)`, at a few thresholds.

Trains a tiny MuseLM on the embedded python-stdlib corpus for --steps steps on --device (the CPU by
default), or loads a `muse train` checkpoint given with --checkpoint, then for each threshold prunes
a copy and measures: held-out cross-entropy (the same fixed batches), the ranks left per layer, and the median forward
time per token of the whole model and of its AR-SSM layers alone (eval mode, no grad).

Usage: PYTHONPATH=src python benchmarks/prune_ranks.py [--checkpoint RUN_OR_CKPT] [--steps 300]
       [--thresholds 0.05,0.2,0.5] [--gate-mode soft] [--gate-l1 3e-3] [--threads N] [--device cuda]
       [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from muse_lm.bench_quality import load_bench_data
from muse_lm.models import MuseConfig, MuseLM
from muse_lm.training.data import heldout_batches
from muse_lm.training.evaluate import evaluate_loss
from muse_lm.training.loading import load_trained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a `muse train` run or checkpoint directory (skips training)")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the tiny model")
    ap.add_argument("--thresholds", default="0.05,0.2,0.5", help="comma-separated mean-gate thresholds")
    ap.add_argument("--gate-mode", default="soft", help="gate mode the tiny model trains with")
    ap.add_argument("--gate-l1", type=float, default=3e-3,
                    help="gate L1 weight of the tiny model (larger than the default 1e-4 so that a few hundred "
                         "steps close some ranks)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--time-shape", default="4x512", help="BxT of the timed forward passes")
    ap.add_argument("--repeats", type=int, default=10, help="timed forward passes per measurement (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the model trains, evaluates and is timed")
    ap.add_argument("--out", default="benchmarks/results/prune_ranks.json")
    args = ap.parse_args(argv)
    args.thresholds = [float(t) for t in args.thresholds.split(",")]
    args.time_b, args.time_t = (int(n) for n in args.time_shape.lower().split("x"))
    args.device = torch.device(args.device)
    return args


def tiny_config(vocab_size: int, args: argparse.Namespace) -> MuseConfig:
    return MuseConfig(vocab_size=vocab_size, d_model=128, n_layers=2, n_heads=4, ssm_expand=2, max_rank=32,
                      min_rank=4, chunk_size=64, bk_heads=2, tt_rank=8, gate_mode=args.gate_mode,
                      gate_l1=args.gate_l1)


def train_tiny(args: argparse.Namespace) -> tuple[MuseLM, np.ndarray, dict]:
    """(trained tiny model in eval mode, held-out token stream, what was trained)."""
    data = load_bench_data(None, 2048, 4_000_000)
    torch.manual_seed(args.seed)
    model = MuseLM(tiny_config(data.vocab_size, args)).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    tokens = torch.from_numpy(data.train.astype(np.int64))
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / args.steps))  # warmup, linear decay
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.from_numpy(rng.integers(0, len(tokens) - args.seq_len - 1, args.batch))
        rows = tokens[starts.unsqueeze(1) + torch.arange(args.seq_len + 1)].to(args.device)
        loss = model(rows[:, :-1], rows[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    info = {"source": "trained here", "corpus": data.corpus, "steps": args.steps,
            "train_s": time.perf_counter() - start, "final_train_loss": statistics.fmean(losses[-20:]),
            "config": model.config.to_dict()}
    return model.eval(), data.heldout, info


def load_checkpoint(path: str, device: torch.device) -> tuple[MuseLM, np.ndarray, dict]:
    """A trained checkpoint and the held-out stream of the embedded corpus under its own tokenizer."""
    trained = load_trained(path, device)
    from muse_lm.training.data import load_corpus, tokenize_corpus  # only this path needs them

    tokens = tokenize_corpus(load_corpus(trained.config.get("run", {}).get("data")), trained.tokenizer)
    return trained.model, tokens.heldout, {"source": str(trained.path), "step": trained.step,
                                           "config": trained.model.config.to_dict()}


@torch.inference_mode()
def time_per_token(fns: list, ids: torch.Tensor, repeats: int) -> list[float]:
    """Median seconds per token of each fn(ids) over `repeats` rounds (after a warm-up round). The
    functions alternate within a round, so a load change on the machine hits all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    for round_ in range(repeats + 1):
        for fn, out in zip(fns, times, strict=True):
            sync()
            start = time.perf_counter()
            fn(ids)
            sync()
            if round_:
                out.append(time.perf_counter() - start)
    return [statistics.median(t) / ids.numel() for t in times]


def mixers_only(model: MuseLM, hidden: torch.Tensor):
    """The AR-SSM layers alone, each on the same hidden input [B, T, D]: where pruning saves time."""
    def run(_ids: torch.Tensor) -> None:
        for block in model.blocks:
            block.mixer(hidden)
    return run


def describe(model: MuseLM, heldout: np.ndarray, args: argparse.Namespace) -> dict:
    batches = heldout_batches(heldout, seq_len=args.seq_len, batch_size=args.batch, max_batches=args.eval_batches)
    return {"heldout_loss": evaluate_loss(model, batches, args.device).loss,
            "ranks": [b.mixer.rank for b in model.blocks], "effective_ranks": model.effective_ranks(),
            "parameters": model.num_parameters()}


def timings(base: MuseLM, pruned: MuseLM, args: argparse.Namespace) -> dict:
    """Forward microseconds per token of both models, and of their AR-SSM layers alone."""
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, base.config.vocab_size, (args.time_b, args.time_t), generator=gen).to(args.device)
    hidden = torch.randn(args.time_b, args.time_t, base.config.d_model, generator=gen).to(args.device)
    fns = [base, pruned, mixers_only(base, hidden), mixers_only(pruned, hidden)]
    model_b, model_p, mix_b, mix_p = (1e6 * t for t in time_per_token(fns, ids, args.repeats))
    return {"model_us_per_token_before": model_b, "model_us_per_token_after": model_p,
            "model_speedup": model_b / model_p, "mixers_us_per_token_before": mix_b,
            "mixers_us_per_token_after": mix_p, "mixers_speedup": mix_b / mix_p}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, heldout, source = load_checkpoint(args.checkpoint, args.device) if args.checkpoint else train_tiny(args)
    base = describe(model, heldout, args)
    rows = []
    for threshold in args.thresholds:
        pruned = copy.deepcopy(model)
        reports = pruned.prune_ranks(threshold)
        after = describe(pruned.eval(), heldout, args)
        rows.append({"threshold": threshold, "removed_per_layer": [list(r.removed) for r in reports], **after,
                     "loss_change_pct": 100 * (after["heldout_loss"] / base["heldout_loss"] - 1),
                     **timings(model, pruned, args)})
    result = {"source": source, "gate_means_per_layer": [b.mixer.gate_mean.tolist() for b in model.blocks],
              "before": base, "pruned": rows,
              "timing": {"shape": [args.time_b, args.time_t], "repeats": args.repeats, "device": str(args.device),
                         "gpu": torch.cuda.get_device_name() if args.device.type == "cuda" else None,
                         "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                         "torch": torch.__version__}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"before": base, "pruned": [{k: v for k, v in r.items() if k != "removed_per_layer"}
                                                 for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

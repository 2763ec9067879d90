"""HTT benchmark, parts (1) embedding lookup forward + backward and (2) tied head + loss
(`htt_head_part.py`); part (3), memory, is `bench_htt_memory.py`.

V 50257, D 1024, 32768 tokens, bf16, TT rank 16, 2 cores: the fused Triton kernel vs the torch
reference (gather + bmm) vs nn.Embedding, measured in the same run (`do_bench` medians).
Writes benchmarks/results/htt.json (or --out) with the GPU name, versions and git commit.
Each case is timed eagerly and as one replayed CUDA graph of fwd+bwd: the TT lookup is five
short kernels (forward, counting sort, segment sums), so eagerly the host's launch time can hide
the GPU time.

    PYTHONPATH=src python benchmarks/bench_htt.py [--out PATH] [--sweep [--segment-grid]] [--profile]
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from muse_lm.layers import HTTEmbedding
from muse_lm.ops import tt_embedding
from muse_lm.ops.tt_embedding import triton as tt_triton
from muse_lm.provenance import git_commit

V, D, TOKENS, RANK, CORES = 50257, 1024, 32768, 16, 2




def _median(fn) -> float:
    return do_bench(fn, warmup=100, rep=500, return_mode="median")


def _fwd_bwd(forward, params, ids, grad):
    def step():
        for p in params:
            p.grad = None
        forward(ids).backward(grad)

    return step


def _graphed(step):
    """`step` captured in a CUDA graph (after warm-up on a side stream); returns its replay.

    The TT path has no host sync, so its whole fwd+bwd captures; replays show GPU time without the
    eager launch overhead of its short kernels (the same is done for every competitor).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _write(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "htt.json"))
    parser.add_argument("--sweep", action="store_true", help="also time every declared kernel config")
    parser.add_argument("--segment-grid", action="store_true",
                        help="with --sweep: time a grid of sorted-backward launch shapes")
    parser.add_argument("--profile", action="store_true", help="print the kernels of one triton fwd+bwd")
    parser.add_argument("--parts", default="lookup,head", help="comma list of: lookup, head")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    head = None
    if "head" in parts:
        from htt_head_part import run_head_part  # benchmarks/ is on sys.path when run as a script

        head = run_head_part()
        print(json.dumps(head, indent=1), flush=True)
    if "lookup" not in parts:
        _write(args.out, {"part": "htt", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "triton": triton.__version__, "commit": git_commit(), "head": head})
        return
    torch.manual_seed(0)
    dev, dtype = "cuda", torch.bfloat16
    htt = HTTEmbedding(V, D, rank=RANK, num_cores=CORES).to(dev, dtype)
    dense = torch.nn.Embedding(V, D).to(dev, dtype)
    cores = list(htt.cores)
    ids = torch.randint(0, V, (TOKENS,), device=dev)
    grad = torch.randn(TOKENS, D, device=dev, dtype=dtype)
    results = {}
    cases = {
        "triton": (lambda i: tt_embedding(i, cores, impl="triton"), cores),
        "torch_reference": (lambda i: tt_embedding(i, cores, impl="torch"), cores),
        "nn_embedding": (dense, [dense.weight]),
    }
    for name, (forward, params) in cases.items():
        with torch.no_grad():
            fwd = _median(lambda f=forward: f(ids))
        results[name] = {"fwd_ms": fwd, "fwd_bwd_ms": _median(_fwd_bwd(forward, params, ids, grad))}
        try:
            results[name]["fwd_bwd_graph_ms"] = _median(_graphed(_fwd_bwd(forward, params, ids, grad)))
        except RuntimeError as err:  # recorded, not hidden: e.g. an op that syncs with the host
            results[name]["fwd_bwd_graph_error"] = str(err)[:200]
    if args.sweep:
        for cfg in tt_triton.CONFIGS:
            fwd = _median(lambda c=cfg: tt_triton.tt_lookup_forward(ids, cores, c))
            bwd = _median(lambda c=cfg: tt_triton.tt_lookup_backward(ids, cores, grad, c))
            atomic = _median(lambda c=cfg: tt_triton.tt_lookup_backward(ids, cores, grad, c, method="atomic"))
            results[f"triton_bn{cfg.block_n}_w{cfg.num_warps}"] = {"fwd_ms": fwd, "bwd_ms": bwd}
            results[f"triton_bn{cfg.block_n}_w{cfg.num_warps}_atomic"] = {"fwd_ms": fwd, "bwd_ms": atomic}
        # Skewed ids (Zipf-like, as in text): the sorted backward's per-digit work is unbalanced.
        zipf = torch.multinomial(
            1.0 / torch.arange(1, V + 1, device=dev, dtype=torch.float32), TOKENS, replacement=True
        )
        results["triton_zipf_ids"] = {
            "fwd_ms": _median(lambda: tt_triton.tt_lookup_forward(zipf, cores)),
            "bwd_ms": _median(lambda: tt_triton.tt_lookup_backward(zipf, cores, grad)),
        }
        grid = [tt_triton.SegmentDotConfig(bt, mc, cps, 4, st) for bt in (4, 8, 16) for mc in (16, 32, 64)
                for cps in (2, 4) for st in (2, 3)] if args.segment_grid else []
        for seg in (*tt_triton.SEGMENT_CONFIGS, *grid):
            key = (f"sorted_bt{seg.block_t}_mc{seg.min_chunk}_cps{seg.chunks_per_segment}_w{seg.num_warps}"
                   f"_st{seg.num_stages}")
            results[key] = {
                name: _median(_graphed(partial(tt_triton.tt_lookup_backward, i, cores, grad, segment_config=seg)))
                for name, i in (("bwd_graph_ms", ids), ("zipf_bwd_graph_ms", zipf))
            }
    if args.profile:
        step = _fwd_bwd(cases["triton"][0], cores, ids, grad)
        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    ratio = results["triton"]["fwd_bwd_ms"] / results["nn_embedding"]["fwd_bwd_ms"]
    graph_ratio = None
    if "fwd_bwd_graph_ms" in results["triton"] and "fwd_bwd_graph_ms" in results["nn_embedding"]:
        graph_ratio = results["triton"]["fwd_bwd_graph_ms"] / results["nn_embedding"]["fwd_bwd_graph_ms"]
    report = {
        "part": "htt_lookup",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "shape": {
            "vocab": V,
            "d_model": D,
            "tokens": TOKENS,
            "rank": RANK,
            "cores": CORES,
            "vocab_factors": htt.vocab_factors,
            "dim_factors": htt.dim_factors,
            "dtype": "bfloat16",
        },
        "params": {"htt": htt.num_parameters(), "dense": dense.weight.numel()},
        "median_ms": results,
        "triton_over_nn_embedding_fwd_bwd": ratio,
        "triton_over_nn_embedding_fwd_bwd_graphed": graph_ratio,
        "target_ratio": 0.3,
        "head": head,
    }
    _write(args.out, report)
    print(f"{report['gpu']}  torch {report['torch']}  triton {report['triton']}  commit {report['commit']}")
    print(f"params: htt {htt.num_parameters():,}  dense {dense.weight.numel():,}")
    print(f"{'impl':<24}{'fwd ms':>10}{'fwd+bwd ms':>12}{'bwd ms':>10}")
    for name, res in results.items():
        if "fwd_ms" not in res:
            print(f"{name:<24}" + "  ".join(f"{k} {v:.4f}" for k, v in res.items()))
            continue
        print(
            f"{name:<24}{res['fwd_ms']:>10.4f}{res.get('fwd_bwd_ms', float('nan')):>12.4f}"
            f"{res.get('bwd_ms', float('nan')):>10.4f}"
        )
    print(f"triton / nn.Embedding fwd+bwd = {ratio:.3f} eager, {graph_ratio} graphed (target <= 0.3)")


if __name__ == "__main__":
    main()

"""Generation benchmark (issue 8): MuseLM's state-cache decode against the TransformerLM baseline's
static KV-cache decode, each as replayed CUDA graphs and eagerly, in one run on one GPU.

Models, bf16, random init (decode speed and memory do not depend on the weights' values): the 8gb
preset's MuseLM shape, and a TransformerLM matched on non-embedding parameters
(`bench_quality.matched_transformer_config`). MuseLM also runs with pruned ranks (the gate statistics
are set to a ramp so `prune_ranks(0.5)` removes half of every layer's gated rank) and with 8-bit LNS
FFN weights (`muse_lm.layers.convert_to_lns(model, "ffn")`, when this build has it).

For each context (1K, 8K, 32K, 128K) and batch (1, 32): prefill tokens/s (one pass over the prompt;
best of the two prefills the cell runs), decode latency per token and tokens/s over 256 greedy tokens
(argmax on the device, no host sync), graphs and eager, peak memory, and the context-dependent
memory (MuseLM's recurrent state, the transformer's KV cache). A prefill that does not fit at batch 32
is recorded as OOM, and the decode then starts from the batch-1 prompt's state or cache copied to
all 32 rows (a decode step's cost does not depend on what the state holds); a KV cache that does not
fit is recorded as OOM. Results are written after every cell, so a stopped run keeps what it measured.

Once per variant, at the smallest context, batch 4: `greedy_vs_full`, 64 greedy tokens from the
captured step (eager on the CPU) compared with the argmax of one full forward over prompt + those
tokens (`decode_graph.greedy_vs_full`: positions compared, positions that differ, the largest logit
gap at those, alone and over |argmax logit| and over the logit std, the mean logit std for scale).
In bf16 the two paths round differently, so they may pick different tokens where the full forward
nearly ties; random-init logits are nearly flat (std ~0.5 here), so such near-ties are common.

    PYTHONPATH=src python benchmarks/bench_generate.py --out DIR        # writes DIR/generate.json
    PYTHONPATH=src python benchmarks/bench_generate.py --device cpu --preset tiny --contexts 64 \\
        --batches 1,2 --new-tokens 4 --out /tmp/x                       # a CPU smoke run (no graphs)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from muse_lm.bench_quality import matched_transformer_config
from muse_lm.io import write_text_atomic
from muse_lm.models import MuseLM, TransformerLM
from muse_lm.models.batched_state import States, cat_states, decode_step, prefill
from muse_lm.models.decode_graph import KVCacheDecoder, MuseDecoder, greedy_vs_full, state_nbytes
from muse_lm.presets import get_preset
from muse_lm.provenance import git_commit

WARMUP_TOKENS = 4  # decode steps before each timed run (first-call allocations, caches)
GREEDY_CHECK = {"batch": 4, "new_tokens": 64}  # the greedy_vs_full measurement, at the smallest context
ATTENTION = ("SDPA: eager over exactly the valid prefix (no mask, flash-eligible); the captured step over "
             "the whole static cache with a boolean mask (fixed shapes)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="directory for generate.json")
    ap.add_argument("--preset", default="8gb", help="preset whose model shape is measured")
    ap.add_argument("--contexts", default="1024,8192,32768,131072")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--variants", default="muse,transformer,muse_pruned,muse_lns")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run without graphs)")
    ap.add_argument("--time-budget-s", type=float, default=500.0,
                    help="cells not started by then are recorded as skipped (the issue's limit is 10 minutes)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variants = args.variants.split(",")
    return args


# ---- device helpers ------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


_resident = {"bytes": 0}


def _reset_peak(device: torch.device) -> None:
    """Starts a peak measurement; what is allocated now (every variant's weights stay resident for
    the whole run, plus earlier decoders' buffers) is the baseline `_peak` subtracts."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _resident["bytes"] = torch.cuda.memory_allocated(device)


def _peak(device: torch.device) -> int | None:
    """Bytes allocated at the peak since `_reset_peak` beyond what was resident then: the memory this
    measurement itself needed (states or KV cache, activations, logits), not the other models'."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) - _resident["bytes"]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- models --------------------------------------------------------------------------------------
def build_models(args: argparse.Namespace, device: torch.device) -> tuple[dict, dict]:
    """{name: model} for the variants asked for, and a description of each (or why it is absent)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = get_preset(args.preset).model
    torch.manual_seed(args.seed)
    base = MuseLM(copy.deepcopy(cfg)).to(device, dtype).eval()
    models, info = {}, {}
    if "muse" in args.variants:
        models["muse"], info["muse"] = base, {"config": cfg.to_dict()}
    if "transformer" in args.variants:
        tcfg = matched_transformer_config(cfg)
        models["transformer"] = TransformerLM(tcfg).to(device, dtype).eval()
        info["transformer"] = {"config": tcfg.to_dict()}
    if "muse_pruned" in args.variants:
        models["muse_pruned"], info["muse_pruned"] = pruned_copy(base)
    if "muse_lns" in args.variants:
        lns, info["muse_lns"] = lns_copy(base)
        if lns is not None:
            models["muse_lns"] = lns
    for name, model in models.items():
        model.check_ids = False  # prompts are drawn in range; the check would sync every step
        info[name]["non_embedding_params"] = model.num_parameters(exclude_embedding=True)
        # Parameters and buffers: LNS weights are uint8 code buffers, so parameters alone undercount.
        info[name]["weight_bytes"] = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        info[name]["dtype"] = str(dtype).removeprefix("torch.")
    return models, info


def pruned_copy(base: MuseLM) -> tuple[MuseLM, dict]:
    """A copy pruned at 0.5 after a ramp of gate statistics (random init has none worth reading)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.gate_mean.copy_(torch.linspace(1.0, 0.0, block.mixer.rank))
    reports = model.prune_ranks(0.5)
    return model, {"ranks_before": [r.rank_before for r in reports], "ranks_after": [r.rank_after for r in reports],
                   "how": "gate_mean set to linspace(1, 0, rank) per layer, then prune_ranks(0.5)"}


def lns_copy(base: MuseLM) -> tuple[MuseLM | None, dict]:
    """A copy whose FFN Linear layers hold 8-bit LNS weights, or None where this build has no LNS."""
    try:
        from muse_lm.layers import convert_to_lns
    except ImportError:
        return None, {"lns": "not available in this build"}
    model = copy.deepcopy(base)
    converted = convert_to_lns(model, "ffn")
    # convert_to_lns swaps the layers in place; take its result where it hands the model back.
    model = converted if isinstance(converted, MuseLM) else model
    return model.eval(), {"how": 'muse_lm.layers.convert_to_lns(model, "ffn")'}


# ---- one measurement cell ------------------------------------------------------------------------
def greedy_decode(step: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, n: int,
                  device: torch.device) -> tuple[dict, torch.Tensor]:
    """WARMUP_TOKENS untimed steps, then n timed greedy steps -> (timings, tokens [B, n] on the host)."""
    for _ in range(WARMUP_TOKENS):
        logits = step(logits.argmax(-1))
    _reset_peak(device)
    tokens = []

    def run() -> None:
        nonlocal logits
        for _ in range(n):
            tokens.append(logits.argmax(-1))
            logits = step(tokens[-1])

    _, seconds = _timed(run, device)
    batch = tokens[0].shape[0]
    timing = {"ms_per_token": 1e3 * seconds / n, "tokens_per_s": batch * n / seconds,
              "peak_bytes_above_resident": _peak(device)}
    return timing, torch.stack(tokens, 1).cpu()


def _prefill_record(seconds: float, batch: int, context: int, device: torch.device, rows: int) -> dict:
    return {"seconds": seconds, "tokens_per_s": rows * context / seconds, "peak_bytes_above_resident": _peak(device),
            "rows_prefilled": rows, **({} if rows == batch else {"note": "batch prefill did not fit (OOM); "
                                        "the batch-1 prompt's state is copied to every row for decoding"})}


def muse_prefill(model: MuseLM, ids: torch.Tensor, device: torch.device) -> tuple[dict, torch.Tensor, States]:
    """Prefills ids [B, T] (or, on OOM, its first row, copied B times) -> (record, logits, states)."""
    batch, context = ids.shape
    _reset_peak(device)
    try:
        (logits, states), seconds = _timed(lambda: prefill(model, ids), device)
        return _prefill_record(seconds, batch, context, device, batch), logits, states
    except torch.cuda.OutOfMemoryError:
        pass
    _free(device)
    _reset_peak(device)
    (logits, states), seconds = _timed(lambda: prefill(model, ids[:1]), device)
    return (_prefill_record(seconds, batch, context, device, 1), logits.expand(batch, -1).contiguous(),
            cat_states([states] * batch))


def muse_cell(model: MuseLM, decoder: MuseDecoder | None, ids: torch.Tensor, n: int, device: torch.device) -> dict:
    cell: dict = {"decode": {}}
    tokens = {}
    for mode in ("graph", "eager"):
        record, logits, states = muse_prefill(model, ids, device)
        if "prefill" not in cell or record["seconds"] < cell["prefill"]["seconds"]:
            cell["prefill"] = record
        cell["context_bytes"] = state_nbytes(states)
        if mode == "graph" and decoder is None:
            cell["decode"][mode] = {"not run": "CUDA graphs need a CUDA device (smoke run)"}
            continue
        if mode == "graph":
            decoder.load(states)
            step = decoder.step
        else:
            step = _eager_muse_step(model, states)
        del states
        cell["decode"][mode], tokens[mode] = greedy_decode(step, logits, n, device)
    cell["greedy_first_divergence"] = _first_divergence(tokens)
    return cell


def _eager_muse_step(model: MuseLM, states: States) -> Callable[[torch.Tensor], torch.Tensor]:
    def step(nxt: torch.Tensor) -> torch.Tensor:
        nonlocal states
        logits, states = decode_step(model, nxt, states)
        return logits

    return step


def transformer_cell(model: TransformerLM, ids: torch.Tensor, n: int, device: torch.device) -> dict:
    batch, context = ids.shape
    max_len = 64 * -(-(context + n + WARMUP_TOKENS) // 64)  # a multiple of 64 keeps the mask rows aligned
    cell: dict = {"decode": {}}
    tokens = {}
    for mode in ("graph", "eager"):
        if mode == "graph" and device.type != "cuda":
            cell["decode"][mode] = {"not run": "CUDA graphs need a CUDA device (smoke run)"}
            continue
        _reset_peak(device)
        try:
            dec = KVCacheDecoder(model, batch, max_len, cuda_graph=mode == "graph")
        except torch.cuda.OutOfMemoryError:
            cell["decode"][mode] = {"oom": f"a KV cache of {batch} x {max_len} positions does not fit"}
            weight = model.blocks[0].attn.qkv.weight
            cell["context_bytes"] = 2 * model.config.n_layers * batch * max_len * model.config.d_model * \
                weight.element_size()
            cell["context_fits"] = False
            _free(device)
            continue
        cell["context_bytes"] = dec.cache.nbytes()
        record, logits = transformer_prefill(model, dec, ids, device)
        if "prefill" not in cell or record["seconds"] < cell["prefill"]["seconds"]:
            cell["prefill"] = record
        cell["decode"][mode], tokens[mode] = greedy_decode(dec.step, logits, n, device)
        del dec, logits
        _free(device)
    cell["greedy_first_divergence"] = _first_divergence(tokens)
    return cell


def transformer_prefill(model: TransformerLM, dec: KVCacheDecoder, ids: torch.Tensor,
                        device: torch.device) -> tuple[dict, torch.Tensor]:
    """Prefills the decoder's cache with ids (or, on OOM, row 0's K/V copied to every row)."""
    batch, context = ids.shape
    try:
        logits, seconds = _timed(lambda: dec.prefill(ids), device)
        return _prefill_record(seconds, batch, context, device, batch), logits
    except torch.cuda.OutOfMemoryError:
        pass
    _free(device)
    small = model.new_kv_cache(1, dec.cache.max_len)
    logits, seconds = _timed(lambda: model.prefill_kv(ids[:1], small), device)
    cache = dec.cache
    for big, one in zip((*cache.k, *cache.v), (*small.k, *small.v)):
        big.copy_(one.expand_as(big))
    cache.length.fill_(context)
    cache.filled = context
    return _prefill_record(seconds, batch, context, device, 1), logits.expand(batch, -1).contiguous()


def _first_divergence(tokens: dict) -> int | None | str:
    """First step where graph and eager greedy tokens differ (None: never), over all rows."""
    if len(tokens) < 2:
        return "n/a"
    diff = (tokens["graph"] != tokens["eager"]).any(0).nonzero()
    return int(diff[0]) if diff.numel() else None


# ---- greedy tokens against full recomputation ---------------------------------------------------
def greedy_check(model, decoder: MuseDecoder | None, ids: torch.Tensor, n: int, device: torch.device) -> dict:
    """n greedy tokens for ids [B, T] from the captured step (or eager without CUDA), against the
    argmax of one full forward over ids + tokens (`decode_graph.greedy_vs_full`)."""
    if isinstance(model, MuseLM):
        logits, states = prefill(model, ids)
        if decoder is not None:
            decoder.load(states)
            step, mode = decoder.step, "graph"
        else:
            step, mode = _eager_muse_step(model, states), "eager"
    else:
        dec = KVCacheDecoder(model, ids.shape[0], ids.shape[1] + n, cuda_graph=device.type == "cuda")
        logits, step, mode = dec.prefill(ids), dec.step, "graph" if dec.cuda_graph else "eager"
    tokens = []
    for i in range(n):
        tokens.append(logits.argmax(-1))
        if i + 1 < n:  # the last token needs no step after it (and a full KV cache takes none)
            logits = step(tokens[-1])
    tokens = torch.stack(tokens, 1)
    full = model(torch.cat([ids, tokens], 1))[:, ids.shape[1] - 1: -1]
    return {"context": ids.shape[1], "batch": ids.shape[0], "new_tokens": n, "decode": mode,
            **greedy_vs_full(full, tokens)}


# ---- the run -------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "commit": git_commit(),
           "device": str(device)}
    if device.type == "cuda":
        import triton

        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, triton=triton.__version__,
                   gpu_memory_bytes=torch.cuda.get_device_properties(device).total_memory)
    return env


def run_variant(name: str, model, args: argparse.Namespace, device: torch.device, report: dict,
                save: Callable[[], None], deadline: float) -> None:
    results = report["results"].setdefault(name, {})
    decoder = None
    if isinstance(model, MuseLM) and device.type == "cuda":
        decoder = MuseDecoder(model, cuda_graph=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if time.perf_counter() < deadline:
        ids = torch.randint(0, model.config.vocab_size, (GREEDY_CHECK["batch"], min(args.contexts)), device=device,
                            generator=gen)
        report["greedy_vs_full"][name] = greedy_check(model, decoder, ids, GREEDY_CHECK["new_tokens"], device)
        del ids
        _free(device)
        print(f"{name} greedy_vs_full: {json.dumps(report['greedy_vs_full'][name])}", flush=True)
    for context in args.contexts:
        for batch in args.batches:
            key = results.setdefault(str(context), {})
            if time.perf_counter() > deadline:
                key[str(batch)] = {"skipped": f"time budget of {args.time_budget_s:.0f} s used up"}
                continue
            ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device, generator=gen)
            if isinstance(model, MuseLM):
                key[str(batch)] = muse_cell(model, decoder, ids, args.new_tokens, device)
            else:
                key[str(batch)] = transformer_cell(model, ids, args.new_tokens, device)
            del ids
            _free(device)
            save()
            print(f"{name} context {context} batch {batch}: {json.dumps(key[str(batch)]['decode'])}", flush=True)


def summarize(report: dict) -> dict:
    """The issue's done-when numbers, read off the results (None where a cell is missing)."""
    res = report["results"]

    def decode(name: str, ctx: int, batch: int, mode: str, field: str) -> float | None:
        cell = res.get(name, {}).get(str(ctx), {}).get(str(batch), {})
        return cell.get("decode", {}).get(mode, {}).get(field)

    def best_tps(name: str, ctx: int, batch: int) -> float | None:
        values = [v for m in ("graph", "eager") if (v := decode(name, ctx, batch, m, "tokens_per_s")) is not None]
        return max(values) if values else None

    contexts = report["contexts"]
    out: dict = {"muse_graph_ms_per_token_batch1": {c: decode("muse", c, 1, "graph", "ms_per_token") for c in contexts},
                 "transformer_graph_ms_per_token_batch1":
                     {c: decode("transformer", c, 1, "graph", "ms_per_token") for c in contexts}}
    lat = [v for v in out["muse_graph_ms_per_token_batch1"].values() if v is not None]
    out["muse_latency_max_over_min"] = max(lat) / min(lat) if lat else None
    muse_tps, tr_tps = best_tps("muse", 32768, 32), best_tps("transformer", 32768, 32)
    out["muse_over_transformer_tokens_per_s_32k_batch32"] = (muse_tps / tr_tps if muse_tps and tr_tps else
                                                             "transformer did not run" if muse_tps else None)
    ctx = max(contexts)
    state = res.get("muse", {}).get(str(ctx), {}).get("1", {}).get("context_bytes")
    kv = res.get("transformer", {}).get(str(ctx), {}).get("1", {}).get("context_bytes")
    out[f"muse_state_over_kv_cache_bytes_{ctx}_batch1"] = state / kv if state and kv else None
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_generate: no CUDA device here; run it on a GPU (or --device cpu for a smoke run)")
    start = time.perf_counter()
    out = Path(args.out) / "generate.json"
    models, info = build_models(args, device)
    report = {**environment(device), "weights": "random init (speed and memory do not depend on the values)",
              "preset": args.preset, "contexts": args.contexts, "batches": args.batches,
              "new_tokens": args.new_tokens, "decode": "greedy argmax on the device, no host sync per token",
              "attention": ATTENTION, "models": info,
              "greedy_first_divergence": "first timed step at which graph and eager greedy tokens differ in any row "
                                         "(null: never); random-init bf16 logits are nearly flat, so near-ties "
                                         "(different but equally valid kernels) show up early",
              "greedy_vs_full_how": f"once per variant at the smallest context, batch {GREEDY_CHECK['batch']}, "
                                    f"{GREEDY_CHECK['new_tokens']} greedy tokens from the captured step (eager on the "
                                    "CPU) against the argmax of a full forward over prompt + tokens: positions "
                                    "compared, positions that differ (token not a full-forward argmax), the largest "
                                    "full-forward logit gap (argmax minus token) at those, that gap over |argmax "
                                    "logit| (bf16 rounds to <= |x|/128 there) and over the position's logit std, "
                                    "and the mean logit std for scale",
              "greedy_vs_full": {}, "results": {}}

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - start
        report["summary"] = summarize(report)
        write_text_atomic(out, json.dumps(report, indent=2) + "\n")

    deadline = start + args.time_budget_s
    with torch.no_grad():
        for name, model in models.items():
            run_variant(name, model, args, device, report, save, deadline)
    save()
    print(f"wrote {out} ({report['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()

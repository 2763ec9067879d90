"""What keeps 2 gloo ranks together when something goes wrong or must be decided once:

- a failure while rank 0 writes its part of a sharded checkpoint (model.safetensors, the atomic
  rename, the temp directory) ends BOTH processes with an error (rank 0 its own, rank 1 a
  CheckpointError naming it), never a rank waiting in a barrier forever;
- a rollback to a checkpoint loads the checkpoint rank 0 chose on every rank (even when rank 1's
  view of the run directory differs), from the DCP shards (model.safetensors is never read);
- the stability monitor's state is the same on every rank (so rank 0's saved copy is everyone's);
- FSDP2 skips the reduce-scatter on the non-final micro-batches and still gets the gradient sum;
- benchmarks/bench_distributed.py's layer-fit search makes the same tries on both ranks even when
  their clocks disagree (rank 0 decides).

Run as a script, this file is the worker: `test_distributed_failures.py save|train|fit OUT ARGS_JSON`
(2 plain processes with RANK / WORLD_SIZE set for `save` and `fit`, so no launcher kills one when
the other fails or stops early; under torchrun for `train`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 10  # the run's length; the worker stops at STEPS - 1, mid log window (log_every 2)
NAN_STEPS = (4, 5, 6, 7)  # on rank 1 only: skip, lr_cut, clip, then a rollback (no snapshot yet)
TIMEOUT_S = 120  # a hang (the bug) fails the test here instead of stalling the suite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(base: dict, **extra: str) -> dict:
    return {**base, "OMP_NUM_THREADS": "1", **extra}


def _two_plain_processes(mode: str, out: Path, args: dict, env: dict, what: str) -> list[tuple[int, str]]:
    """Runs this file's `mode` worker as ranks 0 and 1 (no launcher) -> [(returncode, stderr)]."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(out), json.dumps(args)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank in (0, 1)]
    errors = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=TIMEOUT_S)
            errors.append(err)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank hung: {what}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [(proc.returncode, err) for proc, err in zip(procs, errors)]


# ---- 1. a failed write on rank 0 ---------------------------------------------------------------
@pytest.mark.parametrize(("parallel", "where"), [("fsdp", "model.safetensors"), ("fsdp", "rename"),
                                                 ("ddp", "temp directory")])
def test_a_failed_write_on_rank_0_ends_both_ranks_with_errors(parallel, where, cli_env, tmp_path):
    ranks = _two_plain_processes("save", tmp_path, {"parallel": parallel, "where": where}, cli_env,
                                 f"after rank 0 failed ({where}) a rank must raise instead of waiting")
    errors = [err for _, err in ranks]
    # The last line of each traceback (torch prefixes an uncaught error's lines with "[rankN]: ").
    last = [re.sub(r"^\[rank\d\]: ", "", err.strip().splitlines()[-1]) if err.strip() else "" for err in errors]
    assert ranks[0][0] != 0 and ranks[1][0] != 0, last
    assert last[0].startswith("OSError: [Errno 28] injected"), errors[0][-3000:]  # rank 0: its own error
    assert last[1].startswith("muse_lm.errors.CheckpointError: rank 0 failed to "), errors[1][-3000:]
    assert "OSError: [Errno 28] injected" in last[1]  # what and why, on the other rank too
    run = tmp_path / "run"
    assert not list(run.glob("step-*")) and not list(run.glob(".step-*"))  # atomic: nothing left behind
    assert not (run / "latest").exists()


def _inject_write_failure(where: str, originals: dict) -> None:
    """Makes rank 0's part of the save fail with ENOSPC at `where`."""
    import errno

    import safetensors.torch

    import muse_lm.io

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, f"injected: no space left on device ({where})")

    module, name = {"model.safetensors": (safetensors.torch, "save_file"),
                    "rename": (muse_lm.io, "_replace_directory"),
                    "temp directory": (muse_lm.io.tempfile, "mkdtemp")}[where]
    originals[(module, name)] = getattr(module, name)  # restored by the caller
    setattr(module, name, fail)


def _save_worker(out: Path, args: dict) -> None:
    """One rank of the failed-save test: a tiny sharded (or DDP) model saves once; rank 0's write
    fails. Its exception ends the process (nonzero exit), as it would end `muse train`."""
    from torch.nn.parallel import DistributedDataParallel

    from muse_lm.models import MuseLM
    from muse_lm.training import distributed, fsdp
    from muse_lm.training.dcp import save_sharded_checkpoint

    info = distributed.setup(torch.device("cpu"))
    model = MuseLM(_tiny_config())
    if args["parallel"] == "fsdp":
        fsdp.apply_fsdp(model, torch.device("cpu"), "fp32")
    else:
        DistributedDataParallel(model)  # broadcasts rank 0's weights; checkpoints read the inner model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    originals: dict = {}
    if info.is_main:
        _inject_write_failure(args["where"], originals)
    try:
        save_sharded_checkpoint(out / "run", 1, model=model, optimizer=optimizer, config={"x": 1},
                                tokenizer_json="{}", train_state={"step": 1}, keep=2, info=info)
    finally:
        for (module, name), value in originals.items():
            setattr(module, name, value)
        model = optimizer = None
        gc.collect()  # the mesh holds the process group (see run.train)
        distributed.teardown()


# ---- the benchmark's layer-fit search -----------------------------------------------------------
def test_the_fit_search_follows_rank_0_when_the_clocks_disagree(cli_env, tmp_path):
    """Rank 1's clock runs far ahead (its budget looks spent after one try); rank 0's budget is
    ample. The stand-in `_fits` makes the real one's MIN all-reduce, so ranks that decided on
    their own would wait in different collectives; both must make rank 0's tries."""
    ranks = _two_plain_processes("fit", tmp_path, {"limit": 300}, cli_env, "the fit search's ranks disagreed")
    assert all(code == 0 for code, _ in ranks), ranks[0][1][-3000:] + ranks[1][1][-3000:]
    tried = [json.loads((tmp_path / f"fit{r}.json").read_text())["tried"] for r in (0, 1)]
    assert tried[0] == tried[1]
    # Doubling from 96, then bisection until the bracket is within 1/8 of the largest fit.
    assert [t["n_layers"] for t in tried[0]] == [96, 192, 384, 288, 336, 312]
    assert json.loads((tmp_path / "fit0.json").read_text())["max_layers_fit"] == 288


def _fit_worker(out: Path, args: dict) -> None:
    """One rank of the fit-search test: bench_distributed._fit_search with a stand-in `_fits`."""
    import importlib.util

    import torch.distributed as dist

    from muse_lm.training import distributed

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_distributed.py"
    spec = importlib.util.spec_from_file_location("bench_distributed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    info = distributed.setup(torch.device("cpu"))

    def fits(parallel, layers, info):
        ok = torch.tensor(float(layers <= args["limit"]))
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # as the real one: every rank must be in it
        return bool(ok)

    class SkewedClock:  # rank 1: an hour passes between two readings
        calls = 0

        def perf_counter(self):
            self.calls += 1
            return 3600.0 * self.calls

    bench._fits = fits
    if info.rank == 1:
        bench.time = SkewedClock()
    try:
        result = bench._fit_search("fsdp", info, budget_s=600.0)
        (out / f"fit{info.rank}.json").write_text(json.dumps(result))
    finally:
        distributed.teardown()


def _tiny_config():
    from muse_lm.presets import get_preset

    return dataclasses.replace(get_preset("tiny").model, d_model=32, n_layers=1, n_heads=2, max_rank=8, min_rank=2,
                               bk_heads=2, tt_rank=4, vocab_size=300)


# ---- 2-4. a rollback under FSDP, the monitor across ranks, FSDP2 accumulation -------------------
@pytest.fixture(scope="module")
def rollback_ranks(small_corpus, tiny_defaults, cli_env, tmp_path_factory) -> list[dict]:
    """FSDP on 2 ranks: NaN losses on rank 1 climb the ladder to a rollback with no in-memory
    snapshot, so the step-3 checkpoint is loaded. Rank 1 sees an empty run directory (a stale
    view); model.safetensors cannot be read on either rank."""
    out = tmp_path_factory.mktemp("rollback")
    args = {"corpus": str(small_corpus), "steps": STEPS, "faults": [f"nan_loss@{s}:rank1" for s in NAN_STEPS],
            "overrides": {**tiny_defaults, "micro_batch": 2, "grad_accum": 2, "checkpoint_every": 3,
                          "log_every": 2, "fsdp_defer_reduce": True}}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, "train", str(out), json.dumps(args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(cli_env), timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-rank rollback run hung (the ranks went different ways)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_both_ranks_roll_back_to_the_checkpoint_rank_0_chose(rollback_ranks):
    events = [[(e["step"], e["action"], e.get("to_step")) for e in r["events"]] for r in rollback_ranks]
    assert events[0] == events[1]
    assert [e[1] for e in events[0]] == ["skip", "lr_cut", "clip", "rollback"]
    rollback = rollback_ranks[1]["events"][-1]
    assert rollback["to_step"] == 3 and "checkpoint step-0000003" in rollback["reason"]
    assert all(r["step"] == STEPS - 1 and r["finite"] for r in rollback_ranks)
    assert all(r["full_weight_reads"] == 0 for r in rollback_ranks)  # each rank read its DCP shards only


def test_the_monitor_state_is_the_same_on_every_rank(rollback_ranks):
    """After the all-reduces (loss, flags, per-layer and forward statistics) the monitor's state is
    identical on both ranks, so the copy rank 0 saves restores the same monitor at any world size."""
    states = [r["monitor"] for r in rollback_ranks]
    assert states[0] == states[1]
    assert states[0]["forward_stats"] and states[0]["baselines"] and states[0]["losses"]
    windows = [r["log_window"] for r in rollback_ranks]
    assert windows[0] == windows[1] and windows[0]["rank_sums"][0] != windows[0]["rank_sums"][1]
    mean = [(a + b) / 2 for a, b in zip(*windows[0]["rank_sums"])]
    assert windows[0]["sums"] == pytest.approx(mean, rel=1e-6)  # the saved window is the ranks' mean


def test_fsdp_skips_the_reduce_scatter_until_the_last_micro_batch(rollback_ranks):
    for r in rollback_ranks:
        check = r["no_sync"]
        assert check["grads_after_unsynced_backward"] == 0  # nothing reduce-scattered yet
        assert check["max_abs_diff_vs_synced"] < 1e-6  # the one reduce-scatter gives the same sum
        # The trainer (grad_accum 2) ran its first micro-batch of every step without the sync.
        assert r["train_steps"] > STEPS and r["unsynced_micro_batches"] == r["train_steps"]


def _no_sync_check(trainer) -> dict:
    """Two micro-batches' backward with the first inside `no_gradient_sync` vs both synced."""
    from muse_lm.training import fsdp

    model = trainer.model
    batches = [trainer.batches.batch(i) for i in (0, 1)]

    def backward(x, y):
        model(x, y).backward()

    with fsdp.no_gradient_sync(model):
        backward(*batches[0])
    grads_after_unsynced = sum(p.grad is not None for p in model.parameters())
    backward(*batches[1])
    accumulated = [fsdp.local(p.grad).clone() for p in model.parameters()]
    trainer.optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        backward(*batch)
    synced = [fsdp.local(p.grad) for p in model.parameters()]
    trainer.optimizer.zero_grad(set_to_none=True)
    diff = max(float((a - b).abs().max()) for a, b in zip(accumulated, synced))
    return {"grads_after_unsynced_backward": grads_after_unsynced, "max_abs_diff_vs_synced": diff}


def _stale_view_of_the_run_directory() -> None:
    """Rank 1 sees no checkpoints (were it to look for one itself, it would find nothing)."""
    import muse_lm.training.recovery as recovery
    import muse_lm.training.trainer as trainer_module
    from muse_lm.errors import CheckpointError

    def nothing(run_dir):
        raise CheckpointError(f"{run_dir}: no checkpoint (stale view)")

    recovery.resolve_checkpoint_dir = nothing
    recovery.list_checkpoints = trainer_module.list_checkpoints = lambda run_dir: []


def _train_worker(out: Path, args: dict) -> None:
    """One rank of the rollback run (under torchrun)."""
    import safetensors.torch

    from muse_lm.training import RunOptions, distributed, fsdp
    from muse_lm.training.recovery import EventLog
    from muse_lm.training.run import build_trainer, plan_run
    from muse_lm.training.stability import StabilityConfig

    options = RunOptions(preset="tiny", data=args["corpus"], out=str(out / "run"), steps=args["steps"],
                         overrides=args["overrides"], progress=False, device="cpu", faults=args["faults"],
                         parallel="fsdp")
    info = distributed.setup(torch.device("cpu"), single_rank_group=True)
    trainer = None
    try:
        trainer = build_trainer(plan_run(options, info), options, torch.device("cpu"), info,
                                stability=StabilityConfig(stats_every=2), parallel="fsdp")
        no_sync = _no_sync_check(trainer)
        events = EventLog(out / f"events.rank{info.rank}.jsonl")
        trainer.policy.events = events  # every rank logs its own decisions
        reads = []
        load_file = safetensors.torch.load_file
        safetensors.torch.load_file = lambda *a, **k: reads.append(a) or load_file(*a, **k)
        if info.rank == 1:
            _stale_view_of_the_run_directory()
        counts = {"steps": 0, "unsynced": 0}
        no_gradient_sync, train_step = fsdp.no_gradient_sync, trainer.train_step
        fsdp.no_gradient_sync = lambda m: counts.__setitem__("unsynced", counts["unsynced"] + 1) or no_gradient_sync(m)
        trainer.train_step = lambda: counts.__setitem__("steps", counts["steps"] + 1) or train_step()
        trainer.fit(stop_at=args["steps"] - 1)  # its last metrics line was a step before: a window is open
        window = trainer.train_state()["log_window"]  # collective, as in a checkpoint
        local = [p.to_local() for p in trainer.model.parameters()]
        result = {"events": events.read(), "step": trainer.step, "no_sync": no_sync, "train_steps": counts["steps"],
                  "unsynced_micro_batches": counts["unsynced"],
                  "finite": all(bool(torch.isfinite(t).all()) for t in local), "full_weight_reads": len(reads),
                  "monitor": trainer.monitor.state_dict(),
                  "log_window": {"sums": window["sums"].tolist(), "steps": window["steps"],
                                 "rank_sums": [s.tolist() for s in window["rank_sums"]]}}
        (out / f"rank{info.rank}.json").write_text(json.dumps(result))
        distributed.barrier(info)
    finally:
        trainer = None  # free the mesh's process group before teardown (see run.train)
        gc.collect()
        distributed.teardown()


if __name__ == "__main__":
    workers = {"save": _save_worker, "train": _train_worker, "fit": _fit_worker}
    if len(sys.argv) != 4 or sys.argv[1] not in workers:
        raise SystemExit("usage: test_distributed_failures.py save|train|fit OUT ARGS_JSON")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    workers[sys.argv[1]](Path(sys.argv[2]), json.loads(sys.argv[3]))

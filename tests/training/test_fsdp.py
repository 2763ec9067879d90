"""DDP and FSDP2 on the CPU (gloo, 2 processes under torchrun): losses equal one process on the same
global batch; sharded (DCP) checkpoints resume at another world size (2 -> 1 and 1 -> 2) and
exactly at the same one, and their model.safetensors loads through from_pretrained; a NaN on one
rank makes both ranks take the same recovery steps.

Run as a script (`torchrun ... test_fsdp.py worker OUT ARGS_JSON`), this file is the worker of
the recovery test: it trains through the library API so that each rank can log its own events.
"""

from __future__ import annotations

import gc
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 6
# Global batch 4 rows: 2 ranks x micro_batch 2, or 1 process x micro_batch 4; grad_accum 2. A metrics
# line every 2 steps and a checkpoint every 3: the step-3 checkpoint holds a half-full log window, so
# the resume tests check that the saved window sums are the ranks' reduced ones.
COMMON = {"grad_accum": 2, "checkpoint_every": 3, "log_every": 2}
# What depends only on the global batch (activation statistics are of rank 0's rows; timings vary).
_GLOBAL = ("step", "loss", "ce", "aux", "grad_norm", "lr", "eval_loss", "eval_ppl", "eval_tokens")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port())]


def _sets(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _muse_train_2(env: dict, out, *args: str) -> None:
    """`muse train` on 2 gloo ranks with micro_batch 2 (a global batch of 4 rows)."""
    _run([*_torchrun(), "-m", "muse_lm", "train", "--out", str(out), "--no-progress", "--device", "cpu", *args,
          "--set", "micro_batch=2"], env)


def _lines(run_dir: Path) -> list[dict]:
    from muse_lm.training.metrics import read_metrics

    return [{k: r[k] for k in _GLOBAL if k in r} for r in read_metrics(run_dir / "metrics.jsonl")]


def _assert_close_metrics(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), x["step"]
        for key in x:
            if isinstance(y[key], float):
                assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-7), (x["step"], key)
            else:
                assert x[key] == y[key], (x["step"], key)


def _back_to(run_dir: Path, step: int) -> None:
    """Makes `run_dir` look like a run stopped at `step` (its later checkpoints removed)."""
    for path in run_dir.glob("step-*"):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    (run_dir / "latest").write_text(f"step-{step:07d}\n")


# ---- runs shared by the tests ------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_run(small_corpus, tiny_defaults, tmp_path_factory):
    """One process, micro_batch 4: the reference (single-process checkpoint format)."""
    from muse_lm.training import RunOptions, train

    out = tmp_path_factory.mktemp("single") / "run"
    overrides = {**tiny_defaults, **COMMON, "micro_batch": 4}
    train(RunOptions(preset="tiny", data=str(small_corpus), out=str(out), steps=STEPS, overrides=overrides,
                     progress=False, device="cpu"))
    return out


@pytest.fixture(scope="module")
def fsdp_run(small_corpus, tiny_cli_sets, cli_env, tmp_path_factory):
    """FSDP2 on 2 ranks, with activation checkpointing (it must not change the numbers)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _muse_train_2(cli_env, out, "--data", str(small_corpus), *tiny_cli_sets, *_sets(COMMON), "--preset", "tiny",
                  "--steps", str(STEPS), "--parallel", "fsdp", "--set", "activation_checkpointing=true")
    return out


# ---- same numbers as one process ---------------------------------------------------------------
def test_fsdp_matches_one_process(fsdp_run, single_run):
    _assert_close_metrics(_lines(fsdp_run), _lines(single_run), rel=1e-5)
    config = json.loads((fsdp_run / f"step-{STEPS:07d}" / "config.json").read_text())
    assert config["run"]["world_size"] == 2 and config["run"]["parallel"] == "fsdp"
    assert not (fsdp_run / "events.jsonl").exists()  # a healthy run: no recovery action


def test_ddp_matches_one_process(single_run, small_corpus, tiny_cli_sets, cli_env, tmp_path):
    out = tmp_path / "ddp"
    _muse_train_2(cli_env, out, "--data", str(small_corpus), *tiny_cli_sets, *_sets(COMMON), "--preset", "tiny",
                  "--steps", str(STEPS), "--parallel", "ddp")
    _assert_close_metrics(_lines(out), _lines(single_run), rel=1e-5)
    assert (out / f"step-{STEPS:07d}" / "dcp" / ".metadata").is_file()  # ddp saves through DCP too


# ---- checkpoints -------------------------------------------------------------------------------
def test_sharded_checkpoint_layout_and_from_pretrained(fsdp_run):
    from muse_lm.models import MuseLM
    from muse_lm.training.dcp import load_sharded_state

    ckpt = fsdp_run / f"step-{STEPS:07d}"
    listed = json.loads((ckpt / "checksums.json").read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "train_state.pt", "dcp/.metadata"} <= set(listed)
    assert sum(name.endswith(".distcp") for name in listed) == 2  # one shard file per rank
    assert torch.load(ckpt / "train_state.pt", weights_only=False)["optimizer"] is None  # it is in dcp/
    model = MuseLM.from_pretrained(fsdp_run)  # the run directory, as eval / generate read it
    full = load_file(ckpt / "model.safetensors")
    assert all(model.state_dict()[k].equal(v) for k, v in full.items())
    # The DCP shards hold the same weights, loadable in a plain process without a process group.
    other = MuseLM(model.config)
    optimizer = torch.optim.AdamW(other.parameters(), lr=1e-3)
    load_sharded_state(ckpt, other, optimizer)
    assert all(other.state_dict()[k].equal(v) for k, v in full.items())
    assert all(float(s["step"]) == STEPS for s in optimizer.state.values())


def test_two_rank_checkpoint_continues_on_one_process(fsdp_run, small_corpus, tmp_path):
    """2 -> 1: resume the FSDP run's step-3 checkpoint in one process with the same global batch."""
    from muse_lm.training import RunOptions, train

    split = tmp_path / "split"
    shutil.copytree(fsdp_run, split)
    _back_to(split, 3)
    result = train(RunOptions(data=str(small_corpus), out=str(split), resume=True, overrides={"micro_batch": 4},
                              progress=False, device="cpu"))
    assert result.step == STEPS
    assert not (split / f"step-{STEPS:07d}" / "dcp").exists()  # one process writes the plain format
    _assert_close_metrics(_lines(split), _lines(fsdp_run), rel=1e-5)
    a = load_file(split / f"step-{STEPS:07d}" / "model.safetensors")
    b = load_file(fsdp_run / f"step-{STEPS:07d}" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


def test_one_process_checkpoint_continues_on_two_ranks(single_run, cli_env, tmp_path):
    """1 -> 2: a single-process checkpoint (no dcp/) is sharded over 2 FSDP ranks on resume."""
    back = tmp_path / "back"
    shutil.copytree(single_run, back)
    _back_to(back, 3)
    _muse_train_2(cli_env, back, "--resume", "--parallel", "fsdp")
    _assert_close_metrics(_lines(back), _lines(single_run), rel=1e-5)
    assert (back / f"step-{STEPS:07d}" / "dcp" / ".metadata").is_file()


def test_resume_at_the_same_world_size_is_exact(fsdp_run, cli_env, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(fsdp_run, again)
    _back_to(again, 3)
    _muse_train_2(cli_env, again, "--resume", "--parallel", "fsdp")
    assert _lines(again) == _lines(fsdp_run)  # compared with ==
    a = load_file(again / f"step-{STEPS:07d}" / "model.safetensors")
    b = load_file(fsdp_run / f"step-{STEPS:07d}" / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)


# ---- recovery across ranks ---------------------------------------------------------------------
def test_rank_targeted_fault_fires_on_its_rank_only():
    from muse_lm.errors import ConfigError
    from muse_lm.training.faults import FaultPlan, parse_fault_target

    assert parse_fault_target("nan_loss@5:rank1") == ("nan_loss", 5, 1)
    plans = [FaultPlan.parse(["nan_loss@5:rank1"]) for _ in range(2)]
    losses = []
    for rank, plan in enumerate(plans):
        plan.rank = rank
        losses.append(float(plan.corrupt_loss(5, torch.tensor(1.0))))
    assert losses[0] == 1.0 and losses[1] != losses[1]  # NaN on rank 1 only
    assert plans[0].fired == plans[1].fired == {("nan_loss", 5)}  # both remember it fired
    with pytest.raises(ConfigError, match="ranks 0..1"):
        FaultPlan.parse(["nan_loss@5:rank2"]).check_ranks(2)
    with pytest.raises(ConfigError, match="rankN"):
        parse_fault_target("nan_loss@5:gpu1")


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_nan_on_one_rank_gives_the_same_recovery_on_both(parallel, small_corpus, tiny_defaults, cli_env, tmp_path):
    """Four NaN losses on rank 1 only climb the ladder to a rollback, then a blown-up block on
    rank 1 only to a re-init of that block (singled out from the sharded statistics); the lagged
    (CUDA-style, fused AdamW found_inf) monitor path is used. Under DDP the replicas must still be
    equal afterwards (the re-drawn weights come from rank 0)."""
    faults = [f"nan_loss@{s}:rank1" for s in (6, 7, 8, 9)] + ["bad_layer@12:rank1"]
    args = {"corpus": str(small_corpus), "overrides": {**tiny_defaults, "micro_batch": 2}, "faults": faults,
            "steps": 16, "parallel": parallel}
    _run([*_torchrun(), __file__, "worker", str(tmp_path), json.dumps(args)], cli_env)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    events = [[(e["step"], e["action"], e.get("to_step"), e.get("layers")) for e in r["events"]] for r in ranks]
    assert events[0] == events[1]
    assert [e[1] for e in events[0]] == ["skip", "lr_cut", "clip", "rollback", "rollback", "reinit"]
    assert events[0][-1][3] == ["blocks.0"]
    expected = sorted([["nan_loss", s] for s in (6, 7, 8, 9)] + [["bad_layer", 12]])
    assert all(r["step"] == 16 and r["fired"] == expected and r["finite"] for r in ranks)
    if parallel == "ddp":
        assert ranks[0]["weights"] == ranks[1]["weights"]


def _worker(out: Path, args: dict) -> None:
    """One rank of the recovery test (run under torchrun)."""
    from muse_lm.training import RunOptions, distributed
    from muse_lm.training.recovery import EventLog, SnapshotKeeper
    from muse_lm.training.run import build_trainer, plan_run
    from muse_lm.training.stability import StabilityConfig

    options = RunOptions(preset="tiny", data=args["corpus"], out=str(out / "run"), steps=args["steps"],
                         overrides=args["overrides"], progress=False, device="cpu", faults=args["faults"],
                         parallel=args["parallel"])
    info = distributed.setup(torch.device("cpu"), single_rank_group=True)
    trainer = None
    try:
        trainer = build_trainer(plan_run(options, info), options, torch.device("cpu"), info,
                                stability=StabilityConfig(lag=1), parallel=args["parallel"])
        events = EventLog(out / f"events.rank{info.rank}.jsonl")
        trainer.policy.events = events  # every rank logs its own decisions
        trainer.snapshots = SnapshotKeeper(2, 1)  # a confirmed snapshot exists before the faults
        trainer.fit()
        local = [p.to_local() if hasattr(p, "to_local") else p for p in trainer.model.parameters()]
        finite = all(bool(torch.isfinite(t).all()) for t in local)
        result = {"events": events.read(), "step": trainer.step, "fired": trainer.faults.state_dict(),
                  "finite": finite, "weights": [float(t.double().sum()) for t in local]}
        (out / f"rank{info.rank}.json").write_text(json.dumps(result))
        distributed.barrier(info)
    finally:
        trainer = None  # free the mesh's process group before teardown (see run.train)
        gc.collect()
        distributed.teardown()


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        raise SystemExit("usage: test_fsdp.py worker OUT ARGS_JSON (run under torchrun)")
    _worker(Path(sys.argv[2]), json.loads(sys.argv[3]))


def test_a_device_that_contradicts_torchrun_is_refused_before_touching_cuda(monkeypatch):
    from muse_lm.errors import ConfigError
    from muse_lm.training import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="LOCAL_RANK 0"):
        distributed.setup(torch.device("cuda", 1))

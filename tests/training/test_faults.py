"""Fault injection: every fault kind is survived; one fault of each recoverable kind costs under
2% of held-out loss; crashes (also mid-save, also kill -9) never leave an unloadable `latest`,
and a crashed run resumes to the end."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from muse_lm.errors import ConfigError
from muse_lm.io import list_checkpoints
from muse_lm.training import RunOptions, train
from muse_lm.training.checkpoint import load_checkpoint
from muse_lm.training.faults import CRASH_EXIT_CODE, FaultPlan, parse_fault
from muse_lm.training.recovery import EVENTS_FILE, EventLog


def test_fault_specs_parse_or_fail_clearly():
    assert parse_fault("nan_loss@50") == ("nan_loss", 50)
    assert FaultPlan.parse(["crash@3", "bad_layer@0"]).faults == [("crash", 3), ("bad_layer", 0)]
    for bad in ("nan_loss", "nan_loss@", "nan_loss@-1", "nan@5", "crash@1.5", "@3", "loss_spike@x"):
        with pytest.raises(ConfigError, match="--inject-fault"):
            parse_fault(bad)
    with pytest.raises(ConfigError, match="--inject-fault"):
        RunOptions(faults=["boom@1"])


def test_a_fault_fires_once():
    plan = FaultPlan([("nan_loss", 3)])
    assert plan.due("nan_loss", 3) and not plan.due("nan_loss", 3)
    replay = FaultPlan([("nan_loss", 3)])
    replay.load_state_dict(plan.state_dict())
    assert not replay.due("nan_loss", 3)


def _train(corpus, out, overrides, faults=(), steps=80):
    return train(RunOptions(preset="tiny", data=str(corpus), out=str(out), overrides=overrides, steps=steps,
                            seed=1, progress=False, faults=list(faults)))


def test_each_recoverable_fault_is_survived_within_two_percent(small_corpus, tiny_overrides, tmp_path):
    tiny_overrides.update(eval_every=40, eval_batches=8, log_every=10)
    clean = _train(small_corpus, tmp_path / "clean", tiny_overrides)
    faults = ["nan_loss@30", "inf_grad@40", "loss_spike@50", "bad_layer@60"]
    faulty = _train(small_corpus, tmp_path / "faulty", tiny_overrides, faults)
    assert faulty.step == clean.step == 80
    assert abs(faulty.end_eval_loss - clean.end_eval_loss) / clean.end_eval_loss < 0.02
    events = EventLog(tmp_path / "faulty" / EVENTS_FILE).read()
    steps = {e["step"] for e in events}
    assert {30, 40, 50, 60} <= steps
    assert all({"step", "action", "reason"} <= set(e) for e in events)
    assert any(e["action"] in ("rollback", "reinit") for e in events)
    assert not (tmp_path / "clean" / EVENTS_FILE).exists()  # a healthy run raises no alarm
    state = load_checkpoint(tmp_path / "faulty").train_state
    assert sorted(map(tuple, state["faults_fired"])) == sorted(parse_fault(f) for f in faults)
    assert state["recovery"]["level"] >= 0 and state["data_offset"] > 0


def _cli(args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "muse_lm", "train", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("fault,latest", [("crash@12", "step-0000010"), ("crash_in_save@10", "step-0000005")])
def test_crash_leaves_a_loadable_latest_and_the_run_resumes(fault, latest, small_corpus, tiny_cli_sets,
                                                           cli_env, tmp_path):
    out = tmp_path / "run"
    common = ["--preset", "tiny", "--data", str(small_corpus), "--out", str(out), "--no-progress",
              *tiny_cli_sets, "--set", "checkpoint_every=5", "--set", "eval_every=10"]
    crashed = _cli([*common, "--steps", "20", "--inject-fault", fault], cli_env)
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
    assert "injected fault" in crashed.stderr
    assert (out / "latest").read_text().strip() == latest
    if fault.startswith("crash_in_save"):  # it died mid-write: the partial folder is hidden
        assert list(out.glob(".step-0000010.tmp-*")) and not (out / "step-0000010").exists()
    assert load_checkpoint(out).train_state["step"] == int(latest[-2:])
    resumed = _cli(["--out", str(out), "--resume", "--no-progress"], cli_env)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out).train_state["step"] == 20


_SAVER = textwrap.dedent("""
    import sys, torch
    from muse_lm.training.checkpoint import save_checkpoint
    run, start = sys.argv[1], int(sys.argv[2])
    state = {"w": torch.randn(512, 1024)}
    print("ready", flush=True)
    for step in range(start, start + 10_000):
        state["w"][0, 0] = step
        save_checkpoint(run, step, model_state=state, config={"step": step}, tokenizer_json="{}",
                        train_state={"step": step}, keep=2)
""")


@pytest.mark.slow
def test_kill_9_during_saves_never_leaves_an_unloadable_latest(cli_env, tmp_path):
    run = tmp_path / "run"
    rng = random.Random(0)
    step = 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(run), str(step)], env=cli_env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (run / "latest").exists():
            ckpt = load_checkpoint(run)  # verifies every checksum
            assert ckpt.train_state["step"] == ckpt.config["step"] == int(ckpt.model_state["w"][0, 0])
            step = ckpt.train_state["step"] + 1
    assert step > 0
    for path in list_checkpoints(run):  # every visible step-* folder is complete
        assert load_checkpoint(path).train_state["step"] == int(path.name[5:])

"""DDP on the CPU (gloo): 2 processes under torchrun, each with half of the global batch, give
the losses of one process with the whole batch; only rank 0 writes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from muse_lm.training.metrics import read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _muse_train(launcher: list[str], corpus, out, sets: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [*launcher, "train", "--preset", "tiny", "--data", str(corpus), "--steps", "8", "--out", str(out),
           "--no-progress", "--device", "cpu", *sets]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_gloo_ranks_match_one_process(small_corpus, tiny_cli_sets, cli_env, tmp_path):
    # grad_accum 2 exercises no_sync on the first micro-batch of every step.
    sets = [*tiny_cli_sets, "--set", "grad_accum=2", "--set", "checkpoint_every=4"]
    env = {**cli_env, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "muse_lm"]
    ddp = _muse_train(torchrun, small_corpus, tmp_path / "ddp", [*sets, "--set", "micro_batch=2"], env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = _muse_train([sys.executable, "-m", "muse_lm"], small_corpus, tmp_path / "single",
                         [*sets, "--set", "micro_batch=4"], env)
    assert single.returncode == 0, single.stderr[-3000:]

    ddp_records = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    one_records = read_metrics(tmp_path / "single" / "metrics.jsonl")
    # Rank 0 alone writes: one line per log/eval point, not one per rank.
    assert [r["step"] for r in ddp_records] == [r["step"] for r in one_records]
    for a, b in zip(ddp_records, one_records):
        for key in ("loss", "ce", "aux", "grad_norm", "eval_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
        assert a.get("lr") == b.get("lr")
        if "eval_tokens" in b:
            assert a["eval_tokens"] == b["eval_tokens"]
    assert ddp.stdout.count("run directory:") == 1  # one summary, from rank 0
    assert sorted(p.name for p in (tmp_path / "ddp").glob("step-*")) == ["step-0000004", "step-0000008"]
    config = json.loads((tmp_path / "ddp" / "step-0000008" / "config.json").read_text())
    assert config["run"]["world_size"] == 2

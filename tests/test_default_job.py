"""The README's main job, end to end: `muse train` with no arguments on the embedded corpus (the tiny
preset on a CPU), then `muse generate` from its run. Slow (~4 minutes on 2 cores) and worth it: it is
the first thing every user runs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_default_job_learns_python_and_generates_it(tmp_path, cli_env):
    train = subprocess.run([sys.executable, "-m", "muse_lm", "train"], cwd=tmp_path, env=cli_env,
                           capture_output=True, text=True, timeout=1500)
    assert train.returncode == 0, train.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("tiny-")
    run = runs[0]
    assert str(run.name) in train.stdout and "muse generate" in train.stdout
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 600
    assert evals[0]["eval_loss"] - evals[-1]["eval_loss"] >= 2.5, evals
    assert (run / "loss.png").stat().st_size > 1000

    gen = subprocess.run([sys.executable, "-m", "muse_lm", "generate", "--checkpoint", str(run), "--prompt",
                          "def ", "--max-new-tokens", "150", "--seed", "0", "--temperature", "0.8"],
                         env=cli_env, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    text = gen.stdout
    assert text.startswith("def ")
    # Python source, visibly: keywords, calls, indentation.
    python_markers = [r"\bself\b", r"\breturn\b", r"\bdef \w+\(", r"\n {4}\S", r"\w\(", r":\n", r"\bif\b|\bfor\b"]
    hits = [m for m in python_markers if re.search(m, text)]
    assert len(hits) >= 4, (hits, text)
    assert Path(run / "latest").exists()

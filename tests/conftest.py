"""Shared test setup: import path, hermetic cache directory, GPU marker."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Tests run without an install step: use src/ unless muse_lm is installed already.
if importlib.util.find_spec("muse_lm") is None:
    sys.path.insert(0, str(SRC))


@pytest.fixture(scope="session", autouse=True)
def tmp_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MUSE_CACHE_DIR -> a temp dir for the whole session, so tests never read or fill the
    user's ~/.cache/muse_lm (subprocesses inherit it through the environment)."""
    path = tmp_path_factory.mktemp("muse_cache")
    previous = os.environ.get("MUSE_CACHE_DIR")
    os.environ["MUSE_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("MUSE_CACHE_DIR", None)
    else:
        os.environ["MUSE_CACHE_DIR"] = previous


# A model and run small enough that a training step takes milliseconds on one CPU core.
TINY_OVERRIDES = {
    "d_model": 32, "n_layers": 1, "n_heads": 2, "max_rank": 8, "min_rank": 2, "bk_heads": 2, "tt_rank": 4,
    "vocab_size": 300, "seq_len": 32, "micro_batch": 4, "log_every": 1, "eval_every": 5, "eval_batches": 2,
    "warmup_steps": 2, "lr": 1e-2,
}
# Not colorsys.py: its source differs between Python 3.11.2 and 3.11.7, and with 3.11.7's the healthy
# tiny run of tests/training/test_faults.py had one gradient-norm spike the monitor skipped. The
# files kept are byte-identical in both (3.12.1's run is healthy too).
_CORPUS_FILES = ("json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "textwrap.py",
                 "string.py", "shlex.py", "bisect.py", "heapq.py", "fnmatch.py", "glob.py")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of a dozen standard-library sources (~150 KB): enough for a 300-token
    tokenizer in a second and for tiny runs whose held-out loss visibly falls."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in _CORPUS_FILES:
        shutil.copyfile(stdlib / rel, root / rel.replace("/", "_"))
    return root


@pytest.fixture(scope="session")
def tiny_defaults() -> Mapping[str, object]:
    """`--set` overrides that shrink any preset to a milliseconds-per-step run (read-only;
    for module- and session-scoped fixtures)."""
    return MappingProxyType(TINY_OVERRIDES)


@pytest.fixture
def tiny_overrides(tiny_defaults) -> dict:
    """A fresh, mutable copy of `tiny_defaults`."""
    return dict(tiny_defaults)


@pytest.fixture(scope="session")
def tiny_cli_sets() -> list[str]:
    """The same overrides as `muse train` arguments: ["--set", "d_model=32", ...] (a later
    `--set` of the same key wins)."""
    return [arg for key, value in TINY_OVERRIDES.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="session")
def cli_env(tmp_cache: Path) -> dict:
    """Environment for `python -m muse_lm` subprocesses: src/ first on PYTHONPATH, the
    session's cache directory."""
    env = {**os.environ, "MUSE_CACHE_DIR": str(tmp_cache)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def interpreter_run():
    """Runs a test file again in a child pytest with TRITON_INTERPRET=1 and asserts it passed.

    Triton reads TRITON_INTERPRET when its kernels are defined, so a file's interpreter tests
    run in a child process (where they are not skipped) started by its parent test."""

    def run(test_file: str) -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        src = str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert " passed" in proc.stdout and "failed" not in proc.stdout

    return run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu`-marked tests are skipped where CUDA is not available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

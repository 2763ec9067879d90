"""Where a measurement came from: the repository's git commit (benchmarks record it in their JSON)."""

from __future__ import annotations

import subprocess
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]


def git(*args: str) -> str | None:
    """Output of `git ARGS` in the repository root, or None outside a checkout / without git."""
    try:
        out = subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """HEAD's hash, with "+dirty" when the working tree has changes; "unknown" without git."""
    head = git("rev-parse", "HEAD")
    if head is None:
        return "unknown"
    return head + ("+dirty" if git("status", "--porcelain") else "")

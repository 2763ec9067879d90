"""Run metrics: `metrics.jsonl` (one JSON object per log or eval point), `loss.png`, memory
readings and the progress display."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from pathlib import Path

import torch

log = logging.getLogger("muse_lm")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsWriter:
    """Appends one JSON line per record to `<run_dir>/metrics.jsonl`, flushed at once so a
    crash loses nothing that was logged."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE

    def truncate_after(self, step: int) -> int:
        """Drops records with `step > step` (a resumed run replays those steps from its
        checkpoint, so they belong to a discarded trajectory). Returns how many were dropped."""
        if not self.path.exists():
            return 0
        records = read_metrics(self.path)
        kept = [r for r in records if r.get("step", 0) <= step]
        dropped = len(records) - len(kept)
        if dropped:
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        return dropped

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl, in file order."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path: Path, png_path: Path) -> None:
    """Writes the train and held-out loss curves of a metrics.jsonl to `png_path` (atomically).

    Uses the Agg canvas directly instead of pyplot, so no global backend state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path) if Path(metrics_path).exists() else []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss", linewidth=1.5, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    if train or held:
        ax.legend()
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".png.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)


def memory_gib(device: torch.device) -> tuple[float, str]:
    """(GiB, label): peak CUDA memory allocated on a GPU, peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "gpu peak"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return rss * scale / 2**30, "rss peak"


class Progress:
    """A tqdm bar on stderr when it is a terminal; otherwise one log line per report, so that
    redirected output stays readable. Disabled entirely on ranks other than 0."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, file=sys.stderr, unit="step",
                            dynamic_ncols=True, leave=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def report(self, summary: str) -> None:
        """A per-log-step summary: the bar's postfix, or a log line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(summary, refresh=True)
        else:
            log.info(summary)

    def message(self, text: str) -> None:
        """A line that must stay visible (evals, checkpoints)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

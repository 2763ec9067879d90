"""Plots, markdown reports and the README tables of the model and memory parts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from muse_lm.bench_quality import (
    _figure,
    _fmt,
    _save,
    _where,
)
from muse_lm.errors import ConfigError
from muse_lm.io import write_text_atomic

log = logging.getLogger("muse_lm")



# ---- plots and reports -------------------------------------------------------------------------
def plot_model(record: dict, path: Path) -> None:
    fig, (speed_ax, mem_ax) = _figure(2)
    for name, rec in record["models"].items():
        ok = [p for p in rec["points"] if "step_s" in p]
        lengths = [p["seq_len"] for p in ok]
        speed_ax.plot(lengths, [p["tokens_per_s"] / 1e3 for p in ok], "o-", label=name)
        if all(p["peak_gib"] is not None for p in ok):
            mem_ax.plot(lengths, [p["peak_gib"] for p in ok], "o-", label=name)
    for ax, label in ((speed_ax, "training tokens/s (k)"), (mem_ax, "peak GiB (reserved + context)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T (same tokens per step)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    _save(fig, path)


def _cell(p: dict | None, key: str, spec: str) -> str:
    if p is None or "skipped" in p:
        return "-"
    return "OOM" if "oom" in p else _fmt(p.get(key), spec)


def _graph_cell(rec: dict) -> str:
    """Whether the model's steps ran as captured CUDA graphs: True, False, or which points failed why."""
    states = {str(p["cuda_graph"]) for p in rec["points"] if "cuda_graph" in p}
    return "-" if not states else states.pop()[:80] if len(states) == 1 else "mixed: " + "; ".join(sorted(states))[:80]


def report_model(record: dict) -> str:
    models = record["models"]
    lengths = sorted({p["seq_len"] for rec in models.values() for p in rec["points"]})
    head = record["strong_head"]
    lines = [f"### model: training speed and memory against T ({record['settings']['tokens_per_step']:,} tokens "
             "per step)" + ("" if record["complete"] else " (INCOMPLETE: partial results)"), "", _where(record), "",
             "| model | params | non-emb | head | compiled | CUDA graph | log-log slope | time/token change "
             "| memory change |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rec in models.items():
        fit, comp = rec.get("fit") or {}, rec.get("compile", {})
        compiled = str(comp.get("compiled")) + (f" ({comp['error'][:60]})" if comp.get("error") else "")
        lines.append(f"| {name} | {rec['params'] / 1e6:.1f}M | {rec['non_embedding_params'] / 1e6:.2f}M | "
                     f"{rec['head']} | {compiled} | {_graph_cell(rec)} | {_fmt(fit.get('slope'), '.3f')} | "
                     f"{_fmt(fit.get('time_per_token_spread'), '+.1%')} | {_fmt(fit.get('peak_spread'), '+.1%')} |")
    for title, key, spec in (("tokens/s", "tokens_per_s", ",.0f"), ("peak GiB", "peak_gib", ".2f")):
        lines += ["", f"| {title} | " + " | ".join(f"T={t}" for t in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for name, rec in models.items():
            cells = [_cell(next((p for p in rec["points"] if p["seq_len"] == t), None), key, spec) for t in lengths]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"strong head: {head['impl']} (cut-cross-entropy {head['cut_cross_entropy']}"
              + "".join(f"; {k} {v:.1f} ms" for k, v in head["ms"].items()) + ")"]
    for c in record.get("criteria", []):
        verdict = {True: "met", False: "NOT met", None: "not measured"}[c["met"]]
        lines.append(f"- {c['what']}: {_fmt(c['value'], '.3f')} (target {c['target']}): {verdict}")
    return "\n".join(lines)


def plot_memory(record: dict, path: Path) -> None:
    fig, (ax,) = _figure(1)
    rows = [r for r in record["rows"] if r.get("budget_gib") is not None and "skipped" not in r]
    x = np.arange(len(rows))
    for offset, key, label in ((-0.27, "peak_gib", "measured peak"), (0.0, "estimate_gib", "muse estimate"),
                               (0.27, "limit_gib", "0.9 x budget")):
        ax.bar(x + offset, [r.get(key) or 0.0 for r in rows], width=0.27, label=label)
    ax.set_xticks(x, [r["preset"] for r in rows], rotation=20)
    ax.set_ylabel("GiB")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def report_memory(record: dict) -> str:
    yes, ckpt = {True: "yes", False: "NO", None: "-"}, {True: "yes", False: "no"}
    lines = ["### memory: presets at full size against their budgets" + ("" if record["full_size"] else
             " (REDUCED by --set: not a validation)") + ("" if record["complete"] else " (INCOMPLETE)"), "",
             _where(record), "",
             "| preset | run | params | seq x batch | ckpt | peak GiB | estimate GiB | estimate error | "
             "0.9 x budget | fits | estimate within 10% | tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['preset']} | skipped: {r['skipped']} |" + " |" * 10)
            continue
        batch = f"{r['micro_batch']} x {r['grad_accum']}" if r["kind"] == "training" else f"{r['batch']} (generate)"
        peak = "OOM" if "oom" in r else _fmt(r.get("peak_gib"), ".2f")
        lines.append(f"| {r['preset']} | {r['kind']} | {_fmt((r.get('params') or 0) / 1e6, '.1f')}M | "
                     f"{r['seq_len']} x {batch} | {ckpt.get(r.get('activation_checkpointing'), '-')} | {peak} | "
                     f"{_fmt(r.get('estimate_gib'), '.2f')} | {_fmt(r.get('estimate_error'), '+.1%')} | "
                     f"{_fmt(r.get('limit_gib'), '.1f')} | {yes[r.get('fits')]} | "
                     f"{yes[r.get('estimate_within_10pct')]} | {_fmt(r.get('tokens_per_s'), ',.0f')} |")
    lines += ["", "peak = max_memory_reserved + CUDA context (DESIGN.md); estimate = `muse estimate`"]
    return "\n".join(lines)


# ---- README ------------------------------------------------------------------------------------
README_PARTS = {"model": report_model, "memory": report_memory}


def update_readme(readme: Path, results: Path) -> list[str]:
    """Replaces the text between `<!-- bench-PART -->` and `<!-- /bench-PART -->` in `readme` with
    the report of `results/PART.json` (GPU, date and commit included), for each part whose JSON
    exists. Returns the parts written."""
    if not readme.is_file():
        raise ConfigError(f"--readme {readme} is not a file; give the README to update")
    text, done = readme.read_text(), []
    for part, report in README_PARTS.items():
        path = results / f"{part}.json"
        if not path.exists():
            continue
        begin, end = f"<!-- bench-{part} -->", f"<!-- /bench-{part} -->"
        if begin not in text or end not in text.split(begin, 1)[1]:
            raise ConfigError(f"{readme} has no {begin} ... {end} block; add the two lines where the {part} "
                              "table goes, then run this again")
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{report(json.loads(path.read_text()))}\n{end}{rest.split(end, 1)[1]}"
        done.append(part)
    write_text_atomic(readme, text)
    return done



"""The `muse` command: a real run through `python -m muse_lm`, eval/generate/presets/estimate
output contracts, and exit code 2 with one line for every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from muse_lm.cli import main
from muse_lm.presets import get_preset, list_presets

STEPS, STOP = 10, 6


def _muse(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "muse_lm", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def run_dir(small_corpus, tiny_cli_sets, cli_env, tmp_path_factory
            ) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny run stopped at step STOP of STEPS, trained through the real entry point."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = _muse(["train", "--preset", "tiny", "--data", str(small_corpus), "--steps", str(STEPS),
                  "--stop-at", str(STOP), "--out", str(out), "--seed", "1", *tiny_cli_sets], cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_train_prints_where_the_outputs_are(run_dir):
    out, proc = run_dir
    ckpt = out / f"step-{STOP:07d}"
    assert ckpt.is_dir() and (out / "latest").read_text().strip() == ckpt.name  # --stop-at checkpoints K
    assert not (out / f"step-{STEPS:07d}").exists()
    text = proc.stdout
    for expected in (f"run directory:     {out}", f"latest checkpoint: {ckpt}", str(out / "metrics.jsonl"),
                     str(out / "loss.png"), "held-out loss:", f"muse train --out {out} --resume",
                     f'muse generate --checkpoint {ckpt} --prompt "def "'):
        assert expected in text
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()
    assert "held-out loss" in proc.stderr  # progress and evals go to stderr


def test_eval_json_is_one_line_on_stdout(run_dir, capsys):
    out, _ = run_dir
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["tokens"] > 0 and record["perplexity"] == pytest.approx(2.718281828 ** record["loss"])
    assert record["step"] == STOP and record["same_corpus"] is True
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in evals if "eval_loss" in r][-1]
    assert record["loss"] == pytest.approx(last["eval_loss"], rel=1e-6)  # same held-out tokens


def test_eval_on_other_data_warns(run_dir, tmp_path, capsys):
    out, _ = run_dir
    other = tmp_path / "other.txt"
    other.write_text("def f(x):\n    return x + 1\n" * 50)
    assert main(["eval", "--checkpoint", str(out), "--data", str(other), "--json", "--batches", "1"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["same_corpus"] is False
    assert "warning" in captured.err and "not the corpus this model was trained on" in captured.err


def test_generate_prints_the_prompt_and_a_continuation(run_dir, capsys):
    out, _ = run_dir
    args = ["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ") and len(first.rstrip("\n")) > len("def ")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # --seed makes sampling repeatable


def test_generate_streams_the_same_text_as_generate_and_stops_at_stop(run_dir, capsys, monkeypatch):
    import torch

    from muse_lm.training.loading import load_trained
    from muse_lm.training.tokenizer import eos_id

    out, _ = run_dir
    args = ["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "3"]
    writes = []
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda text: writes.append(text) or real_write(text))
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert len([w for w in writes if w]) > 2  # printed piece by piece, not once at the end
    trained = load_trained(out, torch.device("cpu"))
    tok, eos = trained.tokenizer, eos_id(trained.tokenizer)
    prompt = tok.encode("def ", add_special_tokens=False).ids
    ids = trained.model.generate(torch.tensor([prompt]), 20, temperature=0.8, seed=3, eos_token_id=eos)
    new = [i for i in ids[0, len(prompt):].tolist() if i != eos]
    assert streamed == "def " + tok.decode(new) + "\n"
    stop = streamed[len("def ") + 3:len("def ") + 5]
    if stop.strip():
        assert main([*args, "--stop", stop]) == 0
        stopped = capsys.readouterr().out
        assert stopped == streamed[: streamed.index(stop, len("def "))] + "\n"


def test_generate_repetition_penalty_gives_the_api_text(run_dir, capsys):
    import torch

    from muse_lm.training.loading import load_trained
    from muse_lm.training.tokenizer import eos_id

    out, _ = run_dir
    args = ["generate", "--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "24", "--temperature", "0"]
    assert main([*args, "--repetition-penalty", "3"]) == 0
    penalized = capsys.readouterr().out
    trained = load_trained(out, torch.device("cpu"))
    tok, eos = trained.tokenizer, eos_id(trained.tokenizer)
    prompt = tok.encode("def ", add_special_tokens=False).ids
    ids = trained.model.generate(torch.tensor([prompt]), 24, temperature=0, repetition_penalty=3.0, eos_token_id=eos)
    assert penalized == "def " + tok.decode([i for i in ids[0, len(prompt):].tolist() if i != eos]) + "\n"
    assert main(args) == 0
    assert capsys.readouterr().out != penalized  # plain greedy repeats one whitespace token here


def test_generate_stream_restores_mode_and_grad(run_dir):
    import torch

    from muse_lm.training.loading import load_trained

    trained = load_trained(run_dir[0], torch.device("cpu"))
    model = trained.model.train()
    steps = model.generate_stream(torch.tensor([[1, 2, 3]]), 5, temperature=0.0)
    next(steps)
    assert torch.is_grad_enabled()  # grad is off inside each step only
    steps.close()
    assert model.training and model.check_ids


def test_presets_lists_every_preset_with_its_aliases(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    for name in list_presets():
        if name == "auto":
            assert "auto" in text
            continue
        assert name in rows
        for alias in get_preset(name).aliases:
            assert alias in rows[name]


def test_estimate_json(capsys):
    assert main(["estimate", "--preset", "tiny", "--json", "--set", "n_layers=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    est = json.loads(lines[0])
    assert est["params"] > est["non_embedding_params"] > 0 and est["peak_gib"] > 0
    assert main(["estimate", "--preset", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] > est["params"]  # 4 layers > 2


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def bad_paths(tmp_path, run_dir) -> dict[str, str]:
    empty = tmp_path / "empty"
    empty.mkdir()
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    garbage = tmp_path / "tok.json"
    garbage.write_text("this is not json")
    a_file = tmp_path / "note.txt"
    a_file.write_text("hello\n")
    return {"empty": str(empty), "binary": str(binary), "garbage": str(garbage), "file": str(a_file),
            "missing": str(tmp_path / "missing"), "run": str(run_dir[0]), "fresh": str(tmp_path / "fresh")}


BAD_INPUTS = {
    "unknown preset": ["train", "--preset", "nope"],
    "missing data": ["train", "--data", "{missing}"],
    "empty data": ["train", "--data", "{empty}", "--out", "{fresh}"],
    "binary data": ["train", "--data", "{binary}", "--out", "{fresh}"],
    "missing tokenizer": ["train", "--tokenizer", "{missing}"],
    "unreadable tokenizer": ["train", "--tokenizer", "{garbage}", "--data", "{corpus}", "--out", "{fresh}"],
    "zero steps": ["train", "--steps", "0"],
    "negative steps": ["train", "--steps", "-3"],
    "non-integer steps": ["train", "--steps", "ten"],
    "stop-at after steps": ["train", "--steps", "5", "--stop-at", "6"],
    "stop-at after preset steps": ["train", "--preset", "tiny", "--stop-at", "100000"],
    "unknown --set key": ["train", "--set", "d_modle=64"],
    "malformed --set": ["train", "--set", "d_model"],
    "wrongly typed --set": ["train", "--set", "d_model=wide"],
    "invalid --set value": ["train", "--set", "dtype=fp8"],
    "vocab too small for a tokenizer": ["train", "--set", "vocab_size=100", "--data", "{corpus}", "--out", "{fresh}"],
    "out has checkpoints": ["train", "--out", "{run}", "--data", "{corpus}"],
    "resume without checkpoints": ["train", "--out", "{fresh}", "--resume"],
    "resume without out": ["train", "--resume"],
    "eval: not a checkpoint": ["eval", "--checkpoint", "{empty}"],
    "eval: missing checkpoint": ["eval", "--checkpoint", "{missing}"],
    "eval: missing data": ["eval", "--checkpoint", "{run}", "--data", "{missing}"],
    "generate: a file": ["generate", "--checkpoint", "{file}", "--prompt", "x"],
    "generate: negative temperature": ["generate", "--checkpoint", "{run}", "--prompt", "x",
                                       "--temperature", "-1"],
    "generate: top-p above 1": ["generate", "--checkpoint", "{run}", "--prompt", "x", "--top-p", "1.5"],
    "generate: zero repetition penalty": ["generate", "--checkpoint", "{run}", "--prompt", "x",
                                          "--repetition-penalty", "0"],
    "estimate: unknown preset": ["estimate", "--preset", "99gb"],
    "unknown command": ["fly"],
    "unknown option": ["train", "--stepz", "3"],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case, bad_paths, small_corpus, tiny_cli_sets, capsys, tmp_path,
                                        monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default runs/ directory would land here
    paths = {**bad_paths, "corpus": str(small_corpus)}
    args = [a.format(**paths) for a in BAD_INPUTS[case]]
    if args[0] == "train":  # tiny sets first: the case's own --set must win
        args = ["train", *tiny_cli_sets, *args[1:]]
    run = Path(paths["run"])
    before = _tree_digest(run)
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("muse: error: "), captured.err
    assert _tree_digest(run) == before  # nothing already written is touched
    assert not Path(paths["fresh"]).exists()  # a failed run leaves no directory behind
    assert not (tmp_path / "runs").exists()


def test_bad_input_exit_code_through_the_real_entry_point(cli_env):
    proc = _muse(["train", "--preset", "nope"], cli_env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("muse: error: unknown preset 'nope'")


def test_the_cli_starts_without_loading_the_server_stack():
    """`muse train` must not need starlette / uvicorn: the serve command loads them when it runs."""
    import subprocess
    import sys

    code = "import sys, muse_lm.cli; print(sorted(m for m in ('starlette', 'uvicorn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

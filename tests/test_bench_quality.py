"""CPU smoke tests of the quality harness (`muse bench --only ppl,ablate`) at tiny size, and the
"fixed" rank-gate mode its ablation uses."""

import argparse
import json
import math

import pytest
import torch
from torch._dynamo.exc import TorchDynamoException

from muse_lm import MuseConfig, MuseLM, get_preset
from muse_lm.bench_quality import (
    ABLATIONS,
    PARTS,
    Compiler,
    QualitySettings,
    _truncate,
    add_bench_parser,
    cmd_bench,
    matched_transformer_config,
    run_ppl,
    script_main,
    transformer_head,
)
from muse_lm.errors import ConfigError
from muse_lm.layers import AdaptiveRankSemiseparableLayer, rank_gate
from muse_lm.models import TransformerLM
from muse_lm.presets import count_parameters
from muse_lm.training.data import load_corpus

TOKENS_PER_STEP = 32 * 4  # the tiny overrides' seq_len x micro_batch
RUN_KEYS = {"name", "model_type", "config", "params", "non_embedding_params", "compile", "steps", "tokens",
            "stop_reason", "wall_s", "train_s", "eval_s", "tokens_per_s", "peak_allocated_gib", "peak_reserved_gib",
            "final", "effective_ranks", "stability_events", "curves"}
HEADER_KEYS = {"part", "schema", "environment", "settings", "data", "train", "epoch_capped", "wall_s"}
ENV_KEYS = {"device", "device_name", "cpu", "torch", "triton", "cuda", "git_commit", "git_dirty", "date"}


def _bench(argv: list[str]) -> int:
    sub = argparse.ArgumentParser().add_subparsers()
    return cmd_bench(add_bench_parser(sub).parse_args(argv))


def _tiny_args(small_corpus, tiny_cli_sets, out, steps: int) -> list[str]:
    return ["--data", str(small_corpus), "--device", "cpu", "--out", str(out), "--tokens",
            str(steps * TOKENS_PER_STEP), *tiny_cli_sets, "--set", "eval_every=5"]


def _check_run(run: dict, steps: int) -> None:
    assert RUN_KEYS <= set(run)
    assert run["steps"] == steps and run["tokens"] == steps * TOKENS_PER_STEP
    assert run["stop_reason"] == "budget" and run["compile"]["compiled"] is False
    evals, train = run["curves"]["eval"], run["curves"]["train"]
    assert [p["step"] for p in evals] == list(range(0, steps + 1, 5))
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.3, evals  # it learned
    assert train[-1]["loss"] < train[0]["loss"], train
    assert run["final"]["loss"] == evals[-1]["loss"]
    assert run["final"]["ppl"] == pytest.approx(math.exp(evals[-1]["loss"]))
    assert run["tokens_per_s"] > 0 and run["train_s"] > 0


def test_ppl_trains_both_models_on_equal_tokens_and_writes_json_png_report(small_corpus, tiny_cli_sets, tmp_path,
                                                                           capsys):
    assert _bench(["--only", "ppl", *_tiny_args(small_corpus, tiny_cli_sets, tmp_path, 30)]) == 0
    record = json.loads((tmp_path / "ppl.json").read_text())
    assert HEADER_KEYS | {"runs", "param_match", "comparison"} <= set(record)
    assert ENV_KEYS <= set(record["environment"]) and record["part"] == "ppl"
    assert record["train"]["steps"] == 30 and record["train"]["activation_checkpointing"] is False
    muse, tf = record["runs"]["muse"], record["runs"]["transformer"]
    _check_run(muse, 30)
    _check_run(tf, 30)
    assert muse["model_type"] == "muse" and tf["model_type"] == "transformer"
    assert tf["head"]["impl"] == "linear_cross_entropy"  # CPU: no cut-cross-entropy
    assert muse["config"]["vocab_size"] == tf["config"]["vocab_size"] == record["data"]["vocab_size"]
    assert abs(record["param_match"]) < 0.1
    comparison = record["comparison"]
    assert comparison["equal_tokens"] and comparison["tokens"] == 30 * TOKENS_PER_STEP
    assert comparison["ppl_ratio"] == pytest.approx(muse["final"]["ppl"] / tf["final"]["ppl"])
    assert comparison["at_last_common_eval"]["step"] == 30
    assert (tmp_path / "ppl.png").stat().st_size > 1000
    report = capsys.readouterr().out
    assert "| muse |" in report and "| transformer |" in report and "MuseLM / transformer perplexity" in report


def test_ablate_compares_every_variant_with_the_full_model(small_corpus, tiny_cli_sets, tmp_path, capsys):
    assert _bench(["--only", "ablate", *_tiny_args(small_corpus, tiny_cli_sets, tmp_path, 20)]) == 0
    record = json.loads((tmp_path / "ablate.json").read_text())
    assert HEADER_KEYS | {"runs", "rows", "equal_tokens"} <= set(record) and record["equal_tokens"]
    runs = record["runs"]
    assert list(runs) == list(ABLATIONS)
    for run in runs.values():
        _check_run(run, 20)
    assert runs["no_bk"]["config"]["bk_heads"] == 0 and runs["no_bk"]["params"] < runs["full"]["params"]
    assert runs["dense_embedding"]["params"] > runs["full"]["params"]
    # No gates: every rank of every layer stays on.
    assert runs["fixed_rank"]["effective_ranks"] == [float(runs["fixed_rank"]["config"]["max_rank"])]
    rows = {row["variant"]: row for row in record["rows"]}
    assert rows["full"]["loss_delta_vs_full"] == 0 and rows["full"]["speed_vs_full"] == 1
    assert rows["no_bk"]["loss_delta_vs_full"] == pytest.approx(
        runs["no_bk"]["final"]["loss"] - runs["full"]["final"]["loss"])
    assert (tmp_path / "ablate.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in ABLATIONS) and "delta vs full" in out


def test_time_cap_stops_the_first_model_and_the_second_matches_its_tokens(small_corpus, tiny_defaults):
    settings = QualitySettings(tokens=50 * TOKENS_PER_STEP, max_seconds=1e-3, data=str(small_corpus), device="cpu",
                               overrides=dict(tiny_defaults))
    record = run_ppl(settings)
    muse, tf = record["runs"]["muse"], record["runs"]["transformer"]
    assert muse["stop_reason"] == "time" and muse["steps"] == 1  # a run makes at least one step
    assert tf["stop_reason"] == "matched" and tf["tokens"] == muse["tokens"] == TOKENS_PER_STEP
    assert record["comparison"]["equal_tokens"] and muse["curves"]["eval"][-1]["step"] == 1


def test_fixed_gate_mode_keeps_every_rank_on_without_penalty_or_gate_gradient():
    torch.manual_seed(0)
    assert rank_gate(torch.randn(3, 6), "fixed", training=True).eq(1).all()
    layer = AdaptiveRankSemiseparableLayer(16, max_rank=6, min_rank=2, num_heads=2, chunk_size=8, gate_l1=0.1,
                                           gate_mode="fixed", stats_momentum=0.0).train()
    y, penalty, _ = layer(torch.randn(2, 11, 16))
    assert float(penalty) == 0.0
    y.square().mean().backward()
    assert layer.gate_bias.grad is None  # the gate network gets no gradient
    assert layer.in_proj.weight.grad[-layer.max_rank:].eq(0).all()
    assert float(layer.effective_rank()) == 6.0
    # Same weights as a soft-gated layer: switching modes changes only the gates.
    layer.set_gate_mode("soft")
    _, soft_penalty, _ = layer(torch.randn(2, 11, 16))
    assert float(soft_penalty.detach()) > 0
    model = MuseLM(MuseConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_rank=4, min_rank=1,
                              gate_mode="fixed", tt_rank=2))
    _, _, aux = model(torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9)), return_parts=True)
    assert float(aux) == 0.0


def test_matched_transformer_has_muse_body_size_at_8gb():
    muse = get_preset("8gb").model
    tf_cfg = matched_transformer_config(muse)
    assert (tf_cfg.d_model, tf_cfg.n_layers, tf_cfg.vocab_size) == (muse.d_model, muse.n_layers, muse.vocab_size)
    with torch.device("meta"):
        body = TransformerLM(tf_cfg).num_parameters(exclude_embedding=True)
    assert abs(body / count_parameters(muse)[1] - 1) < 0.02
    assert transformer_head(torch.device("cpu"))["impl"] == "linear_cross_entropy"


class _CompileFailed(TorchDynamoException):
    pass


def _failing_compile(fn, *args, **kwargs):
    def compiled(*a, **k):
        raise _CompileFailed("backend exploded")
    return compiled


def test_compile_failure_falls_back_under_auto_and_is_loud_under_on(monkeypatch):
    monkeypatch.setattr(torch, "compile", _failing_compile)
    model = TransformerLM(matched_transformer_config(MuseConfig(vocab_size=50, d_model=32, n_layers=1, tt_rank=2)))
    ids = torch.randint(0, 50, (1, 5))
    auto = Compiler(model, "auto", torch.device("cuda"))  # auto compiles on CUDA (device type only here)
    cleaned = []
    assert auto.call(lambda: model(ids), cleanup=lambda: cleaned.append(1)).shape == (1, 5, 50)
    assert auto.record()["compiled"] is False and "backend exploded" in auto.record()["error"] and cleaned
    assert "forward" not in vars(model)  # the class's forward again
    on = Compiler(model, "on", torch.device("cpu"))
    with pytest.raises(_CompileFailed):
        on.call(lambda: model(ids))
    assert Compiler(model, "auto", torch.device("cpu")).record()["compiled"] is False  # auto: CPU stays eager


def test_user_mistakes_are_one_line_errors(small_corpus, tiny_cli_sets, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown part"):
        _bench(["--only", "ppl,speed"])
    with pytest.raises(ConfigError, match="starting with full"):
        QualitySettings(tokens=10, max_seconds=1, variants=("no_bk",))
    with pytest.raises(ConfigError, match="--max-seconds"):
        QualitySettings(tokens=10, max_seconds=0)
    argv = ["--data", str(small_corpus), "--device", "cpu", "--out", str(tmp_path), "--tokens", "5", *tiny_cli_sets]
    assert script_main("ppl", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "less than one optimizer step" in err[-1]
    assert set(PARTS) >= {"ppl", "ablate"}


def test_max_chars_keeps_whole_documents_and_renames_the_corpus(small_corpus):
    corpus = load_corpus(str(small_corpus))
    cut, truncated = _truncate(corpus, 20_000)
    assert truncated and 0 < len(cut.train_docs) < len(corpus.train_docs)
    assert cut.train_docs == corpus.train_docs[:len(cut.train_docs)] and cut.heldout_docs == corpus.heldout_docs
    assert cut.fingerprint != corpus.fingerprint
    assert _truncate(corpus, 10**9) == (corpus, False)

"""CPU smoke tests of the model-speed and memory parts (`muse bench --only model,memory`) at tiny size:
both parts' code paths, the OOM record, compile fallback, the fit and targets, report.md and the README
tables."""

import argparse
import json
import math
import sys

import pytest
import torch
from torch._dynamo.exc import TorchDynamoException

from muse_lm import bench_speed
from muse_lm.bench_quality import PARTS, add_bench_parser, cmd_bench, write_report
from muse_lm.bench_speed import (
    MODELS,
    DynamicCompiler,
    MemorySettings,
    ModelBenchSettings,
    criteria,
    equal_total_transformer_config,
    loglog_fit,
    race_heads,
    run_model_part,
    update_readme,
)
from muse_lm.errors import ConfigError
from muse_lm.models import MuseConfig, TransformerLM
from muse_lm.presets import count_parameters, get_preset

# vocab 128: small enough that a dense-table transformer can still have MuseLM's total parameters;
# d_model 64: wide enough that the SwiGLU's 64-steps tell the matched and the equal-total widths apart.
TINY = {"d_model": 64, "n_layers": 1, "n_heads": 2, "max_rank": 8, "min_rank": 2, "bk_heads": 2, "tt_rank": 4,
        "vocab_size": 128}
POINT_KEYS = {"seq_len", "batch", "tokens", "warmup_s", "step_s", "tokens_per_s", "peak_gib", "peak_reserved_gib",
              "context_gib"}


def _bench(argv: list[str]) -> int:
    sub = argparse.ArgumentParser().add_subparsers()
    return cmd_bench(add_bench_parser(sub).parse_args(argv))


def _tiny_model_settings(tmp_path, **kw) -> ModelBenchSettings:
    return ModelBenchSettings(**{"lengths": (16, 32), "tokens_per_step": 64, "warmup_steps": 1, "timed_steps": 1,
                                 "device": "cpu", "overrides": dict(TINY), "out": tmp_path, **kw})


@pytest.fixture(scope="module")
def model_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    return out, run_model_part(_tiny_model_settings(out))


def test_model_part_measures_every_model_at_every_length_and_writes_partial_json(model_record):
    out, record = model_record
    assert record["complete"] and record["part"] == "model"
    assert list(record["models"]) == list(MODELS)
    assert record["strong_head"]["impl"] == "linear_cross_entropy"  # CPU: no cut-cross-entropy
    assert "unavailable" in record["strong_head"]["cut_cross_entropy"]
    for rec in record["models"].values():
        assert [p["seq_len"] for p in rec["points"]] == [16, 32]
        for p in rec["points"]:
            assert POINT_KEYS <= set(p) and p["batch"] * p["seq_len"] == 64
            assert p["tokens_per_s"] == pytest.approx(64 / p["step_s"]) and p["peak_gib"] is None  # CPU
        assert rec["compile"]["compiled"] is False and rec["compile"]["shapes"] == "dynamic"
        assert math.isfinite(rec["fit"]["slope"]) and rec["fit"]["points"] == 2
    heads = {name: rec["head"] for name, rec in record["models"].items()}
    assert heads == {"muse": "tt_linear_cross_entropy", "standard": "plain", "strong": "linear_cross_entropy",
                     "strong_equal_total": "linear_cross_entropy"}
    models = record["models"]
    assert models["standard"]["non_embedding_params"] == models["strong"]["non_embedding_params"]
    assert abs(models["strong"]["body_vs_muse"]) < 0.1
    assert models["strong_equal_total"]["params"] < models["strong"]["params"]
    # The writer left the last partial record: every point, but not yet the targets.
    partial = json.loads((out / "model.json").read_text())
    assert partial["complete"] is False and len(partial["models"]["strong_equal_total"]["points"]) == 2
    assert len(record["criteria"]) == 8


def test_model_report_plot_and_report_md(model_record):
    out, record = model_record
    text = PARTS["model"].report(record)
    assert "| tokens/s | T=16 | T=32 |" in text and "| peak GiB |" in text
    assert all(f"| {name} |" in text for name in MODELS) and "not measured" in text
    (out / "model.json").write_text(json.dumps(record))
    PARTS["model"].plot(record, out / "model.png")
    assert (out / "model.png").stat().st_size > 1000
    report = write_report(out).read_text()
    assert "### model" in report and "![model](model.png)" in report


def test_oom_is_recorded_and_the_next_length_still_runs(tmp_path, monkeypatch):
    real = bench_speed.train_step

    def fake(model, optimizer, ids, targets, device):
        if ids.shape[1] == 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
        return real(model, optimizer, ids, targets, device)

    monkeypatch.setattr(bench_speed.model_part, "train_step", fake)
    record = run_model_part(_tiny_model_settings(tmp_path, models=("muse",)))
    oom, ok = record["models"]["muse"]["points"]
    assert oom["oom"].startswith("CUDA out of memory") and "step_s" not in oom
    assert ok["tokens_per_s"] > 0
    assert record["models"]["muse"]["fit"] is None  # one measured point: no fit
    assert "OOM" in PARTS["model"].report(record)


def test_time_cap_records_skipped_points(tmp_path):
    record = run_model_part(_tiny_model_settings(tmp_path, models=("muse",), max_seconds=1e-9))
    assert all("skipped" in p for p in record["models"]["muse"]["points"])
    assert "skipped" in PARTS["model"].report(record) or "-" in PARTS["model"].report(record)


def test_memory_part_runs_real_trainer_steps_and_checks_budgets(tmp_path, capsys):
    sets = [arg for k, v in {**TINY, "seq_len": 16, "micro_batch": 2, "grad_accum": 2}.items()
            for arg in ("--set", f"{k}={v}")]
    assert _bench(["--only", "memory", "--quick", "--device", "cpu", "--out", str(tmp_path), *sets]) == 0
    record = json.loads((tmp_path / "memory.json").read_text())
    assert record["complete"] and record["full_size"] is False
    rows = {r["preset"]: r for r in record["rows"]}
    assert list(rows) == [*bench_speed.MEMORY_PRESETS, "inference"]
    for name in bench_speed.MEMORY_PRESETS:
        r = rows[name]
        assert r["kind"] == "training" and len(r["step_s"]) == 1 and r["tokens_per_s"] > 0
        assert r["activation_checkpointing"] == get_preset(name).train.activation_checkpointing
        assert r["limit_gib"] == pytest.approx(0.9 * get_preset(name).budget_gb)
        assert r["peak_gib"] is None and r["fits"] is None and r["estimate_gib"] > 0  # CPU: not measured
    assert rows["inference"]["generated"] == 64 and rows["inference"]["kind"] == "generation"
    assert rows["inference"]["lns"] == "ffn" and rows["inference"]["params"] > 0
    assert (tmp_path / "memory.png").stat().st_size > 1000
    assert "REDUCED" in capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert "### memory" in report and "![memory](memory.png)" in report


def test_fit_slope_and_spreads():
    lengths = [1024, 2048, 4096]
    flat = [{"seq_len": t, "tokens": 4096, "step_s": 1.0, "peak_gib": 2.0} for t in lengths]
    growing = [{"seq_len": t, "tokens": 4096, "step_s": t / 1024, "peak_gib": t / 1024} for t in lengths]
    assert loglog_fit(flat) == {"slope": pytest.approx(0.0, abs=1e-9), "points": 3, "time_per_token_spread": 0.0,
                                "peak_spread": 0.0}
    fit = loglog_fit(growing + [{"seq_len": 8192, "oom": "x"}])
    assert fit["slope"] == pytest.approx(1.0) and fit["points"] == 3 and fit["time_per_token_spread"] == 3.0


def test_criteria_compare_muse_with_the_baselines():
    def rec(tps, peak):
        points = [{"seq_len": t, "tokens": 4096, "step_s": 4096 / tps[i], "tokens_per_s": tps[i], "peak_gib": peak[i]}
                  for i, t in enumerate((1024, 2048, 16384))]
        return {"points": points, "fit": loglog_fit(points)}

    models = {"muse": rec([100, 100, 100], [1.0, 1.0, 1.0]), "strong": rec([90, 60, 20], [2.0, 2.0, 2.0]),
              "standard": rec([80, 50, 10], [4.0, 4.0, 4.0])}
    rows = {c["what"]: c for c in criteria(models, (1024, 2048, 16384))}
    assert rows["muse / strong tokens/s at T=1024"]["value"] == pytest.approx(100 / 90)
    assert all(c["met"] for c in rows.values()), rows
    assert criteria({"muse": models["muse"]}, (1024, 16384))[0]["met"] is None  # no baseline: not measured


def test_equal_total_transformer_matches_muse_total_at_8gb():
    muse = get_preset("8gb").model
    with torch.device("meta"):
        tf = TransformerLM(equal_total_transformer_config(muse))
    total = count_parameters(muse)[0]
    assert abs(tf.num_parameters() / total - 1) < 0.02
    with pytest.raises(ConfigError, match="strong_equal_total"):
        equal_total_transformer_config(MuseConfig(vocab_size=4096, d_model=32, n_layers=1, tt_rank=2))


def test_race_heads_falls_back_to_ours_without_cut_cross_entropy(monkeypatch):
    assert race_heads(torch.device("cpu"), 8, 16, 32)["impl"] == "linear_cross_entropy"
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # import raises ImportError
    head = race_heads(torch.device("cuda"), 8, 16, 32)  # returns before touching the device
    assert head["impl"] == "linear_cross_entropy" and head["cut_cross_entropy"].startswith("unavailable")


class _CompileFailed(TorchDynamoException):
    pass


def test_compile_failure_falls_back_and_is_recorded(monkeypatch):
    def failing(fn, **kwargs):
        assert kwargs == {"dynamic": True}

        def compiled(*a, **k):
            raise _CompileFailed("inductor exploded")
        return compiled

    monkeypatch.setattr(torch, "compile", failing)
    model = TransformerLM(equal_total_transformer_config(MuseConfig(**TINY)))
    compiler = DynamicCompiler(model, "auto", torch.device("cuda"))  # auto compiles on CUDA (device type only)
    ids = torch.randint(0, 128, (1, 5))
    assert compiler.call(lambda: model(ids)).shape == (1, 5, 128)
    assert compiler.record()["compiled"] is False and "inductor exploded" in compiler.record()["error"]


def test_settings_and_readme_mistakes_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="lengths"):
        ModelBenchSettings(lengths=(1000,), tokens_per_step=16384)
    with pytest.raises(ConfigError, match="models"):
        ModelBenchSettings(models=("muse", "gpt"))
    with pytest.raises(ConfigError, match="budget"):
        MemorySettings(presets=("tiny",))
    readme = tmp_path / "README.md"
    with pytest.raises(ConfigError, match="not a file"):
        update_readme(readme, tmp_path)
    readme.write_text("intro\n")
    (tmp_path / "memory.json").write_text("{}")
    with pytest.raises(ConfigError, match="bench-memory"):
        update_readme(readme, tmp_path)


def test_update_readme_replaces_only_the_marked_block(tmp_path, model_record):
    _, record = model_record
    results = tmp_path / "results"
    results.mkdir()
    (results / "model.json").write_text(json.dumps(record))
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- bench-model -->\nold table\n<!-- /bench-model -->\nafter\n")
    assert update_readme(readme, results) == ["model"]
    text = readme.read_text()
    assert text.startswith("before\n<!-- bench-model -->\n### model")
    assert text.endswith("<!-- /bench-model -->\nafter\n")
    assert "old table" not in text and record["environment"]["date"] in text
    assert bench_speed.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert readme.read_text() == text  # idempotent


def test_capture_is_not_tried_for_a_known_uncapturable_head_and_a_failure_keeps_its_first_error(monkeypatch):
    """--cuda-graph auto: the cut-cross-entropy head is not captured (a failed capture's pool would stay
    reserved and count in the point's memory); a capture that fails twice records the first error."""
    from muse_lm.bench_speed import model_part

    settings = ModelBenchSettings(lengths=(8,), tokens_per_step=8, cuda_graph="auto")
    cuda = torch.device("cuda")  # graphs_wanted only looks at the device type; nothing runs on it
    point = {}
    assert model_part._capture(lambda: None, None, settings, cuda, point, None,
                               model_part.UNCAPTURABLE_HEADS["cut_cross_entropy"]) is None
    assert point["cuda_graph"].startswith("not attempted: cut-cross-entropy") and "nonzero()" in point["cuda_graph"]

    errors = iter([RuntimeError("first: operation not permitted when stream is capturing\ndetail"),
                   RuntimeError("beginAllocateToPool: already recording to mempool_id")])

    def failing_capture(*args, **kwargs):
        raise next(errors)

    class Optimizer:
        def zero_grad(self, set_to_none):
            pass

    monkeypatch.setattr(model_part, "GraphedStep", failing_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    point = {}
    assert model_part._capture(lambda: None, Optimizer(), settings, cuda, point) is None
    assert point["cuda_graph"] == ("capture failed: RuntimeError: first: operation not permitted when stream is "
                                   "capturing; retry: RuntimeError: beginAllocateToPool: already recording to "
                                   "mempool_id")

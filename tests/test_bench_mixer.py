"""benchmarks/bench_mixer.py --smoke on the CPU: the JSON's structure, a finite time in every cell, the
derived numbers and targets, and that an OOM in one cell is recorded instead of ending the run."""

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))  # bench_mixer imports bench_scans as a sibling script
        return importlib.import_module("bench_mixer")


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixer") / "mixer.json"
    return out, bench.main(["--smoke", "--out", str(out)])


def _cells(node):
    """Every measurement cell (a dict with "ms", "oom" or "error") anywhere in the JSON."""
    if isinstance(node, dict):
        if {"ms", "oom", "error"} & node.keys():
            yield node
        else:
            for value in node.values():
                yield from _cells(value)


def test_smoke_writes_every_part_with_provenance(bench, smoke):
    out, res = smoke
    assert json.loads(out.read_text()) == res
    assert res["smoke"] is True and res["parts_done"] == list(bench.PARTS)
    assert res["torch"] == torch.__version__ and res["gpu"].startswith("none (CPU")
    assert res["commit"] and res["settings"]["lengths"] == [16, 32] and res["settings"]["tokens"] == 256
    assert set(res["scan"]) == set(res["layer"]) == {"T16", "T32"}
    assert [res["scan"][k]["B"] for k in ("T16", "T32")] == [16, 8]
    assert "skipped" in res["fla"]  # the smoke run never imports FLA
    assert list(res)[-3:] == ["derived", "targets", "wall_s"]


def test_every_smoke_cell_has_a_finite_time(smoke):
    _, res = smoke
    cells = list(_cells({k: res[k] for k in ("scan", "layer", "bandwidth")}))
    assert len(cells) == 2 * 2 + 2 + 2  # ours and SDPA, the layer at each T; two bandwidth rows
    for cell in cells:
        assert set(cell) == {"ms"} and math.isfinite(cell["ms"]) and cell["ms"] > 0
    for row in res["layer"].values():
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
    band = res["bandwidth"]
    assert band["copy_gb_s"] > 0
    for name in ("linear_recurrence", "bk_resolvent"):
        assert band[name]["gb_s"] > 0 and math.isfinite(band[name]["fraction_of_copy"])


def test_smoke_derived_numbers_and_targets(smoke):
    _, res = smoke
    derived, targets = res["derived"], res["targets"]
    scan = res["scan"]
    assert derived["ours_over_sdpa"]["T32"] == pytest.approx(scan["T32"]["ours"]["ms"] / scan["T32"]["sdpa"]["ms"])
    per_token = derived["scan_per_token"]
    assert per_token["measured_all"] and per_token["change_from_shortest"]["16"] == 0.0
    assert per_token["ns_per_token"]["32"] == pytest.approx(1e6 * scan["T32"]["ours"]["ms"] / 256)
    assert per_token["max_abs_change"] == pytest.approx(abs(per_token["change_from_shortest"]["32"]))
    assert derived["ours_over_fla"] == {}
    for name, target in targets.items():
        if name == "all_met":
            continue
        assert set(target) == {"target", "value", "met"}
        if name.startswith("scan_over_fla"):
            assert target["value"] is None and target["met"] is None
        else:
            assert math.isfinite(target["value"]) and isinstance(target["met"], bool)
    assert targets["scan_over_sdpa_T32"]["met"] == (targets["scan_over_sdpa_T32"]["value"] <= 0.25)
    assert targets["all_met"] is False  # FLA was not measured


def test_oom_in_a_cell_is_recorded_and_leaves_the_target_open(bench):
    def make_step():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    cell = bench._cell(bench.SMOKE, make_step)
    assert cell == {"oom": "CUDA out of memory. Tried to allocate 2.00 GiB"}
    res = {"scan": {"T16": {"B": 16, "T": 16, "ours": {"ms": 2.0}, "sdpa": {"ms": 1.0}},
                    "T32": {"B": 8, "T": 32, "ours": cell, "sdpa": {"ms": 1.0}}}}
    derived = bench.derive(bench.SMOKE, res)
    assert derived["ours_over_sdpa"] == {"T16": 2.0}
    assert not derived["scan_per_token"]["measured_all"]
    targets = bench.targets(bench.SMOKE, res, derived)
    assert targets["scan_time_per_token_change"] == {**targets["scan_time_per_token_change"], "value": None,
                                                     "met": None}
    assert targets["scan_over_sdpa_T32"]["met"] is None


def test_settings_reject_lengths_that_do_not_divide_the_tokens(bench):
    with pytest.raises(ValueError, match="multiple of every T"):
        bench.Settings(device="cpu", dtype=torch.float32, tokens=100, lengths=(16, 32), heads=2, head_dim=8, rank=8,
                       fla_target_lengths=(16,), sdpa_target_length=32)
    with pytest.raises(ValueError, match="not among lengths"):
        bench.Settings(device="cpu", dtype=torch.float32, tokens=64, lengths=(16, 32), heads=2, head_dim=8, rank=8)


def test_parts_run_in_their_fixed_order_and_unknown_parts_are_refused(bench, tmp_path, capsys):
    res = bench.main(["--smoke", "--parts", "fla,bandwidth", "--out", str(tmp_path / "m.json")])
    assert res["parts_done"] == ["bandwidth", "fla"] and "scan" not in res  # FLA always last
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--parts", "scan,attention", "--out", str(tmp_path / "x.json")])
    assert "unknown ['attention']" in capsys.readouterr().err


def test_paired_cells_alternate_rounds_and_record_an_oom_without_stopping(bench):
    """FLA and ours are timed in alternation: each step is built once and run in every round, in turn;
    the cell is the median round. A step that runs out of memory in a later round gets an "oom" cell,
    and the other competitor still finishes its rounds."""
    s = bench.SMOKE
    calls, built = [], []

    def maker(name, fail_on=None):
        def make():
            built.append(name)
            count = iter(range(1, 100))

            def step():
                n = next(count)
                calls.append(name)
                if fail_on is not None and n >= fail_on:
                    raise torch.OutOfMemoryError(f"{name}: out of memory on call {n}")

            return step

        return make

    cells = bench._paired_cells(s, {"a": maker("a"), "b": maker("b")}, rounds=3)
    assert built == ["a", "b"]  # each step built once, then reused
    assert set(cells) == {"a", "b"}
    for cell in cells.values():
        assert len(cell["rounds_ms"]) == 3 and cell["ms"] == sorted(cell["rounds_ms"])[1]
    # rounds alternate: a's calls of round 1, b's, a's of round 2, ... (each timing calls its step 4 times)
    runs = [calls[0]] + [c for prev, c in zip(calls, calls[1:]) if c != prev]
    assert runs == ["a", "b", "a", "b", "a", "b"]
    calls.clear()
    # _cpu_ms calls a step 4 times per timing: b's 5th call (round 2) runs out of memory
    cells = bench._paired_cells(s, {"a": maker("a"), "b": maker("b", fail_on=5)}, rounds=3)
    assert "out of memory on call 5" in cells["b"]["oom"] and "rounds_ms" not in cells["b"]
    assert len(cells["a"]["rounds_ms"]) == 3
    with pytest.raises(ValueError, match="fla_rounds"):
        bench.Settings(device="cpu", dtype=torch.float32, tokens=64, lengths=(16, 32), heads=2, head_dim=8, rank=8,
                       fla_target_lengths=(16,), sdpa_target_length=32, fla_rounds=0)


def test_log_decays_follow_the_layer_init_or_the_fast_setting(bench):
    """layer_init: every head's mean per-token rate is near A_h * dt_h of the AR-SSM layer's
    initialization (slowest ~1e-3, fastest ~1.6), all <= 0; fast: the earlier runs' -0.2 softplus(n);
    an unknown setting is refused."""
    import dataclasses

    s = dataclasses.replace(bench.SMOKE, heads=16)
    la = bench._log_decays(s, 4, 512, torch.Generator().manual_seed(0))
    assert la.shape == (4, 512, 16) and la.dtype == torch.float32 and (la <= 0).all()
    rate = -la.mean(dim=(0, 1))
    assert rate[0] == pytest.approx(1e-3, rel=0.3) and rate[-1] == pytest.approx(1.6, rel=0.3)
    assert (rate[1:] > rate[:-1]).all()  # slow to fast over the heads
    fast = bench._log_decays(dataclasses.replace(s, decay="fast"), 4, 512, torch.Generator().manual_seed(0))
    assert -fast.mean() == pytest.approx(0.2 * 0.806, rel=0.05)  # E softplus(N(0, 1)) ~ 0.806
    with pytest.raises(ValueError, match="decay="):
        dataclasses.replace(s, decay="slow")


def test_host_time_counts_the_calls_issued(bench):
    """_host_ms: the host time of one call, from `calls` calls issued back to back (CPU: the call's time)."""
    import time

    calls = []
    ms = bench._host_ms(bench.SMOKE, lambda: calls.append(time.sleep(0.002)), calls=5)
    assert len(calls) == 6  # one untimed, then five
    assert 2.0 <= ms < 50.0

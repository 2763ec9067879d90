"""Pure parts of benchmarks/bench_distributed.py: where the fit search starts and how it steps
(the collective search itself is tested in tests/training/test_distributed_failures.py)."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distributed.py"
    spec = importlib.util.spec_from_file_location("bench_distributed_pure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_guess_fills_the_margin_of_the_cap_with_model_state(bench):
    gib = 2**30
    # 16 bytes per parameter (DDP: fp32 weights, grads, two AdamW moments), 24 GiB cap, 80%:
    # 0.8 * 24 GiB / 16 = 1.29e9 parameters; minus 50M fixed, 12.6M per layer -> 98 layers.
    layers = bench.first_guess_layers(16.0, 24 * gib, fixed=50_000_000, per_layer=12_600_000)
    assert layers == int((0.8 * 24 * gib / 16 - 50_000_000) // 12_600_000) == 98
    # FSDP2 on 2 GPUs holds half the state per parameter: about twice the layers.
    assert bench.first_guess_layers(8.0, 24 * gib, 50_000_000, 12_600_000) in range(2 * layers, 2 * layers + 5)
    assert bench.first_guess_layers(16.0, 1, 50_000_000, 12_600_000) == 1  # never below one layer


def test_next_layers_grows_by_the_factor_then_bisects_then_stops(bench):
    assert bench._next_layers(100, lo=100, hi=None, elapsed_s=0, budget_s=60, grow=1.25) == 125
    assert bench._next_layers(3, lo=3, hi=None, elapsed_s=0, budget_s=60, grow=1.25) == 4  # always grows
    assert bench._next_layers(125, lo=100, hi=125, elapsed_s=0, budget_s=60, grow=1.25) == 112
    assert bench._next_layers(112, lo=112, hi=125, elapsed_s=0, budget_s=60, grow=1.25) is None  # within 1/8
    assert bench._next_layers(100, lo=100, hi=None, elapsed_s=61, budget_s=60) is None  # budget spent
    # The first guess did not fit: step down by the factor (not halve towards 0), then bisect.
    assert bench._next_layers(200, lo=0, hi=200, elapsed_s=0, budget_s=60, grow=1.25) == 160
    assert bench._next_layers(1, lo=0, hi=1, elapsed_s=0, budget_s=60, grow=1.25) is None  # nothing smaller

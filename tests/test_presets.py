import io

import pytest

from muse_lm import get_preset, list_presets, print_preset_comparison
from muse_lm.errors import ConfigError
from muse_lm.presets import estimate_memory, resolve_preset_name, with_overrides

ALIASES = {"memory_oriented": "8gb", "balanced": "10gb", "speed_oriented": "24gb", "quality": "max_quality",
           "efficiency": "max_efficiency"}


def test_all_presets_exist_and_aliases_resolve():
    names = set(list_presets())
    assert {"tiny", "8gb", "10gb", "24gb", "inference", "max_quality", "max_efficiency", "auto"} <= names
    for alias, name in ALIASES.items():
        assert get_preset(alias).name == name


def test_get_preset_returns_a_fresh_copy():
    a = get_preset("8gb")
    a.model.d_model = 8
    a.train.steps = 1
    b = get_preset("8gb")
    assert b.model.d_model == 768 and b.train.steps != 1


def test_unknown_preset_lists_names_and_aliases():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*tiny.*memory_oriented -> 8gb"):
        get_preset("huge")


def test_auto_is_tiny_without_a_gpu():
    assert resolve_preset_name("auto") == "tiny"


def test_presets_fix_the_whole_run():
    for name in list_presets()[:-1]:
        p = get_preset(name)
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "max_rank", "min_rank", "tt_rank"):
            assert getattr(p.model, field) > 0 or field == "min_rank"
        for field in ("seq_len", "micro_batch", "grad_accum", "steps"):
            assert getattr(p.train, field) > 0
        assert p.train.dtype in ("bf16", "fp32") and isinstance(p.train.activation_checkpointing, bool)
        assert isinstance(p.train.lns, bool)
    assert get_preset("inference").train.lns and get_preset("inference").notes


def test_8gb_matches_gpt2_small_body():
    est = estimate_memory(get_preset("8gb"))
    assert 80e6 < est["non_embedding_params"] < 90e6


def test_gpu_presets_are_estimated_inside_their_budget():
    for name in ("8gb", "10gb", "24gb", "max_quality", "max_efficiency", "inference"):
        est = estimate_memory(get_preset(name))
        assert est["fits"], (name, est["peak_gib"])


def test_comparison_table_has_one_row_per_preset_with_aliases():
    buf = io.StringIO()
    print_preset_comparison(file=buf)
    lines = buf.getvalue().splitlines()
    for name in list_presets()[:-1]:
        row = [line for line in lines if line.split()[0] == name]
        assert len(row) == 1
        for alias, target in ALIASES.items():
            if target == name:
                assert alias in row[0]


def test_overrides_are_validated():
    p = with_overrides(get_preset("tiny"), {"d_model": 64, "seq_len": 32})
    assert p.model.d_model == 64 and p.train.seq_len == 32
    with pytest.raises(ConfigError, match="unknown setting"):
        with_overrides(get_preset("tiny"), {"dmodel": 64})
    with pytest.raises(ConfigError, match="seq_len"):
        with_overrides(get_preset("tiny"), {"seq_len": 0})


def test_readme_preset_table_is_current():
    from pathlib import Path

    from muse_lm.presets import presets_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert presets_markdown() in readme, "README preset table is stale: regenerate it from presets_markdown()"

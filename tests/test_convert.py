"""`muse convert` / `convert_embedding`: TT-SVD of a dense table with id reordering, the id
permutation hook of HTTEmbedding, the output file, and the command end to end (GPT-2-style
safetensors, a saved dense MuseLM, a tiny muse run) with exit code 2 on bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from muse_lm.cli import _Parser, main
from muse_lm.convert import add_convert_parser, cmd_convert, convert_embedding, load_converted
from muse_lm.errors import CheckpointError, ConfigError, DataError, MuseUserError
from muse_lm.layers import HTTEmbedding
from muse_lm.models import MuseConfig, MuseLM
from muse_lm.ops import tt_reconstruct


def _zipf_table(vocab=480, dim=32, seed=0, dtype=torch.float64):
    """Rows with Zipf-like norms in shuffled id order (a trained table's heavy rows are scattered)."""
    gen = torch.Generator().manual_seed(seed)
    scale = (torch.arange(vocab, dtype=dtype) + 5) ** -0.7
    table = torch.randn(vocab, dim, generator=gen, dtype=dtype) * scale[:, None]
    return table[torch.randperm(vocab, generator=gen)]


def _rel_error(emb: HTTEmbedding, table: torch.Tensor) -> float:
    diff = emb.dense_weight().detach().double() - table.double()
    return float(torch.linalg.norm(diff) / torch.linalg.norm(table.double()))


# ---- library ------------------------------------------------------------------------------------
@pytest.mark.parametrize("K,reorder", [(2, "none"), (2, "norm"), (3, "none"), (3, "norm")])
def test_error_equals_direct_reconstruction_error(K, reorder):
    table = _zipf_table()
    res = convert_embedding(table, rank=3, num_cores=K, reorder=reorder)
    assert res.reorder == reorder
    assert res.error == pytest.approx(_rel_error(res.module, table), rel=1e-9)
    assert res.error_without_reorder == pytest.approx(res.errors["none"])
    assert res.params_before == table.numel() and res.params_after == res.module.num_parameters()
    assert res.params_after == sum(c.numel() for c in res.module.cores) < res.params_before


@pytest.mark.parametrize("K", [2, 3])
def test_rank_is_capped_and_full_rank_is_lossless(K):
    table = _zipf_table(vocab=60, dim=8, dtype=torch.float32)
    res = convert_embedding(table, rank=1000, num_cores=K, reorder="none")
    emb = res.module
    modes = [v * d for v, d in zip(emb.vocab_factors, emb.dim_factors)]
    for k in range(1, K):
        assert emb.tt_ranks[k] <= min(math.prod(modes[:k]), math.prod(modes[k:])) < 1000
    assert res.error < 1e-6 and res.permutation is None
    assert emb.cores[0].dtype == torch.float32


@pytest.mark.parametrize("reorder", ["none", "auto"])
def test_table_that_is_tt_of_rank_r_is_recovered_exactly(reorder):
    gen = torch.Generator().manual_seed(3)
    v, d, r = (12, 10), (4, 6), 3
    cores = [torch.randn(v[0], 1, d[0], r, generator=gen, dtype=torch.float64),
             torch.randn(v[1], r, d[1], 1, generator=gen, dtype=torch.float64)]
    table = tt_reconstruct(cores, 0, 120)
    res = convert_embedding(table, rank=r, vocab_factors=v, dim_factors=d, reorder=reorder)
    assert res.error < 1e-10 and res.module.tt_ranks == (1, r, 1)
    assert res.permutation is None  # auto keeps the original order: a reorder cannot beat ~0
    torch.testing.assert_close(res.module.dense_weight(), table, rtol=1e-9, atol=1e-9)


def test_auto_keeps_the_lowest_error_and_reports_both():
    table = _zipf_table()
    res = convert_embedding(table, rank=4)
    assert set(res.errors) == {"none", "norm"} and any("frequency" in n for n in res.notes)
    assert res.reorder == "norm" and res.error == res.errors["norm"]
    # Zipf-like row norms: grouping the heavy rows into the first blocks is a clear win.
    assert res.error < 0.9 * res.error_without_reorder
    # With counts, frequency is tried too; counts that follow the row norms give the norm order.
    counts = torch.linalg.vector_norm(table, dim=1) * 1000
    res = convert_embedding(table, rank=4, token_counts=counts)
    assert set(res.errors) == {"none", "norm", "frequency"} and not res.notes
    assert res.error == min(res.errors.values())
    assert res.errors["frequency"] == pytest.approx(res.errors["norm"])


def test_forced_frequency_without_counts_keeps_the_original_order_with_a_note():
    res = convert_embedding(_zipf_table(), rank=2, reorder="frequency")
    assert res.reorder == "none" and res.permutation is None and set(res.errors) == {"none"}
    assert res.notes == ["frequency order skipped: no token counts (token_counts / --counts)"]


def test_permutation_round_trip_serves_original_ids():
    table = _zipf_table(vocab=100, dim=8)
    res = convert_embedding(table, rank=1000, reorder="norm")  # lossless, so rows must match exactly
    perm, emb = res.permutation, res.module
    assert perm.dtype == torch.long and torch.equal(perm.sort().values, torch.arange(100))
    assert not torch.equal(perm, torch.arange(100))
    ids = torch.tensor([[0, 17, 99], [42, 42, 3]])
    torch.testing.assert_close(emb(ids), table[ids], rtol=1e-9, atol=1e-9)
    # The TT rows themselves are in the new order: row j holds token perm[j].
    raw = tt_reconstruct(list(emb.cores), 0, 100)
    torch.testing.assert_close(raw, table[perm], rtol=1e-9, atol=1e-9)
    # Head: logits and loss in original ids (ignore_index untouched).
    h = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(emb.logits(h), h @ table.T, rtol=1e-9, atol=1e-9)
    targets = torch.tensor([[5, -100, 99], [0, 64, 2]])
    want = F.cross_entropy((h @ table.T).reshape(-1, 100), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(emb.loss(h, targets), want, rtol=1e-9, atol=1e-9)


def test_id_permutation_survives_state_dict_and_can_be_removed():
    res = convert_embedding(_zipf_table(vocab=100, dim=8), rank=2, reorder="norm")
    emb = res.module
    fresh = HTTEmbedding(100, 8, rank=max(emb.tt_ranks), vocab_factors=emb.vocab_factors,
                         dim_factors=emb.dim_factors).double()
    assert "id_map" not in fresh.state_dict()  # the identity is not saved: old checkpoints load as before
    fresh.load_state_dict(emb.state_dict())
    ids = torch.arange(100)
    torch.testing.assert_close(fresh(ids), emb(ids))
    emb.set_id_permutation(None)
    torch.testing.assert_close(emb(ids), emb.dense_weight())
    torch.testing.assert_close(emb(ids)[res.permutation.argsort()], fresh(ids))
    for bad in (torch.zeros(100, dtype=torch.long), torch.arange(99), torch.arange(100.0)):
        with pytest.raises(ValueError, match="permutation of 0..99"):
            emb.set_id_permutation(bad)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"rank": 0}, ConfigError, "rank=0"),
    ({"rank": 2, "num_cores": 4}, ConfigError, "num_cores=4"),
    ({"rank": 2, "reorder": "random"}, ConfigError, "reorder='random'"),
    ({"rank": 2, "token_counts": torch.ones(7)}, DataError, "one count per token"),
])
def test_bad_arguments_raise_user_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        convert_embedding(_zipf_table(vocab=30, dim=4), **kwargs)
    with pytest.raises(DataError, match="vocab, d_model"):
        convert_embedding(torch.ones(10), rank=2)
    with pytest.raises(DataError, match="NaN"):
        convert_embedding(torch.full((10, 4), float("nan")), rank=2)


# ---- command ------------------------------------------------------------------------------------
def _convert(argv: list[str]) -> int:
    """`muse convert ...` through a parser built here (cli.py wires the same function)."""
    parser = _Parser(prog="muse")
    add_convert_parser(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    args = parser.parse_args(["convert", *argv])
    assert args.func is cmd_convert
    return cmd_convert(args)


@pytest.fixture
def gpt2_file(tmp_path) -> tuple[Path, torch.Tensor]:
    """A GPT-2-style checkpoint: `wte.weight` among other tensors."""
    wte = _zipf_table(vocab=300, dim=24, dtype=torch.float32)
    path = tmp_path / "gpt2.safetensors"
    save_file({"wpe.weight": torch.randn(16, 24), "h.0.attn.c_attn.weight": torch.randn(24, 72),
               "wte.weight": wte}, str(path))
    return path, wte


def test_cli_converts_a_gpt2_style_file(gpt2_file, capsys):
    path, wte = gpt2_file
    assert _convert([str(path), "--rank", "4"]) == 0
    out = path.with_name("gpt2-htt-r4.safetensors")
    text = capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    emb = load_converted(out)
    assert report["key"] == "wte.weight" and report["reorder"] == "norm"
    assert report["params_before"] == 300 * 24 == int(text.split("parameters:")[1].split()[0].replace(",", ""))
    assert report["params_after"] == emb.num_parameters() < 300 * 24
    assert report["error"] == pytest.approx(_rel_error(emb, wte), rel=1e-5)
    assert report["error"] < report["error_without_reorder"]
    for expected in ("wte.weight, 300 x 24", "tt ranks (1, 4, 1)", "x smaller",
                     f"{report['error']:.4f} relative Frobenius (order: norm; original order "
                     f"{report['error_without_reorder']:.4f})", "frequency order skipped", str(out)):
        assert expected in text
    ids = torch.tensor([0, 150, 299])
    torch.testing.assert_close(emb(ids), emb.dense_weight()[ids])


def test_cli_options_key_cores_counts_out(gpt2_file, tmp_path, capsys):
    path, wte = gpt2_file
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps(torch.linalg.vector_norm(wte, dim=1).mul(1e4).round().tolist()))
    out = tmp_path / "sub" / "emb.safetensors"
    assert _convert([str(path), "--rank", "2", "--cores", "3", "--key", "wte.weight", "--out", str(out),
                     "--counts", str(counts), "--reorder", "frequency"]) == 0
    report = json.loads((tmp_path / "sub" / "emb.json").read_text())
    assert report["num_cores"] == 3 and report["reorder"] == "frequency" and report["id_map"]
    assert set(report["errors"]) == {"none", "frequency"}
    emb = load_converted(out)
    assert report["error"] == pytest.approx(_rel_error(emb, wte), rel=1e-5)
    assert "id_map" in emb.state_dict()
    assert _convert([str(path), "--rank", "2", "--reorder", "none", "--out", str(out)]) == 0  # overwrites
    assert json.loads((tmp_path / "sub" / "emb.json").read_text())["id_map"] is None
    assert "id_map" not in load_converted(out).state_dict()


def test_cli_finds_prefixed_keys(tmp_path, capsys):
    path = tmp_path / "llama.safetensors"
    save_file({"model.model.embed_tokens.weight": torch.randn(50, 8), "lm_head.weight": torch.randn(50, 8)},
              str(path))
    assert _convert([str(path), "--rank", "2", "--reorder", "none"]) == 0
    assert "model.model.embed_tokens.weight, 50 x 8" in capsys.readouterr().out


def _tiny_muse(embedding: str) -> MuseLM:
    torch.manual_seed(0)
    return MuseLM(MuseConfig(vocab_size=90, d_model=16, n_layers=1, n_heads=2, max_rank=4, min_rank=1,
                             bk_heads=0, embedding=embedding, tt_rank=2))


def test_cli_converts_a_saved_dense_muse_model(tmp_path, capsys):
    model = _tiny_muse("dense")
    model.save_pretrained(tmp_path / "model")
    assert _convert([str(tmp_path / "model"), "--rank", "3"]) == 0
    out = tmp_path / "model-htt-r3.safetensors"
    text = capsys.readouterr().out
    assert "embed.weight, 90 x 16" in text and "no token counts" in text
    emb = load_converted(out)
    table = model.embed.weight.detach()
    assert json.loads(out.with_suffix(".json").read_text())["error"] == pytest.approx(_rel_error(emb, table),
                                                                                         rel=1e-5)
    _tiny_muse("htt").save_pretrained(tmp_path / "htt_model")
    with pytest.raises(CheckpointError, match="already has an HTT embedding"):
        _convert([str(tmp_path / "htt_model"), "--rank", "3"])


def test_cli_converts_a_muse_run_with_its_token_counts(small_corpus, tiny_cli_sets, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(small_corpus), "--steps", "2", "--out", str(run),
                 "--no-progress", *tiny_cli_sets, "--set", "embedding=dense"]) == 0
    capsys.readouterr()
    assert _convert([str(run), "--rank", "4"]) == 0
    report = json.loads((run / "step-0000002-htt-r4.json").read_text())
    assert set(report["errors"]) == {"none", "norm", "frequency"} and report["notes"] == []
    assert report["vocab_size"] == 300 and report["error"] == min(report["errors"].values())
    assert "frequency" in capsys.readouterr().out


BAD = {
    "missing source": (["{tmp}/nope.safetensors", "--rank", "4"], "does not exist"),
    "not safetensors": (["{tmp}/junk.safetensors", "--rank", "4"], "not a readable safetensors file"),
    "no embedding key": (["{tmp}/noemb.safetensors", "--rank", "4"], "no tensor with a known embedding name"),
    "unknown --key": (["{gpt2}", "--rank", "4", "--key", "nope"], "no tensor named 'nope'"),
    "rank 0": (["{gpt2}", "--rank", "0"], "--rank 0 is invalid"),
    "1-d key": (["{gpt2}", "--rank", "4", "--key", "bias"], "vocab, d_model"),
    "bad counts": (["{gpt2}", "--rank", "4", "--counts", "{tmp}/junk.safetensors"], "--counts"),
    "json --out": (["{gpt2}", "--rank", "4", "--out", "{tmp}/x.json"], "sidecar"),
    "not a checkpoint dir": (["{tmp}", "--rank", "4"], "not a muse_lm checkpoint"),
}


@pytest.fixture
def bad_paths(tmp_path) -> dict[str, str]:
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"lm_head.weight": torch.randn(20, 4), "norm": torch.ones(4)}, str(tmp_path / "noemb.safetensors"))
    save_file({"wte.weight": torch.randn(20, 4), "bias": torch.ones(4)}, str(tmp_path / "gpt2.safetensors"))
    return {"tmp": str(tmp_path), "gpt2": str(tmp_path / "gpt2.safetensors")}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_one_line_user_error(case, bad_paths, tmp_path):
    argv, match = BAD[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MuseUserError, match=match) as err:
        _convert([a.format(**bad_paths) for a in argv])
    assert "\n" not in " ".join(str(err.value).split())
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("case", ["missing source", "rank 0", "no embedding key"])
def test_cli_main_exits_2_with_one_line(case, bad_paths, capsys):
    argv, match = BAD[case]
    assert main(["convert", *[a.format(**bad_paths) for a in argv]]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("muse: error: ") and match in captured.err


def test_cli_main_converts(gpt2_file, capsys):
    path, _ = gpt2_file
    assert main(["convert", str(path), "--rank", "3", "--reorder", "none"]) == 0
    assert "relative Frobenius" in capsys.readouterr().out
    assert load_converted(path.with_name("gpt2-htt-r3.safetensors")).tt_ranks == (1, 3, 1)
    with pytest.raises(SystemExit) as exit_:  # argparse's own errors: one line, exit 2
        main(["convert", str(path), "--rank", "3", "--cores", "4"])
    assert exit_.value.code == 2

"""MuseLM.prune_ranks: every block pruned, the ranks recorded in the config, and a pruned model that
generates, saves and loads (save_pretrained and the trainer's checkpoint path) at its new shape."""

import copy

import pytest
import torch

from muse_lm import MuseConfig, MuseLM
from muse_lm.errors import ConfigError
from muse_lm.training.checkpoint import save_checkpoint
from muse_lm.training.loading import load_trained
from muse_lm.training.tokenizer import train_tokenizer

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=2, max_rank=6, min_rank=2, chunk_size=8,
             tt_rank=4, bk_heads=2)
# Per block running mean gates: block 0 loses components 2 and 4, block 1 loses 3, 4 and 5.
MEANS = [[1.0, 1.0, 0.05, 0.8, 0.2, 0.6], [1.0, 1.0, 0.9, 0.1, 0.3, 0.0]]


def pruned_pair(**kw) -> tuple[MuseLM, MuseLM]:
    """(model pruned at 0.5, unpruned copy with the pruned components' gates forced to 0), fp64."""
    torch.manual_seed(0)
    model = MuseLM(MuseConfig(**{**SMALL, **kw})).double().eval()
    with torch.no_grad():
        for block, means in zip(model.blocks, MEANS, strict=True):
            block.mixer.gate_bias.normal_(std=1.5)
            block.mixer.gate_mean.copy_(torch.tensor(means, dtype=torch.float64))
    ref = copy.deepcopy(model)
    reports = model.prune_ranks(0.5)
    assert [r.removed for r in reports] == [(2, 4), (3, 4, 5)]
    with torch.no_grad():
        for block, report in zip(ref.blocks, reports, strict=True):
            block.mixer.gate_bias[list(report.removed)] = -torch.inf
    return model, ref


def test_pruned_model_equals_unpruned_with_gates_forced_off_and_records_its_ranks():
    model, ref = pruned_pair()
    assert model.config.ranks == [4, 3]
    assert [b.mixer.rank for b in model.blocks] == [4, 3]
    assert model.num_parameters() < ref.num_parameters()
    ids, tgt = torch.randint(0, 97, (2, 19)), torch.randint(0, 97, (2, 19))
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=1e-12)
    loss, ce, aux = model(ids, tgt, return_parts=True)
    ref_loss, ref_ce, ref_aux = ref(ids, tgt, return_parts=True)
    torch.testing.assert_close(ce, ref_ce, rtol=0, atol=1e-12)
    torch.testing.assert_close(aux, ref_aux, rtol=0, atol=1e-15)


def test_generation_with_the_state_cache_equals_full_recomputation_after_pruning():
    model, _ = pruned_pair()
    prompt = torch.randint(0, 97, (3, 11))
    out = model.generate(prompt, 12, temperature=0)
    seq = prompt
    for _ in range(12):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    _, _, states = model.trunk(prompt, return_state=True)
    assert [st.ssm.ssm.shape[2] for st in states] == [4, 3]


def test_pruned_model_saves_and_loads_with_save_pretrained(tmp_path):
    model, _ = pruned_pair()
    model.save_pretrained(tmp_path / "m")
    loaded = MuseLM.from_pretrained(tmp_path / "m").eval()  # fp32, as MuseLM builds it
    assert loaded.config == model.config and loaded.config.ranks == [4, 3]
    ids = torch.randint(0, 97, (2, 13))
    torch.testing.assert_close(loaded(ids), model.float()(ids), rtol=0, atol=0)
    torch.testing.assert_close(loaded.blocks[1].mixer.gate_mean, model.blocks[1].mixer.gate_mean, rtol=0, atol=0)


def test_pruned_model_loads_from_a_trainer_checkpoint(tmp_path):
    tokenizer = train_tokenizer([f"def f{i}(x): return x + {i}\n" for i in range(20)], 300)
    model, _ = pruned_pair(vocab_size=tokenizer.get_vocab_size())
    ckpt = save_checkpoint(tmp_path / "run", 7, model_state=model.state_dict(), config=model.config_json(),
                           tokenizer_json=tokenizer.to_str(), train_state={})
    trained = load_trained(ckpt)
    assert trained.model.config.ranks == [4, 3]
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 9))
    torch.testing.assert_close(trained.model(ids), model.float()(ids), rtol=0, atol=0)


def test_a_threshold_that_empties_one_block_leaves_the_whole_model_unchanged():
    torch.manual_seed(0)
    model = MuseLM(MuseConfig(**{**SMALL, "min_rank": 0}))
    with torch.no_grad():
        model.blocks[1].mixer.gate_mean.fill_(0.1)
    with pytest.raises(ValueError, match="block 1: threshold=0.5 would remove all 6 rank components"):
        model.prune_ranks(0.5)
    assert model.config.ranks is None and [b.mixer.rank for b in model.blocks] == [6, 6]


@pytest.mark.parametrize("ranks", [[4], [4, 7], [1, 4], [4, True], "4,4", [4.0, 4]])
def test_config_ranks_are_validated(ranks):
    fix = "list of n_layers=2 integers in \\[max\\(min_rank, 1\\)=2, max_rank=6\\]"
    with pytest.raises(ConfigError, match=f"MuseConfig.ranks=.*{fix}"):
        MuseConfig(**{**SMALL, "ranks": ranks})


def test_config_ranks_round_trip_and_default():
    assert MuseConfig(**SMALL).ranks is None and MuseConfig(**SMALL).layer_rank(1) == 6
    cfg = MuseConfig(**{**SMALL, "ranks": (3, 5)})
    assert cfg.ranks == [3, 5] and cfg.layer_rank(1) == 5
    assert MuseConfig.from_dict(cfg.to_dict()) == cfg

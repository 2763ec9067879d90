import pytest
import torch
import torch.nn.functional as F

from muse_lm import MuseConfig, MuseLM, TransformerConfig, TransformerLM
from muse_lm.errors import CheckpointError, ConfigError

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=2, max_rank=6, min_rank=2, chunk_size=8,
             tt_rank=4, bk_heads=2)


def small_model(**kw) -> MuseLM:
    torch.manual_seed(0)
    return MuseLM(MuseConfig(**{**SMALL, **kw})).double().eval()


@pytest.mark.parametrize("embedding", ["htt", "dense"])
def test_model_is_causal(embedding):
    model = small_model(embedding=embedding)
    ids = torch.randint(0, 97, (2, 19))
    base = model(ids)
    for t in (0, 8, 17):
        ids2 = ids.clone()
        ids2[:, t + 1] = (ids2[:, t + 1] + 1) % 97
        out = model(ids2)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_loss_equals_cross_entropy_of_logits_plus_gate_penalty():
    model = small_model()
    ids, tgt = torch.randint(0, 97, (2, 13)), torch.randint(0, 97, (2, 13))
    loss, ce, aux = model(ids, tgt, return_parts=True)
    ref = F.cross_entropy(model(ids).reshape(-1, 97), tgt.reshape(-1))
    torch.testing.assert_close(ce, ref)
    torch.testing.assert_close(loss, ce + aux)
    assert aux > 0
    torch.testing.assert_close(model(ids, tgt), loss)


def test_any_length_works_and_gradients_reach_every_parameter():
    model = small_model().train()
    for T in (1, 5, 70):
        ids = torch.randint(0, 97, (2, T))
        model.zero_grad()
        model(ids, ids).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_activation_checkpointing_gives_the_same_gradients():
    model = small_model().train()
    ids = torch.randint(0, 97, (2, 20))
    model(ids, ids).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(ids, ids).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


@pytest.mark.parametrize("bk_heads", [0, 2])
def test_generation_with_state_cache_equals_full_recomputation(bk_heads):
    model = small_model(bk_heads=bk_heads)
    prompt = torch.randint(0, 97, (3, 11))
    out = model.generate(prompt, 15, temperature=0)
    seq = prompt
    for _ in range(15):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_state_cache_size_is_constant_in_tokens():
    model = small_model()
    ids = torch.randint(0, 97, (1, 5))
    _, _, s1 = model.trunk(ids, return_state=True)
    _, _, s2 = model.trunk(torch.randint(0, 97, (1, 40)), return_state=True)
    size = lambda states: sum(st.ssm.conv.numel() + st.ssm.ssm.numel() + st.bk.numel() for st in states)
    assert size(s1) == size(s2)


def test_sampling_is_seeded_and_stops_at_eos():
    model = small_model()
    prompt = torch.randint(0, 97, (2, 4))
    a = model.generate(prompt, 10, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    b = model.generate(prompt, 10, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert torch.equal(a, b)
    eos = int(a[0, 4])
    c = model.generate(prompt[:1], 10, temperature=1.0, top_k=20, top_p=0.9, seed=3, eos_token_id=eos)
    assert c.shape[1] == 5 and int(c[0, -1]) == eos


def test_out_of_vocab_ids_raise_value_error_naming_id_and_vocab():
    model = small_model()
    with pytest.raises(ValueError, match=r"token id 97 .*\[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model.generate(torch.tensor([[-1]]), 2)


def test_config_validation_names_field_value_and_fix():
    with pytest.raises(ConfigError, match=r"MuseConfig\.n_heads=3 .*must divide"):
        MuseConfig(d_model=32, n_heads=3)
    with pytest.raises(ConfigError, match=r"MuseConfig\.gate_mode='hard'"):
        MuseConfig(gate_mode="hard")
    with pytest.raises(ConfigError, match="min_rank"):
        MuseConfig(max_rank=4, min_rank=5)
    with pytest.raises(ConfigError, match="unknown fields"):
        MuseConfig.from_dict({"d_model": 8, "depth": 3})


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = small_model()
    model.set_gate_mode("gumbel", gumbel_temperature=0.4)
    model.save_pretrained(tmp_path / "m")
    loaded = MuseLM.from_pretrained(tmp_path / "m").double().eval()
    assert loaded.config == model.config and loaded.config.vocab_size == 97
    assert loaded.blocks[0].mixer.gate_mode == "gumbel"
    ids = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(loaded(ids), model(ids))
    with pytest.raises(CheckpointError):
        MuseLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError):
        TransformerLM.from_pretrained(tmp_path / "m")


def test_transformer_baseline_contract_and_causality():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4)).double()
    ids = torch.randint(0, 50, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 50)
    ids2 = ids.clone()
    ids2[:, 6] = (ids2[:, 6] + 1) % 50
    torch.testing.assert_close(model(ids2)[:, :6], logits[:, :6], rtol=0, atol=1e-12)
    loss, ce, aux = model(ids, ids, return_parts=True)
    torch.testing.assert_close(ce, F.cross_entropy(logits.reshape(-1, 50), ids.reshape(-1)))
    assert aux == 0


def test_generate_restores_mode_and_id_checking():
    model = small_model().train()
    model.generate(torch.randint(0, 97, (1, 3)), 2, temperature=0)
    assert model.training and model.check_ids
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.randint(0, 97, (1, 3)), 2, top_k=0)
    assert model.training and model.check_ids


def test_activation_checkpointing_updates_the_gate_means_once_per_batch():
    """The recomputation in backward must not count the batch a second time in the running gate
    means (they decide rank pruning): with and without checkpointing they are equal after a step."""
    import dataclasses

    from muse_lm.presets import get_preset

    cfg = dataclasses.replace(get_preset("tiny").model, n_layers=2, d_model=32, n_heads=2, vocab_size=64)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    means = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = MuseLM(cfg).train()
        model.gradient_checkpointing = ckpt
        model(ids[:, :-1], ids[:, 1:]).backward()
        means.append([b.mixer.gate_mean.clone() for b in model.blocks])
    fresh = MuseLM(cfg).blocks[0].mixer.gate_mean
    assert not torch.equal(means[0][0], fresh)  # the step did update them
    for plain, checkpointed in zip(*means):
        assert torch.allclose(plain, checkpointed, rtol=0, atol=1e-7)

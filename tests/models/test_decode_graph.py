"""Static-buffer decode steps on the CPU (no capture here: tests/gpu/test_decode_graph_gpu.py replays
graphs): MuseLM's in-place state step equals the eager step, padded buckets change nothing, and the
TransformerLM's static KV-cache decode equals its full forward."""

import copy
import pickle

import pytest
import torch

from muse_lm import MuseConfig, MuseLM
from muse_lm.models import TransformerConfig, TransformerLM
from muse_lm.models.batched_state import cat_states, decode_step, prefill
from muse_lm.models.decode_graph import (
    KVCacheDecoder,
    MuseDecoder,
    _DecoderSlot,
    bucket_size,
    greedy_vs_full,
    release_decoder,
    resolve_cuda_graph,
    state_nbytes,
    static_decode_step,
    weights_signature,
)

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=2, max_rank=6, min_rank=2, chunk_size=8, tt_rank=4)
# fp32 states (the AR-SSM state is fp32, the BK resolvent complex64): the 1e-4 relative bound
# on teacher-forced logits, with margin.
TOL = dict(rtol=1e-5, atol=1e-5)


def muse(**kw) -> MuseLM:
    torch.manual_seed(0)
    return MuseLM(MuseConfig(**{**SMALL, **kw})).eval()


def transformer() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2)).eval()


def assert_states_close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.ssm.conv, y.ssm.conv, **TOL)
        torch.testing.assert_close(x.ssm.ssm, y.ssm.ssm, **TOL)
        if x.bk is None:
            assert y.bk is None
        else:
            torch.testing.assert_close(x.bk, y.bk, **TOL)


def test_bucket_size_pads_to_the_next_bucket_and_to_multiples_of_the_largest():
    assert [bucket_size(b) for b in (1, 2, 3, 5, 8, 9, 17, 32, 33, 65)] == [1, 2, 4, 8, 8, 16, 32, 32, 64, 96]
    assert bucket_size(3, (4, 16)) == 4 and bucket_size(17, (4, 16)) == 32
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive integer"):
            bucket_size(bad)


@pytest.mark.parametrize("bk_heads", [2, 0])
def test_in_place_static_step_equals_the_eager_step(bk_heads):
    model = muse(bk_heads=bk_heads)
    ids = torch.randint(0, 97, (3, 10))
    with torch.no_grad():
        _, eager = prefill(model, ids)
        _, static = prefill(model, ids)
        buffers = [t for s in static for t in (s.ssm.conv, s.ssm.ssm, s.bk) if t is not None]
        addresses = [t.data_ptr() for t in buffers]
        for _ in range(4):
            nxt = torch.randint(0, 97, (3,))
            want, eager = decode_step(model, nxt, eager)
            got = static_decode_step(model, nxt, static)
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same ops on the same shapes
            assert_states_close(static, eager)
    assert [t.data_ptr() for t in buffers] == addresses  # updated in place, never reallocated


@pytest.mark.parametrize("bk_heads", [2, 0])
def test_padded_decoder_matches_eager_decoding_of_rows_of_different_lengths(bk_heads):
    model = muse(bk_heads=bk_heads)
    parts = [prefill(model, torch.randint(0, 97, (1, n))) for n in (4, 13, 7)]
    logits = torch.cat([lg for lg, _ in parts])
    eager = cat_states([s for _, s in parts])
    decoder = MuseDecoder(model, cuda_graph=False)
    decoder.load(eager)
    assert decoder.batch == 3 and decoder.captured == (4,)  # 3 rows run in bucket 4
    with torch.no_grad():
        for _ in range(5):
            nxt = logits.argmax(-1)
            logits, eager = decode_step(model, nxt, eager)
            torch.testing.assert_close(decoder.step(nxt), logits, **TOL)
    assert_states_close(decoder.states(), eager)


def test_teacher_forced_decoder_logits_equal_full_recomputation():
    model = muse()
    seq = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(seq)
        _, states = prefill(model, seq[:, :6])
        decoder = MuseDecoder(model, cuda_graph=False)
        decoder.load(states)
        for t in range(6, 30):
            torch.testing.assert_close(decoder.step(seq[:, t]), full[:, t], **TOL)


def test_decoder_reload_switches_buckets_and_a_new_load_replaces_the_old_rows():
    model = muse()
    decoder = MuseDecoder(model, cuda_graph=False)
    with torch.no_grad():
        one = prefill(model, torch.randint(0, 97, (1, 5)))
        five = prefill(model, torch.randint(0, 97, (5, 5)))
        decoder.load(five[1])
        decoder.load(one[1])
        got = decoder.step(one[0].argmax(-1))
        want, _ = decode_step(model, one[0].argmax(-1), one[1])
    assert decoder.captured == (1, 8)
    torch.testing.assert_close(got, want, **TOL)


def test_decoder_rejects_misuse_with_clear_errors():
    model = muse()
    decoder = MuseDecoder(model, cuda_graph=False)
    with pytest.raises(ValueError, match="before load"):
        decoder.step(torch.tensor([1]))
    with torch.no_grad():
        _, states = prefill(model, torch.randint(0, 97, (2, 4)))
    decoder.load(states)
    with pytest.raises(ValueError, match=r"one token per loaded row, shape \[2\]"):
        decoder.step(torch.tensor([1, 2, 3]))
    other = MuseDecoder(muse(max_rank=5), cuda_graph=False)
    with pytest.raises(ValueError, match="does not match the model"):
        other.load(states)
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        MuseDecoder(model, cuda_graph=False).load(states)
    with pytest.raises(ValueError, match="ascending"):
        MuseDecoder(model, buckets=(4, 2))


def test_cuda_graph_on_the_cpu_raises_and_none_means_eager():
    assert resolve_cuda_graph(torch.device("cpu"), None) is False
    assert resolve_cuda_graph(torch.device("cpu"), False) is False
    model = muse()
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        model.generate(torch.tensor([[1, 2]]), 3, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA device"):
        MuseDecoder(model, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA device"):
        KVCacheDecoder(transformer(), 1, 8, cuda_graph=True)


def test_generate_eager_is_unchanged_and_state_size_is_reported():
    model = muse()
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, 6, temperature=0, cuda_graph=False)
    assert torch.equal(out, model.generate(prompt, 6, temperature=0))
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    _, states = prefill(model, prompt)
    cfg = model.config
    per_row = cfg.n_layers * (4 * ((cfg.conv_size - 1) * cfg.d_model + cfg.n_heads * cfg.max_rank * cfg.head_dim)
                              + 8 * cfg.bk_heads)
    assert state_nbytes(states) == 2 * per_row


def test_weights_signature_changes_with_pruning_and_copies_of_a_model_drop_its_decoder():
    model = muse()
    before = weights_signature(model)
    assert weights_signature(model) == before
    slot = _DecoderSlot()  # what cached_decoder keeps on a CUDA model
    slot.decoder, slot.signature = MuseDecoder(model, cuda_graph=False), before
    model._decode_graph_slot = slot
    twin = copy.deepcopy(model)
    assert twin._decode_graph_slot.decoder is None and slot.decoder is not None
    assert pickle.loads(pickle.dumps(slot)).decoder is None
    release_decoder(model)
    assert slot.decoder is None and slot.signature is None
    for block in model.blocks:  # random init: spread the gate statistics so half the ranks go
        block.mixer.gate_mean.copy_(torch.linspace(1, 0, block.mixer.rank))
    model.prune_ranks(0.5)
    assert weights_signature(model) != before  # a cached decoder would be rebuilt
    model.set_gate_mode("ste")
    assert weights_signature(model)[1] == ("ste", "ste")


def test_greedy_vs_full_counts_disagreements_and_their_logit_gaps():
    model = muse()
    prompt = torch.randint(0, 97, (3, 7))
    out = model.generate(prompt, 10, temperature=0, cuda_graph=False)
    with torch.no_grad():
        full = model(out)[:, 6:-1]
    same = greedy_vs_full(full, out[:, 7:])  # fp32: the decode path picks the full forward's argmax
    assert (same["positions"], same["differ"], same["max_gap"], same["max_gap_over_std"]) == (30, 0, 0.0, 0.0)
    assert same["max_gap_over_top"] == 0.0
    assert same["logit_std"] == pytest.approx(full.std(-1).mean().item())
    logits = torch.tensor([[[3.0, 1.0, 1.0, -1.0], [0.0, 2.0, 2.0, 0.0]]])  # std 1.633 at both positions
    got = greedy_vs_full(logits, torch.tensor([[1, 2]]))  # 2 below the argmax; an exact tie is agreement
    assert (got["positions"], got["differ"], got["max_gap"]) == (2, 1, 2.0)
    assert got["max_gap_over_std"] == pytest.approx(2.0 / logits[0, 0].std().item())
    assert got["max_gap_over_top"] == pytest.approx(2.0 / 3.0)
    with pytest.raises(ValueError, match=r"\[B, n, V\]"):
        greedy_vs_full(logits[0], torch.tensor([1, 2]))


def test_kv_cache_prefill_and_decode_equal_the_full_forward():
    model = transformer()
    seq = torch.randint(0, 97, (3, 24))
    cache = model.new_kv_cache(3, 24)
    with torch.no_grad():
        full = model(seq)
        torch.testing.assert_close(model.prefill_kv(seq[:, :9], cache), full[:, 8], **TOL)
        for t in range(9, 24):
            torch.testing.assert_close(model.decode_kv(seq[:, t], cache), full[:, t], **TOL)
    assert cache.filled == 24 and int(cache.length) == 24
    assert cache.nbytes() == 2 * 2 * 3 * 24 * 32 * 4  # K and V, 2 layers, [3, 24, 32] fp32
    with pytest.raises(ValueError, match="full"):
        model.decode_kv(seq[:, 0], cache)
    with pytest.raises(ValueError, match="empty cache"):
        model.prefill_kv(seq[:, :2], cache)
    with pytest.raises(ValueError, match="does not fit"):
        model.prefill_kv(seq, model.new_kv_cache(3, 8))
    with pytest.raises(ValueError, match=r"one token per row, shape \[3\]"):
        model.decode_kv(seq[:2, 0], model.new_kv_cache(3, 8))


def test_masked_static_kv_step_equals_the_exact_prefix_step():
    """The captured form (mask over all max_len positions) equals the eager form (exact prefix)."""
    model = transformer()
    seq = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        full = model(seq)
        decoder = KVCacheDecoder(model, 2, 40, cuda_graph=False)
        torch.testing.assert_close(decoder.prefill(seq[:, :5]), full[:, 4], **TOL)
        masked = model.new_kv_cache(2, 40)
        model.prefill_kv(seq[:, :5], masked)
        for t in range(5, 16):
            torch.testing.assert_close(decoder.step(seq[:, t]), full[:, t], **TOL)
            torch.testing.assert_close(model.kv_step(seq[:, t], masked), full[:, t], **TOL)
    assert int(masked.length) == 16 and masked.filled == 5  # kv_step leaves the host count to its caller

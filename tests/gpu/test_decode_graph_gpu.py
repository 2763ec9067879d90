"""Captured decode steps on a real GPU: replayed CUDA graphs give the eager path's greedy tokens (several
batch sizes, padded buckets, prompt lengths), fp32 teacher-forced logits equal full recomputation to
1e-4 relative, bf16 logits agree within bf16 noise, graphs are reused across `generate` calls and
captured again after the weights change; the same for the transformer's static KV-cache step.
Skipped without CUDA."""

import pytest
import torch

from muse_lm import MuseConfig, MuseLM
from muse_lm.models import TransformerConfig, TransformerLM
from muse_lm.models.batched_state import decode_step, prefill
from muse_lm.models.decode_graph import KVCacheDecoder, MuseDecoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = dict(vocab_size=300, d_model=64, n_layers=2, n_heads=4, max_rank=8, min_rank=2, chunk_size=16, tt_rank=4)


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 means fp32 here: TF32 convolutions (cuDNN's default) would blur the 1e-4 comparison."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def muse(dtype=torch.float32, **kw) -> MuseLM:
    torch.manual_seed(0)
    return MuseLM(MuseConfig(**{**CFG, **kw})).to("cuda", dtype).eval()


def transformer() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4)).cuda().eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize(("batch", "prompt_len"), [(1, 1), (3, 17), (8, 130), (33, 9)])
@pytest.mark.parametrize("bk_heads", [4, 0])
def test_captured_greedy_tokens_equal_eager(batch, prompt_len, bk_heads):
    model = muse(bk_heads=bk_heads)
    prompt = torch.randint(0, 300, (batch, prompt_len), device="cuda")
    graph = model.generate(prompt, 24, temperature=0, cuda_graph=True)
    eager = model.generate(prompt, 24, temperature=0, cuda_graph=False)
    assert torch.equal(graph, eager)


def test_captured_teacher_forced_logits_equal_full_recomputation_fp32():
    model = muse()
    seq = torch.randint(0, 300, (3, 80), device="cuda")
    with torch.no_grad():
        full = model(seq)
        _, states = prefill(model, seq[:, :20])
    decoder = MuseDecoder(model, cuda_graph=True)
    decoder.load(states)
    assert decoder.captured == (4,)
    worst = max(rel_err(decoder.step(seq[:, t]), full[:, t]) for t in range(20, 80))
    assert worst < 1e-4


@pytest.mark.parametrize("batch", [4, 3])  # an exact bucket, and one padded to 4
def test_bf16_captured_logits_agree_with_eager_within_bf16_noise(batch):
    model = muse(torch.bfloat16)
    seq = torch.randint(0, 300, (batch, 48), device="cuda")
    with torch.no_grad():
        logits, eager = prefill(model, seq[:, :16])
        decoder = MuseDecoder(model, cuda_graph=True)
        decoder.load(eager)
        for t in range(16, 48):
            want, eager = decode_step(model, seq[:, t], eager)
            got = decoder.step(seq[:, t]).clone()
            assert rel_err(got, want) < 2e-2
            top2 = want.float().topk(2, dim=-1).values
            tie = (top2[:, 0] - top2[:, 1]) < 0.05 * top2[:, 0].abs().clamp_min(1)
            same = got.argmax(-1) == want.argmax(-1)
            assert bool((same | tie).all()), "greedy tokens differ away from a near-tie"


def test_generate_reuses_graphs_and_captures_again_after_the_weights_change():
    model = muse()
    prompt = torch.randint(0, 300, (2, 10), device="cuda")
    first = model.generate(prompt, 8, temperature=0)
    decoder = model._decode_graph_slot.decoder
    assert decoder is not None and decoder.captured == (2,)
    assert torch.equal(model.generate(prompt, 8, temperature=0), first)
    assert model._decode_graph_slot.decoder is decoder
    for block in model.blocks:
        block.mixer.gate_mean.copy_(torch.linspace(1, 0, block.mixer.rank))
    model.prune_ranks(0.5)
    pruned = model.generate(prompt, 8, temperature=0)
    assert model._decode_graph_slot.decoder is not decoder
    assert torch.equal(pruned, model.generate(prompt, 8, temperature=0, cuda_graph=False))


def test_a_second_stream_on_the_same_model_is_refused_not_mixed_up():
    model = muse()
    prompt = torch.randint(0, 300, (1, 5), device="cuda")
    # Two tokens each: the first comes from the prefill, the graph decoder is loaded for the second.
    first = model.generate_stream(prompt, 5, temperature=0)
    next(first), next(first)
    second = model.generate_stream(prompt, 5, temperature=0)
    next(second), next(second)
    with pytest.raises(RuntimeError, match="took over"):
        next(first)


def test_captured_kv_cache_step_equals_eager_and_full_forward():
    model = transformer()
    seq = torch.randint(0, 300, (5, 70), device="cuda")
    with torch.no_grad():
        full = model(seq)
    graph = KVCacheDecoder(model, 5, 72, cuda_graph=True)
    eager = KVCacheDecoder(model, 5, 72, cuda_graph=False)
    assert rel_err(graph.prefill(seq[:, :30]), full[:, 29]) < 1e-4
    eager.prefill(seq[:, :30])
    for t in range(30, 70):
        want = eager.step(seq[:, t])
        got = graph.step(seq[:, t])
        assert rel_err(got, full[:, t]) < 1e-4 and rel_err(got, want) < 1e-4
    assert graph.cache.filled == 70 and int(graph.cache.length) == 70


@pytest.mark.parametrize("batch", [1, 5])
def test_captured_kv_cache_greedy_tokens_equal_eager(batch):
    model = transformer()
    prompt = torch.randint(0, 300, (batch, 33), device="cuda")
    tokens = []
    for cuda_graph in (True, False):
        dec = KVCacheDecoder(model, batch, 33 + 20, cuda_graph=cuda_graph)
        logits, out = dec.prefill(prompt), []
        for _ in range(20):
            out.append(logits.argmax(-1))
            logits = dec.step(out[-1])
        tokens.append(torch.stack(out, 1))
    assert torch.equal(tokens[0], tokens[1])

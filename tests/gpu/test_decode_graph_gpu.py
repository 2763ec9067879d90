"""Captured decode steps on a real GPU: replayed CUDA graphs give the eager path's greedy tokens (several
batch sizes, padded buckets, prompt lengths), fp32 teacher-forced logits equal full recomputation to
1e-4 relative, bf16 logits agree within bf16 noise, graphs are reused across `generate` calls and
captured again after the weights change; the same for the transformer's static KV-cache step.
A briefly trained model: bf16 greedy generations agree with full recomputation except at near-ties,
and the serving engine's graph decoder gives the static decoder's greedy text as requests come and go.
Skipped without CUDA."""

import copy

import pytest
import tokenizers
import torch

from muse_lm import MuseConfig, MuseLM
from muse_lm.models import TransformerConfig, TransformerLM
from muse_lm.models.batched_state import decode_step, prefill
from muse_lm.models.decode_graph import KVCacheDecoder, MuseDecoder, greedy_vs_full
from muse_lm.serving.engine import Engine
from muse_lm.serving.params import SamplingParams, ServeLimits
from muse_lm.training.tokenizer import train_tokenizer

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


# ---- a briefly trained model: logits that are not flat -------------------------------------------------
DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # doc {i}\n" for i in range(80)]


@pytest.fixture(scope="module")
def trained() -> tuple[MuseLM, tokenizers.Tokenizer]:
    """A fp32 MuseLM (CFG's shape) trained 60 steps on a repetitive synthetic text (DOCS over and over).

    Random-init logits are nearly flat (std ~0.02 over the vocabulary), so almost every greedy choice
    is a near-tie and a greedy comparison says nothing; after a few steps on text this regular the
    model predicts most tokens with a clear margin and ties are the exception, as with a real model.
    """
    tokenizer = train_tokenizer(DOCS, 300)
    torch.manual_seed(0)
    model = MuseLM(MuseConfig(**{**CFG, "vocab_size": tokenizer.get_vocab_size()})).cuda()
    ids = torch.tensor([i for doc in DOCS for i in tokenizer.encode(doc).ids], device="cuda")
    windows = ids[: len(ids) // 65 * 65].view(-1, 65)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(60):
        batch = windows[torch.randint(len(windows), (16,), device="cuda", generator=gen)]
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tokenizer


def test_greedy_bf16_generation_agrees_with_full_recomputation_except_at_near_ties(trained):
    """Issue 8: greedy bf16 tokens from the captured graph against the argmax of one full bf16 forward
    over prompt + generated tokens, at every generated position. Where they differ, the full forward's
    logit gap between its argmax and the generated token must be a near-tie: at most |argmax logit|/64.

    Why that bound: the logits are bf16, 8 significant bits, so near a logit x they lie on a grid of
    spacing 2^(floor(log2|x|) - 7) <= |x|/128, and two different values are at least one step apart.
    The full forward (chunked scan) and the graph (one-token recurrence) compute the same function in
    a different order and round at different points. Measured on an H200 (this model, 96 prompts x 48
    tokens): the two paths' logits differed by at most 0.125 (the largest logits are ~16, where the
    grid step is 0.125), and each of the 15 disagreements had a full-forward gap of exactly one grid
    step (0.0625 at |x| ~ 9, 0.03125 at |x| ~ 5: up to 3.5% of the logit std, so a bound of 2% of the
    std would call a one-step bf16 tie an error). |x|/64 allows two steps: tokens that close are tied
    to bf16 resolution; a wider gap is a real disagreement."""
    model, tokenizer = trained
    model = copy.deepcopy(model).to(torch.bfloat16)
    text = "".join(DOCS)
    starts = [0, 170, 555, 901]
    ids = torch.tensor(tokenizer.encode(text).ids, device="cuda")
    prompt = torch.stack([ids[s: s + 24] for s in starts])
    out = model.generate(prompt, 48, temperature=0, cuda_graph=True)
    assert model._decode_graph_slot.decoder.captured == (4,)  # the tokens came from the captured graph
    tokens = out[:, 24:]
    with torch.no_grad():
        full = model(out)[:, 23:-1]
    stats = greedy_vs_full(full, tokens)
    print(f"greedy bf16 vs full recomputation: {stats}")
    assert stats["positions"] == 4 * 48
    assert stats["logit_std"] > 1.0, "the model's logits are nearly flat: train it longer"
    assert stats["differ"] <= stats["positions"] // 10, stats  # ties are the exception, not the rule
    assert stats["max_gap_over_top"] <= 1 / 64, f"a generated token differs away from a near-tie: {stats}"


def test_engine_with_cuda_graphs_gives_the_static_decoders_greedy_text(trained):
    """The serving engine on CUDA replays graphs (cuda_graph=None); requests that join at different
    steps and leave after different lengths get the same greedy text as with cuda_graph=False (the same
    static step, not captured), and the same number of tokens."""
    model, tokenizer = trained
    prompts = ["def f3(x):", "    return x * 1", "d", "def f41(x):\n    return", "  # doc 7"]
    jobs = [(0, 30), (0, 9), (3, 20), (5, 25), (12, 6)]  # (step it is submitted before, max_tokens)
    texts = {}
    for cuda_graph in (None, False):
        engine = Engine(model, tokenizer, limits=ServeLimits(max_batch_size=8), cuda_graph=cuda_graph)
        assert engine.decode_mode == ("cuda_graph" if cuda_graph is None else "static")
        events = {i: [] for i in range(len(jobs))}
        step = 0
        while True:
            for i, (at, n) in enumerate(jobs):
                if at == step:
                    engine.submit(engine.encode(prompts[i]), SamplingParams(max_tokens=n, temperature=0.0),
                                  events[i].append)
            if not engine.step() and step > max(at for at, _ in jobs):
                break
            step += 1
        assert all(ev[-1].finish_reason == "length" for ev in events.values())
        assert [ev[-1].completion_tokens for ev in events.values()] == [n for _, n in jobs]
        assert engine.stats()["max_batch_size"] == 4
        texts[cuda_graph] = ["".join(e.text for e in ev) for ev in events.values()]
        if cuda_graph is None:
            assert set(engine._decoder.captured) >= {2, 4}
    assert all(texts[None]) and texts[None] == texts[False]

"""Generation API: the repetition penalty in generate / generate_stream, and generate_batch over
prompts of different lengths (each row equals generating its prompt alone), on the CPU in fp32."""

import math

import pytest
import torch

from muse_lm import MuseConfig, MuseLM
from muse_lm.models.batched_state import generate_rows
from muse_lm.models.decode_graph import MuseDecoder
from muse_lm.models.sampling import RowSampler, apply_repetition_penalty

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=2, max_rank=6, min_rank=2, chunk_size=8,
             tt_rank=4, bk_heads=2)
# Lengths around the chunk size (8), two equal ones (prefilled together), and one of a single token.
LENGTHS = (5, 11, 1, 5, 17, 9)
LIMITS = [12, 3, 20, 0, 15, 8]


@pytest.fixture(scope="module")
def model() -> MuseLM:
    torch.manual_seed(0)
    return MuseLM(MuseConfig(**SMALL)).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (n,), generator=gen).tolist() for n in LENGTHS]


def penalized_by_recomputation(model: MuseLM, prompt: torch.Tensor, n: int, penalty: float) -> torch.Tensor:
    """The definition, written out: a full pass over the sequence each step, every id seen so far in
    the row pushed down once (positive logits divided by the penalty, the others multiplied), greedy."""
    seq = prompt
    for _ in range(n):
        logits = model.head_logits(model.trunk(seq)[0][:, -1]).clone()
        for row in range(seq.shape[0]):
            for token in set(seq[row].tolist()):
                value = logits[row, token]
                logits[row, token] = value / penalty if value > 0 else value * penalty
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


def test_repetition_penalty_in_generate_follows_its_definition(model):
    prompt = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    plain = model.generate(prompt, 16, temperature=0)
    for penalty in (1.8, 0.5):  # < 1 favours repeats
        out = model.generate(prompt, 16, temperature=0, repetition_penalty=penalty)
        assert torch.equal(out, penalized_by_recomputation(model, prompt, 16, penalty))
    assert not torch.equal(model.generate(prompt, 16, temperature=0, repetition_penalty=1.8), plain)
    assert torch.equal(model.generate(prompt, 16, temperature=0, repetition_penalty=1.0), plain)


@pytest.mark.parametrize("shift", [10.0, -10.0], ids=["positive-logits", "negative-logits"])
def test_penalty_pushes_seen_ids_down_whatever_the_logit_sign(model, monkeypatch, shift):
    """Every logit shifted to one sign (the random-init logits are within +-0.6 of 0): the penalty
    must push seen ids below every unseen one either way, so greedy text never repeats an id. The
    wrong rule for that sign (dividing a negative logit, multiplying a positive one) would raise
    them instead, and greedy would repeat."""
    head = model.head_logits
    monkeypatch.setattr(model, "head_logits", lambda h: head(h) + shift)
    prompt = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    plain = model.generate(prompt, 20, temperature=0)
    assert any(len(set(row)) < len(row) for row in plain.tolist())  # unpenalized greedy repeats
    out = model.generate(prompt, 20, temperature=0, repetition_penalty=1.8)
    assert all(len(set(row)) == len(row) for row in out.tolist()), out
    assert torch.equal(out, penalized_by_recomputation(model, prompt, 20, 1.8))


@pytest.mark.parametrize("penalty", [0.0, -1.0, math.nan, math.inf])
def test_bad_repetition_penalty_raises_before_the_first_token(model, penalty):
    with pytest.raises(ValueError, match="repetition_penalty=.* must be a finite number > 0"):
        model.generate_stream(torch.tensor([[1, 2]]), 4, repetition_penalty=penalty)
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.generate_batch([[1, 2]], 4, repetition_penalty=penalty)
    with pytest.raises(ValueError, match="repetition_penalty"):
        apply_repetition_penalty(torch.zeros(3), torch.ones(3, dtype=torch.bool), penalty)
    assert model.check_ids and not model.training


def check_rows_equal_alone(model, prompts, outs, limits, **settings):
    seeds = settings.pop("seed", None)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        seed = seeds[i] if isinstance(seeds, list) else seeds
        alone = model.generate(torch.tensor([prompt]), limits[i], seed=seed, **settings)[0]
        assert torch.equal(out, alone), f"row {i}: {out.tolist()} != {alone.tolist()}"


def test_generate_batch_greedy_rows_equal_each_prompt_alone(model, prompts):
    outs = model.generate_batch(prompts, LIMITS, temperature=0)
    assert [len(o) - len(p) for o, p in zip(outs, prompts)] == LIMITS
    assert all(o[: len(p)].tolist() == p for o, p in zip(outs, prompts))
    check_rows_equal_alone(model, prompts, outs, LIMITS, temperature=0)


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0, top_k=20, seed=[3, 4, 5, 6, 7, 8]),
    dict(temperature=0.9, top_p=0.9, repetition_penalty=1.5, seed=7),
], ids=["per-row-seeds", "one-seed-penalty"])
def test_generate_batch_seeded_sampling_rows_equal_each_prompt_alone(model, prompts, settings):
    outs = model.generate_batch(prompts, LIMITS, **settings)
    check_rows_equal_alone(model, prompts, outs, LIMITS, **settings)
    again = model.generate_batch(prompts, LIMITS, **settings)
    assert all(torch.equal(a, b) for a, b in zip(outs, again))


def test_generate_batch_row_ends_at_its_eos_while_the_others_go_on(model, prompts):
    greedy = model.generate_batch(prompts, 20, temperature=0)
    eos = int(greedy[1][len(prompts[1]) + 2])  # row 1's third new token
    outs = model.generate_batch(prompts, 20, temperature=0, eos_token_id=eos)
    new = [o[len(p):].tolist() for o, p in zip(outs, prompts)]
    assert new[1][-1] == eos and len(new[1]) <= 3 and new[1].count(eos) == 1
    assert any(len(n) == 20 and eos not in n for n in new)  # a row that never met it ran to its limit
    check_rows_equal_alone(model, prompts, outs, [20] * len(prompts), temperature=0, eos_token_id=eos)


class RecordingDecoder(MuseDecoder):
    """The static-buffer decoder (what CUDA graphs replay), stepped uncaptured, recording batch sizes."""

    def __init__(self, model):
        super().__init__(model, cuda_graph=False, buckets=(1, 2, 4, 8))
        self.batches = []

    def step(self, ids):
        self.batches.append(ids.shape[0])
        return super().step(ids)


def test_graph_decoder_path_gives_the_eager_outputs_as_rows_leave(model, prompts):
    rows = [torch.tensor(p) for p in prompts]
    settings = dict(temperature=0.8, top_k=30, repetition_penalty=1.3)

    def run(decoder):
        generators = [torch.Generator().manual_seed(s) for s in range(len(rows))]
        sampler = RowSampler(rows, 97, **settings, generator=generators)
        return generate_rows(model, rows, LIMITS, sampler, decoder=decoder)

    decoder = RecordingDecoder(model)
    assert run(decoder) == run(None)
    # Five rows start (the 0-token one never joins); they leave as each reaches its limit.
    assert decoder.batches[0] == 5 and decoder.batches[-1] == 1
    assert decoder.batches == sorted(decoder.batches, reverse=True) and len(set(decoder.batches)) == 5
    assert decoder.captured == (1, 2, 4, 8)


def test_generate_batch_takes_tensors_and_restores_the_mode(model, prompts):
    model.train()
    try:
        outs = model.generate_batch([torch.tensor(prompts[0]), prompts[1]], 4, temperature=0)
        assert model.training and model.check_ids
    finally:
        model.eval()
    assert torch.equal(outs[0], model.generate(torch.tensor([prompts[0]]), 4, temperature=0)[0])
    assert outs[0].dtype == torch.long and outs[1].shape == (len(prompts[1]) + 4,)


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "at least one prompt"),
    ([[1], []], {}, "prompt 1 has shape"),
    ([[[1, 2]]], {}, "prompt 0 has shape"),
    ([[1, 97]], {}, "token id 97"),
    ([[1.5]], {}, "integer tensor"),
    ([[1], [2]], {"max_new_tokens": [3]}, "max_new_tokens has 1 values for 2 prompts"),
    ([[1]], {"max_new_tokens": -1}, "max_new_tokens=-1 must be an integer >= 0"),
    ([[1], [2]], {"seed": [1, 2, 3]}, "seed has 3 values for 2 prompts"),
    ([[1]], {"top_p": 0.0}, "top_p"),
])
def test_generate_batch_bad_arguments_raise_value_error(model, prompts, kwargs, message):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate_batch(prompts, **kwargs)
    assert model.check_ids and not model.training

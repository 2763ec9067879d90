"""Batched decoding API: rows of the state cache step together, join and leave between steps."""

import pytest
import torch

from muse_lm import MuseConfig, MuseLM
from muse_lm.models.batched_state import batch_size, cat_states, decode_step, prefill, select_states

# The AR-SSM state is kept in fp32 and the BK resolvent in complex64 even in a float64 model,
# so the cached path matches recomputation to ~1e-6 relative, not to float64 precision.
TOL = dict(rtol=1e-5, atol=1e-6)
SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=2, max_rank=6, min_rank=2, chunk_size=8, tt_rank=4)


def small_model(**kw) -> MuseLM:
    torch.manual_seed(0)
    return MuseLM(MuseConfig(**{**SMALL, **kw})).double().eval()


@pytest.mark.parametrize("bk_heads", [2, 0])
def test_rows_of_different_lengths_step_together_like_full_recomputation(bk_heads):
    model = small_model(bk_heads=bk_heads)
    prompts = [torch.randint(0, 97, (1, n)) for n in (3, 11, 20)]
    parts = [prefill(model, p) for p in prompts]
    logits, states = torch.cat([lg for lg, _ in parts]), cat_states([s for _, s in parts])
    seqs = [p[0].tolist() for p in prompts]
    with torch.no_grad():
        for _ in range(4):
            nxt = logits.argmax(-1)
            for seq, tok in zip(seqs, nxt.tolist()):
                seq.append(tok)
            logits, states = decode_step(model, nxt, states)
            for row, seq in enumerate(seqs):
                full = model(torch.tensor([seq]))[0, -1]
                torch.testing.assert_close(logits[row], full, **TOL)


def test_a_row_can_leave_and_a_new_one_join_between_steps():
    model = small_model()
    a, b, c = (torch.randint(0, 97, (1, n)) for n in (5, 9, 4))
    with torch.no_grad():
        (la, sa), (lb, sb), (lc, sc) = prefill(model, a), prefill(model, b), prefill(model, c)
        _, both = decode_step(model, torch.cat([la, lb]).argmax(-1), cat_states([sa, sb]))
        only_b = select_states(both, [1])  # a leaves
        assert batch_size(only_b) == 1
        joined = cat_states([only_b, sc])  # c joins
        nb = torch.tensor([3])
        lj, _ = decode_step(model, torch.cat([nb, lc.argmax(-1)]), joined)
        _, sb1 = decode_step(model, lb.argmax(-1), sb)
        ref_b, _ = decode_step(model, nb, sb1)
    torch.testing.assert_close(lj[0], ref_b[0], **TOL)
    torch.testing.assert_close(lj[1], model(torch.cat([c, lc.argmax(-1)[:, None]], 1))[0, -1], **TOL)


def test_bad_shapes_and_rows_are_refused():
    model = small_model()
    _, states = prefill(model, torch.randint(0, 97, (2, 4)))
    with pytest.raises(ValueError, match="one token per row"):
        decode_step(model, torch.zeros(2, 1, dtype=torch.long), states)
    with pytest.raises(ValueError, match="3 tokens for a state of 2 rows"):
        decode_step(model, torch.zeros(3, dtype=torch.long), states)
    with pytest.raises(ValueError, match="out of range"):
        select_states(states, [2])
    with pytest.raises(ValueError, match="non-empty prompt"):
        prefill(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="with and without BK"):
        cat_states([states, prefill(small_model(bk_heads=0), torch.zeros(1, 2, dtype=torch.long))[1]])
    assert batch_size(select_states(states, [])) == 0

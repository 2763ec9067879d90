"""The batching engine, driven step by step (no thread, no HTTP), and its text/sampling helpers; the
static-buffer decoder path (what CUDA graphs replay) against the eager path on the CPU."""

from __future__ import annotations

import queue

import pytest
import torch

from muse_lm.serving import Engine, EngineClosedError, QueueFullError, SamplingParams, ServeLimits
from muse_lm.serving.text import TextStream, apply_repetition_penalty

GREEDY = dict(temperature=0.0)


class Collector:
    """on_event callback that records every event of one request."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def done(self) -> bool:
        return bool(self.events) and (self.events[-1].finish_reason is not None or self.events[-1].error is not None)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def last(self):
        return self.events[-1]


def make_engine(tiny, eos=None, cuda_graph=None, **limits) -> Engine:
    return Engine(tiny.model, tiny.tokenizer, eos_token_id=eos, limits=ServeLimits(**limits), cuda_graph=cuda_graph)


def run_all(engine: Engine, jobs: list[tuple[int, list[int], SamplingParams]]) -> list[Collector]:
    """Submits job i before step number jobs[i][0]; steps until every request is done."""
    collectors = [Collector() for _ in jobs]
    step = 0
    while True:
        for (at, ids, params), col in zip(jobs, collectors):
            if at == step:
                engine.submit(ids, params, col)
        if not engine.step() and step > max(at for at, _, _ in jobs):
            break
        step += 1
    assert all(c.done for c in collectors)
    return collectors


def generated_ids(engine_text: str, tiny) -> list[int]:
    return tiny.tokenizer.encode(engine_text, add_special_tokens=False).ids


PROMPTS = ["def f1(x):", "    return x * 7  # doc", "d", "def f12(x):\n    return x * 12"]


def test_greedy_output_is_the_same_alone_batched_and_with_generate(tiny_checkpoint):
    tiny = tiny_checkpoint
    engine = make_engine(tiny, max_batch_size=8)
    prompts = [engine.encode(p) for p in PROMPTS]
    lengths = [20, 7, 13, 20]
    alone = [run_all(engine, [(0, ids, SamplingParams(max_tokens=n, **GREEDY))])[0]
             for ids, n in zip(prompts, lengths)]
    # Staggered: requests join a running batch and leave it at different steps.
    together = run_all(engine, [(at, ids, SamplingParams(max_tokens=n, **GREEDY))
                                for at, ids, n in zip([0, 0, 3, 5], prompts, lengths)])
    for ids, n, a, b in zip(prompts, lengths, alone, together):
        expected = tiny.model.generate(torch.tensor([ids]), n, temperature=0.0)[0, len(ids):].tolist()
        assert a.text == b.text == tiny.tokenizer.decode(expected)
        assert a.last.finish_reason == b.last.finish_reason == "length"
        assert a.last.completion_tokens == n
    assert engine.stats()["max_batch_size"] == 4


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_checkpoint):
    tiny = tiny_checkpoint
    engine = make_engine(tiny)
    ids = engine.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=24, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.3, seed=7)
    alone = run_all(engine, [(0, ids, params)])[0].text
    others = [(0, engine.encode(p), SamplingParams(max_tokens=24, temperature=1.0, seed=s))
              for s, p in enumerate(PROMPTS)]
    batched = run_all(engine, [*others[:2], (2, ids, params), *others[2:]])[2].text
    reseeded = run_all(engine, [(0, ids, SamplingParams(**{**params.__dict__, "seed": 8}))])[0].text
    assert alone == batched
    assert reseeded != alone


def run_tracked(engine: Engine, jobs, cancel_at: dict[int, int]) -> tuple[list[Collector], list[tuple[int, ...]]]:
    """`run_all`, also cancelling job j before step cancel_at[j]; returns the collectors and, per step
    that decoded, the batch it decoded (request ids in row order)."""
    collectors = [Collector() for _ in jobs]
    handles, batches, step = {}, [], 0
    while True:
        for j, ((at, ids, params), col) in enumerate(zip(jobs, collectors)):
            if at == step:
                handles[j] = engine.submit(ids, params, col)
            if cancel_at.get(j) == step:
                handles[j].cancel()
        if not engine.step() and step > max(at for at, _, _ in jobs):
            break
        if engine._running:
            batches.append(tuple(seq.request.id for seq in engine._running))
        step += 1
    assert all(c.done for c in collectors)
    return collectors, batches


def test_static_decoder_path_gives_the_eager_outputs_as_requests_join_and_leave(tiny_checkpoint):
    """cuda_graph=False: the MuseDecoder that CUDA graphs replay, stepped eagerly (padded buckets,
    state loaded only when the batch changes) gives every request exactly the eager path's events."""
    tiny = tiny_checkpoint
    eager, static = make_engine(tiny, max_batch_size=4), make_engine(tiny, max_batch_size=4, cuda_graph=False)
    assert (eager.decode_mode, static.decode_mode) == ("eager", "static")
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        make_engine(tiny, cuda_graph=True)
    p = [eager.encode(text) for text in PROMPTS]
    sampled = dict(temperature=0.9, top_k=40, top_p=0.95)
    jobs = [(0, p[0], SamplingParams(max_tokens=20, **GREEDY)),
            (0, p[1], SamplingParams(max_tokens=9, seed=3, **sampled)),
            (2, p[2], SamplingParams(max_tokens=6, repetition_penalty=1.3, **GREEDY)),
            (4, p[3], SamplingParams(max_tokens=14, seed=5, repetition_penalty=1.2, **sampled)),
            (4, p[0], SamplingParams(max_tokens=3, seed=1, temperature=1.0)),  # queued: the batch is full
            (5, p[1], SamplingParams(max_tokens=30, seed=2, temperature=0.7)),  # cancelled while running
            (11, p[2], SamplingParams(max_tokens=7, **GREEDY))]
    cancel = {5: 12}
    loads = []
    decoder_load = static._decoder.load
    static._decoder.load = lambda states: (loads.append(len(states[0].ssm.ssm)), decoder_load(states))
    want, eager_batches = run_tracked(eager, jobs, cancel)
    got, batches = run_tracked(static, jobs, cancel)
    assert [c.events for c in got] == [c.events for c in want]
    assert [c.last.finish_reason for c in got] == ["length"] * 5 + ["cancelled", "length"]
    assert batches == eager_batches and max(map(len, batches)) == 4
    # The state goes into the decoder once per batch composition, not once per step.
    changes = [b for i, b in enumerate(batches) if i == 0 or b != batches[i - 1]]
    assert loads == [len(b) for b in changes] and len(loads) < len(batches)
    assert set(static._decoder.captured) == {1, 2, 4}  # 3 rows ran padded to the bucket of 4


def test_eos_stop_strings_and_max_tokens_end_a_request(tiny_checkpoint):
    tiny = tiny_checkpoint
    ids = make_engine(tiny).encode(PROMPTS[1])
    free = tiny.model.generate(torch.tensor([ids]), 12, temperature=0.0)[0, len(ids):].tolist()
    # EOS: pretend the first greedy token not seen before position k is the end-of-text token.
    k = next(k for k in range(1, 12) if free[k] not in free[:k])
    col = run_all(make_engine(tiny, eos=free[k]), [(0, ids, SamplingParams(max_tokens=12, **GREEDY))])[0]
    assert (col.last.finish_reason, col.last.completion_tokens) == ("stop", k + 1)
    assert col.text == tiny.tokenizer.decode(free[:k])  # the EOS itself is not text
    # Stop string: a piece of the greedy text; the output ends right before it.
    full = tiny.tokenizer.decode(free)
    stop = full[5:8]
    col = run_all(make_engine(tiny), [(0, ids, SamplingParams(max_tokens=12, stop=("zzz-never", stop), **GREEDY))])[0]
    assert col.last.finish_reason == "stop"
    assert col.text == full[:full.index(stop)]
    col = run_all(make_engine(tiny), [(0, ids, SamplingParams(max_tokens=12, **GREEDY))])[0]
    assert (col.text, col.last.finish_reason, col.last.completion_tokens) == (full, "length", 12)


def test_batch_never_exceeds_max_batch_size_and_everyone_finishes(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, max_batch_size=2)
    cols = run_all(engine, [(0, engine.encode(p), SamplingParams(max_tokens=5, **GREEDY)) for p in PROMPTS * 2])
    stats = engine.stats()
    assert stats["max_batch_size"] == 2
    assert stats["requests_served"] == 8 and stats["tokens_generated"] == 40
    assert stats["active"] == stats["queued"] == 0
    assert all(c.last.finish_reason == "length" for c in cols)


def test_cancel_frees_the_slot_running_or_queued(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, max_batch_size=1)
    ids = engine.encode(PROMPTS[0])
    running, waiting = Collector(), Collector()
    r1 = engine.submit(ids, SamplingParams(max_tokens=50), running)
    r2 = engine.submit(ids, SamplingParams(max_tokens=50), waiting)
    for _ in range(3):
        engine.step()
    assert engine.stats()["active"] == 1 and engine.stats()["queued"] == 1
    r1.cancel()
    r2.cancel()
    engine.step()
    assert running.last.finish_reason == waiting.last.finish_reason == "cancelled"
    stats = engine.stats()
    assert (stats["active"], stats["queued"], stats["requests_cancelled"], stats["requests_served"]) == (0, 0, 2, 0)
    assert not engine.step()


def test_limits_and_bad_prompts_are_refused(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, max_queue=2, max_prompt_tokens=4, max_tokens_cap=10)
    ok = SamplingParams(max_tokens=3)
    with pytest.raises(ValueError, match="more than this server's limit of 4"):
        engine.submit(list(range(5)), ok, Collector())
    with pytest.raises(ValueError, match="max_tokens=11 is more than this server's limit of 10"):
        engine.submit([1], SamplingParams(max_tokens=11), Collector())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([10**6], ok, Collector())
    with pytest.raises(ValueError, match="no tokens"):
        engine.submit([], ok, Collector())
    engine.submit([1], ok, Collector())
    engine.submit([2], ok, Collector())
    with pytest.raises(QueueFullError, match="max_queue=2"):
        engine.submit([3], ok, Collector())
    assert make_engine(tiny_checkpoint, eos=tiny_checkpoint.eos).encode("") == [tiny_checkpoint.eos]


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("temperature", -1.0), ("top_k", 0), ("top_p", 0.0),
                                          ("top_p", 1.5), ("repetition_penalty", 0.0), ("stop", ("",)),
                                          ("stop", ("a",) * 5), ("seed", -1), ("max_tokens", True)])
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        SamplingParams(**{field: value})


def test_engine_thread_serves_and_stops_cleanly(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, max_batch_size=4)
    ids = engine.encode(PROMPTS[0])
    events: queue.Queue = queue.Queue()
    engine.start()
    try:
        for _ in range(3):
            engine.submit(ids, SamplingParams(max_tokens=4, **GREEDY), events.put)
        finals = []
        while len(finals) < 3:
            event = events.get(timeout=30)
            if event.finish_reason:
                finals.append(event)
        # Stopping with one request still waiting or running fails it instead of leaving it hanging.
        engine.submit(ids, SamplingParams(max_tokens=1000), events.put)
    finally:
        engine.stop()
    assert engine._thread is not None and not engine._thread.is_alive()
    last = None
    while not events.empty():
        last = events.get()
    assert last is not None and (last.error or last.finish_reason == "length")
    with pytest.raises(EngineClosedError):
        engine.submit(ids, SamplingParams(), events.put)


def test_text_stream_holds_back_partial_characters_and_stop_prefixes(tiny_checkpoint):
    tok = tiny_checkpoint.tokenizer
    ids = tok.encode("x€y", add_special_tokens=False).ids  # '€' is 3 byte tokens: unseen in training
    assert len(ids) >= 4
    stream = TextStream(tok)
    deltas = [stream.add(i) for i in ids]
    assert "".join(deltas) == "x€y" and not any("\ufffd" in d for d in deltas)
    stream = TextStream(tok, stop=("*7",))
    deltas = [stream.add(i) for i in tok.encode("x *", add_special_tokens=False).ids]
    assert "".join(deltas) == "x " and stream.flush() == "*"  # "*" held back: it could start "*7"
    stream = TextStream(tok, stop=("*7",))
    out = "".join(stream.add(i) for i in tok.encode("x * 7 *7", add_special_tokens=False).ids)
    assert out == "x * 7 " and stream.stopped


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0])
    seen = torch.tensor([True, True, False, False])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits

"""Continuous batching: one thread owns the model and decodes every running request together.

Each loop iteration (`Engine.step`):
  1. admit: queued requests, up to `max_batch_size` running, are prefilled one by one (a chunked
     pass over the prompt that yields the recurrent state) and their state rows join the batch;
  2. sample: every running row draws its next token from its own logits with its own settings
     and its own torch.Generator, so a request's output does not depend on who it is batched with;
  3. retire: rows that hit EOS, a stop string or max_tokens (or were cancelled) leave the batch;
  4. decode: one step over the remaining rows gives their next logits.
A MuseLM's state is O(1) per sequence (no KV cache), so joining and leaving are row gathers.

The decode step runs in a decoder with `load(states)`, `step(ids) -> logits` and `states()`: on
CUDA a `MuseDecoder` that replays a captured CUDA graph per batch-size bucket (a step is hundreds of
small kernels; one replay launches them all: 2.5-2.9 ms instead of 20-23 ms per step for the 8gb
model on an H100, batch 1-32). The batch's state lives in the decoder's static buffers while the
batch stays the same; only when a row joins or leaves is it taken out (`states()`), gathered or
concatenated, and loaded back before the next step (`batched_state.BatchSteps`, shared with
`generate_batch`). Off CUDA the default is the eager `decode_step` (no static buffers, no padding
rows to compute); `cuda_graph=False` runs the static MuseDecoder without capture, so the CPU tests
cover that path too.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import tokenizers
import torch

from muse_lm.models.batched_state import BatchSteps, cat_states, prefill
from muse_lm.models.decode_graph import MuseDecoder
from muse_lm.models.muse import MuseLM
from muse_lm.serving.params import SamplingParams, ServeLimits
from muse_lm.serving.text import TextStream, sample_token

log = logging.getLogger("muse_lm.serving")


class QueueFullError(RuntimeError):
    """The wait queue holds `max_queue` requests already (HTTP 429)."""


class EngineClosedError(RuntimeError):
    """The engine was stopped (or its loop died); it takes no more requests (HTTP 503)."""


@dataclass(frozen=True)
class CompletionEvent:
    """What the engine tells a request's `on_event`, from the engine thread: new text, and at the
    end a finish_reason ("stop" | "length" | "cancelled") or an error."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class Request:
    """A submitted request. `cancel()` is safe from any thread: the engine drops it before its next step."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams,
                 on_event: Callable[[CompletionEvent], None]):
        self.id, self.prompt_ids, self.params, self.on_event = rid, prompt_ids, params, on_event
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Sequence:
    """A running request's decoding state, besides its state row (which lives in the batch)."""

    def __init__(self, request: Request, tokenizer: tokenizers.Tokenizer, vocab_size: int, device: torch.device):
        self.request = request
        self.stream = TextStream(tokenizer, request.params.stop)
        self.generated = 0
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.seen[torch.tensor(request.prompt_ids, device=device)] = True
        self.generator = torch.Generator(device=device)
        if request.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(request.params.seed)

    def emit(self, text: str, finish_reason: str | None) -> None:
        if text or finish_reason:
            self.request.on_event(CompletionEvent(text, finish_reason, len(self.request.prompt_ids), self.generated))


def _make_decoder(model: MuseLM, cuda_graph: bool | None) -> tuple[MuseDecoder | None, str]:
    """(decoder, its mode: "cuda_graph" | "static" | "eager") for Engine's `cuda_graph` flag; no
    decoder (the eager `decode_step`) off CUDA by default: without graphs, static buffers would
    only add copies and compute the padding rows of a bucket."""
    device = next(model.parameters()).device
    if cuda_graph is None and device.type != "cuda":
        return None, "eager"
    decoder = MuseDecoder(model, cuda_graph=cuda_graph)  # True off CUDA: ValueError that says so
    return decoder, "cuda_graph" if decoder.cuda_graph else "static"


class Engine:
    """Batched decoding of concurrent requests for one MuseLM.

    Args:
        model: the model; the engine puts it in eval mode and owns it from now on (its weights must
            not move or change while the engine runs: captured graphs replay their addresses).
        tokenizer: its tokenizer (ids <-> text, stop strings).
        eos_token_id: ends a request with finish_reason "stop" (None: only max_tokens and stop strings).
        limits: batch size, queue length, prompt and max_tokens caps.
        cuda_graph: None: decode steps replay CUDA graphs on CUDA and run the eager `decode_step`
            elsewhere; True: graphs (ValueError off CUDA); False: the same static-buffer decoder
            stepped eagerly, without capture (on any device; for tests and comparisons).
            `decode_mode` says which ("cuda_graph", "static" or "eager").

    Example:
        engine = Engine(model, tokenizer, eos_token_id=0); engine.start()
        engine.submit(engine.encode("def "), SamplingParams(max_tokens=8), print)
    """

    def __init__(self, model: MuseLM, tokenizer: tokenizers.Tokenizer, *, eos_token_id: int | None = None,
                 limits: ServeLimits | None = None, cuda_graph: bool | None = None):
        self.model, self.tokenizer, self.eos_token_id = model.eval(), tokenizer, eos_token_id
        # Prompts are range-checked once in `submit`; sampled ids are in range by construction.
        self.model.check_ids = False
        self.limits = limits or ServeLimits()
        self.device = next(model.parameters()).device
        self._cv = threading.Condition()
        self._queue: deque[Request] = deque()
        self._running: list[_Sequence] = []
        self._decoder, self.decode_mode = _make_decoder(self.model, cuda_graph)
        self._steps = BatchSteps(self.model, self._decoder)  # the running rows' state and decode steps
        # [B, V], row i = next-token logits of _running[i] (None: no rows). After a decode step with
        # graphs, a view of the decoder's output buffer: read before the next step, which overwrites it.
        self._logits: torch.Tensor | None = None
        self._ids = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.counters = {"requests_served": 0, "requests_cancelled": 0, "max_batch_size": 0, "tokens_generated": 0}

    # ---- client side (any thread) -----------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        """Prompt text -> ids; an empty prompt starts at a document boundary (EOS), as in training."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if not ids and self.eos_token_id is None:
            raise ValueError("prompt is empty and the tokenizer has no end-of-text token to start from")
        return ids or [self.eos_token_id]

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[CompletionEvent], None]) -> Request:
        """Queues a request; `on_event` is then called from the engine thread until a final event.

        Raises:
            ValueError: an empty or too long prompt, ids outside the vocabulary, max_tokens over the cap.
            QueueFullError, EngineClosedError: see those.
        """
        limits = self.limits
        if not prompt_ids:
            raise ValueError("prompt has no tokens; send at least one character")
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, more than this server's limit of "
                             f"{limits.max_prompt_tokens}; shorten it")
        if params.max_tokens > limits.max_tokens_cap:
            raise ValueError(f"max_tokens={params.max_tokens} is more than this server's limit of "
                             f"{limits.max_tokens_cap}; ask for fewer")
        self.model.validate_ids(torch.tensor(prompt_ids))
        with self._cv:
            if self._closed:
                raise EngineClosedError("the engine is stopped and takes no more requests")
            if len(self._queue) >= limits.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting (max_queue="
                                     f"{limits.max_queue}); retry later")
            request = Request(next(self._ids), list(prompt_ids), params, on_event)
            self._queue.append(request)
            self._cv.notify()
        return request

    def stats(self) -> dict:
        """{"requests_served", "requests_cancelled", "max_batch_size", "tokens_generated", "active", "queued"}."""
        with self._cv:
            return {**self.counters, "active": len(self._running), "queued": len(self._queue)}

    # ---- the loop (engine thread) ------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration (admit, sample, retire, decode). Returns False when there was nothing to do."""
        self._drop_cancelled_running()
        for request in self._take_admissions():
            self._admit(request)
        if not self._running:
            return False
        running = list(self._running)
        drawn = [self._sample(i, seq) for i, seq in enumerate(running)]  # (token, text, finish_reason)
        keep = [i for i, (_, _, reason) in enumerate(drawn) if reason is None]
        self._retire(keep)
        # Reported after the bookkeeping: a client that has its final event sees it counted in stats().
        for seq, (_, text, reason) in zip(running, drawn):
            seq.emit(text, reason)
        if keep:
            ids = torch.tensor([drawn[i][0] for i in keep], dtype=torch.long, device=self.device)
            self._decode(ids)
            self.counters["max_batch_size"] = max(self.counters["max_batch_size"], len(keep))
        return True

    def _decode(self, ids: torch.Tensor) -> None:
        """One step for every running row; the state goes into the decoder only if the rows changed."""
        self._logits = self._steps.step(ids)

    def _take_admissions(self) -> list[Request]:
        with self._cv:
            # Cancelled requests leave the queue at once, even while every batch slot is taken.
            cancelled = [r for r in self._queue if r.cancelled]
            if cancelled:
                self._queue = deque(r for r in self._queue if not r.cancelled)
            free = self.limits.max_batch_size - len(self._running)
            taken = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
        for request in cancelled:
            self._finish_cancelled(request)
        return taken

    def _admit(self, request: Request) -> None:
        ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
        logits, states = prefill(self.model, ids)
        seq = _Sequence(request, self.tokenizer, self.model.config.vocab_size, self.device)
        with self._cv:
            self._running.append(seq)
        if self._logits is None:
            self._logits = logits
            self._steps.set_states(states)
        else:
            self._logits = torch.cat([self._logits, logits])
            self._steps.set_states(cat_states([self._steps.states(), states]))

    def _sample(self, row: int, seq: _Sequence) -> tuple[int, str, str | None]:
        """Draws and records row's next token -> (token, new text, finish reason or None)."""
        params = seq.request.params
        token = sample_token(self._logits[row], params, seq.seen, seq.generator)
        seq.generated += 1
        self.counters["tokens_generated"] += 1
        if token == self.eos_token_id and not params.ignore_eos:
            return token, seq.stream.flush(), "stop"
        seq.seen[token] = True
        text = seq.stream.add(token)
        if seq.stream.stopped:
            return token, text, "stop"
        if seq.generated >= params.max_tokens:
            return token, text + seq.stream.flush(), "length"
        return token, text, None

    def _retire(self, keep: list[int]) -> None:
        """Keeps only rows `keep` (in order) of the batch; the others have finished."""
        finished = len(self._running) - len(keep)
        if finished:
            with self._cv:
                self.counters["requests_served"] += finished
            self._keep_rows(keep)

    def _drop_cancelled_running(self) -> None:
        keep = [i for i, seq in enumerate(self._running) if not seq.request.cancelled]
        if len(keep) < len(self._running):
            cancelled = [seq.request for seq in self._running if seq.request.cancelled]
            self._keep_rows(keep)
            for request in cancelled:
                self._finish_cancelled(request)

    def _keep_rows(self, keep: list[int]) -> None:
        with self._cv:
            self._running = [self._running[i] for i in keep]
        if keep:
            self._logits = self._logits[keep]
            self._steps.select(keep)
        else:
            self._logits = None
            self._steps.set_states(None)

    def _finish_cancelled(self, request: Request) -> None:
        with self._cv:
            self.counters["requests_cancelled"] += 1
        request.on_event(CompletionEvent("", "cancelled", len(request.prompt_ids), 0))

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Runs the loop in a daemon thread (`muse-engine`) until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._thread = threading.Thread(target=self._run, name="muse-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stops the loop after its current step; requests still queued or running get an error event."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and not self._queue and not self._running:
                        self._cv.wait()
                    if self._closed:
                        return
                self.step()
        finally:
            # Also on a crash: no client is left waiting, and `submit` refuses from now on.
            self._fail_pending("the server stopped before this request finished")

    def _fail_pending(self, message: str) -> None:
        with self._cv:
            self._closed = True
            pending = [seq.request for seq in self._running] + list(self._queue)
            self._running, self._queue = [], deque()
        self._logits = None
        self._steps.set_states(None)
        for request in pending:
            request.on_event(CompletionEvent("", None, len(request.prompt_ids), 0, error=message))
        if pending:
            log.warning("muse serve: %d unfinished request(s) were failed at shutdown", len(pending))

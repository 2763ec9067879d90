"""Decoding with a recurrent state cache: prefill once, then O(1) work and memory per new token.

On CUDA each decode step is, by default, a replay of a captured CUDA graph over static state buffers
(`muse_lm.models.decode_graph`); `cuda_graph=False` steps eagerly. Both compute the same step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from muse_lm.models.sampling import RowSampler, validate_sampling


class GenerationMixin:
    """Needs `trunk(ids, states, return_state)` and `head_logits(h)` from the model."""

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 seed: int | None = None, eos_token_id: int | None = None,
                 cuda_graph: bool | None = None) -> torch.Tensor:
        """ids [B, T0] -> [B, T0 + n], n <= max_new_tokens (fewer when every row has emitted EOS).

        The prompt runs through the chunked scan once (prefill); each new token then updates the
        per-layer states (conv buffer, AR-SSM state, BK resolvent) in place of re-reading the past.
        Rows that emitted `eos_token_id` keep emitting it. repetition_penalty (> 0; 1 = off): the
        logits of ids already in a row's prompt or output are divided by it where positive and
        multiplied where not, before temperature, top-k and top-p. cuda_graph: None replays a
        captured CUDA graph per step on CUDA and steps eagerly elsewhere; True asks for graphs
        (ValueError off CUDA); False steps eagerly. The graphs are kept on the model for the next call.
        For prompts of different lengths in one batch see `generate_batch`.
        """
        steps = self.generate_stream(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     repetition_penalty=repetition_penalty, seed=seed, eos_token_id=eos_token_id,
                                     cuda_graph=cuda_graph)
        return torch.cat([ids, *(nxt[:, None] for nxt in steps)], dim=1)

    def generate_stream(self, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                        seed: int | None = None, eos_token_id: int | None = None,
                        cuda_graph: bool | None = None) -> Iterator[torch.Tensor]:
        """`generate`, one step at a time: yields each new token `[B]` as soon as it is sampled
        (for printing text as it comes). The model is in eval mode while the iterator runs and
        goes back to its previous mode when it ends or is closed. Bad settings raise ValueError here,
        before the first token."""
        from muse_lm.models.decode_graph import resolve_cuda_graph  # imports this module's model

        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"generate needs a non-empty prompt of shape [batch, time], got {tuple(ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        use_graph = resolve_cuda_graph(next(self.parameters()).device, cuda_graph)
        self.validate_ids(ids)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=ids.device).manual_seed(seed)
        sampler = RowSampler(ids, self.config.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, generator=generator)
        return self._stream(ids, max_new_tokens, sampler, eos_token_id, use_graph)

    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int | Sequence[int], *,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       repetition_penalty: float = 1.0, seed: int | Sequence[int] | None = None,
                       eos_token_id: int | None = None, cuda_graph: bool | None = None) -> list[torch.Tensor]:
        """Prompts of different lengths, generated in one batch -> one 1-D tensor per prompt: its ids
        followed by its new tokens, in the order given.

        Equal-length prompts are prefilled together; the states are joined (`cat_states`) and every
        row then decodes in one batch, a row leaving as soon as it has emitted `eos_token_id` (which
        ends its output) or its own max_new_tokens. Row i's output is what `generate(prompts[i][None],
        ...)[0]` gives with the same settings and seed (exactly in fp32, up to near-ties of logits that
        differ in the last bits between batch sizes).

        Args:
            prompts: non-empty id lists or 1-D integer tensors (any device; moved to the model's).
            max_new_tokens: one limit for all rows, or one per row (each >= 0).
            seed: an int seeds every row's own generator with it (so each row draws what it would draw
                alone with that seed: equal prompts give equal outputs); a list gives each row its seed;
                None draws every row from torch's global generator.
            temperature, top_k, top_p, repetition_penalty, eos_token_id: as in `generate`.
            cuda_graph: as in `generate`. With graphs the batch lives in the model's `MuseDecoder`
                buffers; when rows leave it is copied out, gathered and loaded back (one bucket smaller
                when it shrinks past a bucket boundary).

        Example:
            outs = model.generate_batch([[5, 7, 9], [3]], 20, temperature=0, eos_token_id=0)
        """
        from muse_lm.models.batched_state import generate_rows  # imports this module's model
        from muse_lm.models.decode_graph import cached_decoder, resolve_cuda_graph

        device = next(self.parameters()).device
        rows = self._prompt_rows(prompts, device)
        limits = _per_row(max_new_tokens, len(rows), "max_new_tokens")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in limits):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0, or a list of them")
        seeds = None if seed is None else _per_row(seed, len(rows), "seed")
        generators = None if seeds is None else [torch.Generator(device=device).manual_seed(s) for s in seeds]
        sampler = RowSampler(rows, self.config.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, generator=generators)
        use_graph = resolve_cuda_graph(device, cuda_graph)
        with self._decoding():
            decoder = cached_decoder(self) if use_graph and max(limits) > 1 else None
            new = generate_rows(self, rows, limits, sampler, eos_token_id=eos_token_id, decoder=decoder)
        return [torch.cat([row, torch.tensor(ids, dtype=torch.long, device=device)]) for row, ids in zip(rows, new)]

    def _prompt_rows(self, prompts: Sequence[Sequence[int] | torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Each prompt as a 1-D long tensor on `device`; ValueError for an empty, non-1-D or out-of-vocab one."""
        if len(prompts) == 0:
            raise ValueError("generate_batch needs at least one prompt")
        rows = []
        for i, prompt in enumerate(prompts):
            row = torch.as_tensor(prompt, device=device)
            if row.dim() != 1 or row.numel() == 0:
                raise ValueError(f"prompt {i} has shape {tuple(row.shape)}: each prompt must be a non-empty "
                                 "list of ids (or a 1-D tensor)")
            self.validate_ids(row)
            rows.append(row.long())
        return rows

    @contextlib.contextmanager
    def _decoding(self) -> Iterator[None]:
        """Eval mode and no per-step id check while decoding; the previous mode and check afterwards.

        The prompt is checked once up front and sampled ids are in range by construction, so the
        per-step range check (a host sync on CUDA) is off.
        """
        was_training, check_ids = self.training, self.check_ids
        self.eval()
        self.check_ids = False
        try:
            yield
        finally:
            self.train(was_training)
            self.check_ids = check_ids

    @torch.no_grad()  # on a generator function torch disables grad around each step only
    def _stream(self, ids, max_new_tokens, sampler, eos_token_id, use_graph) -> Iterator[torch.Tensor]:
        with self._decoding():
            yield from self._decode(ids, max_new_tokens, sampler, eos_token_id, use_graph)

    def _decode(self, ids, max_new_tokens, sampler, eos_token_id, use_graph) -> Iterator[torch.Tensor]:
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        h, _, states = self.trunk(ids, return_state=True)
        logits = self.head_logits(h[:, -1])
        step = None  # built on first use: a generate of one token captures no graph
        for i in range(max_new_tokens):
            nxt = sampler.sample(logits)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            yield nxt
            if eos_token_id is not None and bool(done.all()):
                break
            if i + 1 < max_new_tokens:  # the last token needs no step after it
                if step is None:
                    step = self._graph_stepper(states) if use_graph else self._eager_stepper(states)
                logits = step(nxt)

    def _eager_stepper(self, states) -> Callable[[torch.Tensor], torch.Tensor]:
        def step(nxt: torch.Tensor) -> torch.Tensor:
            nonlocal states
            h, _, states = self.trunk(nxt[:, None], states)
            return self.head_logits(h[:, 0])

        return step

    def _graph_stepper(self, states) -> Callable[[torch.Tensor], torch.Tensor]:
        from muse_lm.models.decode_graph import cached_decoder  # imports this module's model

        decoder = cached_decoder(self)
        decoder.load(states)
        session = decoder.session

        def step(nxt: torch.Tensor) -> torch.Tensor:
            if decoder.session != session:
                raise RuntimeError("another generate call on this model took over its CUDA-graph buffers; "
                                   "finish one stream before starting the next, or pass cuda_graph=False")
            return decoder.step(nxt)

        return step


def _per_row(value, rows: int, name: str) -> list:
    """An int for every row, or a sequence of one value per row -> a list of `rows` values."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != rows:
            raise ValueError(f"{name} has {len(value)} values for {rows} prompts; pass one value, or one per prompt")
        return list(value)
    return [value] * rows

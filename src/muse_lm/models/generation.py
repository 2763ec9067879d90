"""Decoding with a recurrent state cache: prefill once, then O(1) work and memory per new token.

On CUDA each decode step is, by default, a replay of a captured CUDA graph over static state buffers
(`muse_lm.models.decode_graph`); `cuda_graph=False` steps eagerly. Both compute the same step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from muse_lm.models.sampling import sample_next


class GenerationMixin:
    """Needs `trunk(ids, states, return_state)` and `head_logits(h)` from the model."""

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_token_id: int | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
        """ids [B, T0] -> [B, T0 + n], n <= max_new_tokens (fewer when every row has emitted EOS).

        The prompt runs through the chunked scan once (prefill); each new token then updates the
        per-layer states (conv buffer, AR-SSM state, BK resolvent) in place of re-reading the past.
        Rows that emitted `eos_token_id` keep emitting it. cuda_graph: None replays a captured CUDA
        graph per step on CUDA and steps eagerly elsewhere; True asks for graphs (ValueError off
        CUDA); False steps eagerly. The graphs are kept on the model for the next call.
        """
        steps = self.generate_stream(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     seed=seed, eos_token_id=eos_token_id, cuda_graph=cuda_graph)
        return torch.cat([ids, *(nxt[:, None] for nxt in steps)], dim=1)

    def generate_stream(self, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                        eos_token_id: int | None = None, cuda_graph: bool | None = None) -> Iterator[torch.Tensor]:
        """`generate`, one step at a time: yields each new token `[B]` as soon as it is sampled
        (for printing text as it comes). The model is in eval mode while the iterator runs and
        goes back to its previous mode when it ends or is closed."""
        from muse_lm.models.decode_graph import resolve_cuda_graph  # imports this module's model

        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"generate needs a non-empty prompt of shape [batch, time], got {tuple(ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        use_graph = resolve_cuda_graph(next(self.parameters()).device, cuda_graph)
        self.validate_ids(ids)
        return self._stream(ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, use_graph)

    @torch.no_grad()  # on a generator function torch disables grad around each step only
    def _stream(self, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
                use_graph) -> Iterator[torch.Tensor]:
        was_training, check_ids = self.training, self.check_ids
        # The prompt is checked once (generate_stream) and sampled ids are in range by
        # construction, so the per-step range check (a host sync on CUDA) is off while decoding.
        self.eval()
        self.check_ids = False
        try:
            yield from self._decode(ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, use_graph)
        finally:
            self.train(was_training)
            self.check_ids = check_ids

    def _decode(self, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
                use_graph) -> Iterator[torch.Tensor]:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=ids.device).manual_seed(seed)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        h, _, states = self.trunk(ids, return_state=True)
        logits = self.head_logits(h[:, -1])
        step = None  # built on first use: a generate of one token captures no graph
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
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

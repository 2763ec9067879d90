"""Decoding with a recurrent state cache: prefill once, then O(1) work and memory per new token."""

from __future__ import annotations

import torch

from muse_lm.models.sampling import sample_next


class GenerationMixin:
    """Needs `trunk(ids, states, return_state)` and `head_logits(h)` from the model."""

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """ids [B, T0] -> [B, T0 + n], n <= max_new_tokens (fewer when every row has emitted EOS).

        The prompt runs through the chunked scan once (prefill); each new token then updates the
        per-layer states (conv buffer, AR-SSM state, BK resolvent) in place of re-reading the past.
        Rows that emitted `eos_token_id` keep emitting it.
        """
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"generate needs a non-empty prompt of shape [batch, time], got {tuple(ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        self.validate_ids(ids)
        was_training, check_ids = self.training, self.check_ids
        # The prompt is checked once above and sampled ids are in range by construction, so the
        # per-step range check (a host sync on CUDA) is off while decoding.
        self.eval()
        self.check_ids = False
        try:
            return self._decode(ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id)
        finally:
            self.train(was_training)
            self.check_ids = check_ids

    def _decode(self, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id) -> torch.Tensor:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=ids.device).manual_seed(seed)
        out = [ids]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        h, _, states = self.trunk(ids, return_state=True)
        for _ in range(max_new_tokens):
            logits = self.head_logits(h[:, -1])
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out.append(nxt[:, None])
            if eos_token_id is not None and bool(done.all()):
                break
            h, _, states = self.trunk(nxt[:, None], states)
        return torch.cat(out, dim=1)

"""Token ids -> streamed text, with stop strings; and the per-request sampling of one next token."""

from __future__ import annotations

import tokenizers
import torch

# Shared with MuseLM.generate: the server samples exactly as generate does.
from muse_lm.models.sampling import apply_repetition_penalty, sample_next
from muse_lm.serving.params import SamplingParams

_INCOMPLETE = "\ufffd"  # what a byte-level decoder shows for a UTF-8 character cut in the middle


class TextStream:
    """The text of a growing list of generated ids, released in deltas that never need taking back.

    A delta holds back (a) a trailing incomplete UTF-8 character, which the next token may complete,
    and (b) a tail that could be the start of a stop string. When a stop string appears the text is
    cut before it and `stopped` turns True.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # everything released so far
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Appends one id; returns the newly released text (possibly "")."""
        if self.stopped:
            raise RuntimeError("TextStream.add after a stop string ended the text")
        self.ids.append(token_id)
        # Decoding the whole output each time is O(n) per token; at the server's max_tokens cap
        # (thousands) that is still far below a decode step's cost.
        full = self.tokenizer.decode(self.ids)
        cut = self._find_stop(full)
        if cut is not None:
            self.stopped = True
            return self._release(full[:cut])
        end = len(full.rstrip(_INCOMPLETE))
        end -= self._stop_prefix_len(full[:end])
        return self._release(full[:end])

    def flush(self) -> str:
        """At the end (max_tokens or EOS): releases whatever was held back."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids))

    def _release(self, visible: str) -> str:
        if len(visible) <= len(self.text):
            return ""
        delta = visible[len(self.text):]
        self.text = visible
        return delta

    def _find_stop(self, full: str) -> int | None:
        """Index of the earliest stop string in the not-yet-released part (and the held-back overlap)."""
        if not self.stop:
            return None
        start = max(0, len(self.text) - max(len(s) for s in self.stop) + 1)
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


def sample_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                 generator: torch.Generator) -> int:
    """One request's next token from its logits [V] and seen mask [V]; it draws from its own
    generator, so what it samples does not depend on the other rows of the batch."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    nxt = sample_next(logits[None], temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                      generator=generator)
    return int(nxt[0])

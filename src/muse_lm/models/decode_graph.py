"""Decode steps over static buffers, captured in CUDA graphs: MuseLM's state cache and the
TransformerLM baseline's static KV cache.

A decode step that reads fixed tensors (the batch's newest token ids, the recurrent state or KV cache)
and writes fixed tensors (the next state, in place, and the logits) has the same kernels with the same
addresses every time, so it can be captured once in a CUDA graph and replayed: a 12-layer MuseLM step
is several hundred small kernels, and a replay launches them all at once instead of paying one Python
dispatch each. Sampling stays outside the graph (it reads the logits, on the device, without a sync).

- `MuseDecoder`: one graph per batch-size bucket (`BUCKETS`; a batch of B rows runs in the smallest
  bucket >= B, padded with zero rows that nothing reads). `load(states)` copies a prefill's state in;
  `step(ids)` copies the ids in, replays, and returns the logits. `MuseLM.generate` uses it on CUDA.
- `KVCacheDecoder`: the transformer's step over a `KVCache` of fixed max length (attention over the
  valid prefix by a mask), captured the same way, for a like-for-like comparison.

With `cuda_graph=False` the same static step runs eagerly: that is what the CPU tests check against
the eager decode path, and what `cuda_graph=False` benchmarks measure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from muse_lm.cuda_streams import capture_stream
from muse_lm.layers import ARSSMState
from muse_lm.models.batched_state import States, batch_size
from muse_lm.models.muse import BlockState, MuseLM
from muse_lm.models.transformer import KVCache, TransformerLM

BUCKETS = (1, 2, 4, 8, 16, 32)
# Eager runs of the step before capture: the first call may compile or pick kernels (Triton, cuBLAS
# workspaces), which must not happen while capturing.
WARMUP_STEPS = 2


def bucket_size(batch: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The graph batch size that runs `batch` rows: the smallest bucket >= batch, or, beyond the
    largest bucket, the next multiple of it (33 -> 64 with the default buckets)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be a positive integer")
    for size in buckets:
        if batch <= size:
            return size
    return buckets[-1] * -(-batch // buckets[-1])


def resolve_cuda_graph(device: torch.device, cuda_graph: bool | None) -> bool:
    """None -> whether `device` is CUDA; True on another device raises ValueError (graphs are CUDA's)."""
    if cuda_graph is None:
        return device.type == "cuda"
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, but it is on {device}; pass "
                         "cuda_graph=False (or leave it None) to decode eagerly")
    return bool(cuda_graph)


def capture(body: Callable[[], None], device: torch.device, pool: tuple | None = None, *,
            before_warmup: Callable[[], None] | None = None) -> torch.cuda.CUDAGraph:
    """Runs `body` WARMUP_STEPS times on a side stream, then captures one call of it in a CUDA graph
    (on that same stream: per-stream library handles are then created before capture, not during).

    `body` must read and write only tensors that outlive the graph (static buffers) and must not
    sync with the host. The warm-up calls do run and leave what they write in those buffers;
    `before_warmup` (not captured) runs before each of them, e.g. to rewind a position. Replay the
    graph with `device` current (`torch.cuda.device(device)`).
    """
    with torch.cuda.device(device):
        stream = capture_stream()  # the current device's: a fresh stream per capture kept memory
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                if before_warmup is not None:
                    before_warmup()
                body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            body()
    return graph


@contextlib.contextmanager
def _unchecked_ids(model: nn.Module) -> Iterator[None]:
    # The id range check reads a flag on the host: a sync, which a capture cannot contain. Decoded ids
    # are sampled from the logits, so they are in range by construction.
    before = model.check_ids
    model.check_ids = False
    try:
        yield
    finally:
        model.check_ids = before


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def static_decode_step(model: MuseLM, ids: torch.Tensor, states: States) -> torch.Tensor:
    """One MuseLM decode step that updates `states` in place: ids [B] + states of B rows -> logits [B, V].

    The same computation as `batched_state.decode_step` (the trunk on one token per row), with the new
    conv buffer, AR-SSM state and BK resolvent copied back into the tensors of `states`, so the step
    reads and writes the same memory every time (what a CUDA graph needs).
    """
    h, _, new_states = model.trunk(ids[:, None], states)
    for old, new in zip(states, new_states):
        old.ssm.conv.copy_(new.ssm.conv)
        old.ssm.ssm.copy_(new.ssm.ssm)
        if old.bk is not None:
            old.bk.copy_(new.bk)
    return model.head_logits(h[:, 0])


def greedy_vs_full(full_logits: torch.Tensor, tokens: torch.Tensor) -> dict:
    """How greedy tokens from a decode path agree with a full forward over the same sequence.

    full_logits [B, n, V]: the full forward's logits at the n positions that predicted tokens [B, n]
    (for a prompt of length T0: positions T0-1 .. T0+n-2 of the forward over prompt + tokens).
    Returns {"positions", "differ", "max_gap", "max_gap_over_top", "max_gap_over_std", "logit_std"}:
    positions compared; positions whose token is not the full forward's argmax; among those, the
    largest logit gap (full forward's argmax logit minus the token's logit), the largest gap over
    |argmax logit| (the scale of bf16 rounding there: 8 significant bits, a grid of <= |x|/128) and
    the largest gap over that position's logit std (all 0.0 when none differ); the mean over positions
    of the logit std over the vocabulary, for scale. A decode path in low precision may pick a
    different token only where the full forward nearly ties.
    """
    if full_logits.dim() != 3 or tokens.shape != full_logits.shape[:2]:
        raise ValueError(f"full_logits must be [B, n, V] and tokens [B, n]; got {tuple(full_logits.shape)} and "
                         f"{tuple(tokens.shape)}")
    logits = full_logits.float()
    best = logits.max(-1).values
    gap = best - logits.gather(-1, tokens[..., None].long())[..., 0]  # >= 0; 0 where the token is an argmax
    std = logits.std(-1)
    differ = gap > 0  # an exact tie counts as agreement: either token is the full forward's argmax

    def worst(values: torch.Tensor) -> float:
        return float(values[differ].max()) if differ.any() else 0.0

    return {"positions": gap.numel(), "differ": int(differ.sum()), "max_gap": worst(gap),
            "max_gap_over_top": worst(gap / best.abs()), "max_gap_over_std": worst(gap / std),
            "logit_std": float(std.mean())}


def state_nbytes(states: States) -> int:
    """Bytes of a state cache (the context-independent memory of MuseLM decoding)."""
    tensors = [t for s in states for t in (s.ssm.conv, s.ssm.ssm, s.bk) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_states(model: MuseLM, states: States) -> None:
    """Raises ValueError unless `states` has this model's layout (one BlockState per block, each with
    the block's conv width, heads, rank and head width, and a BK state exactly where it has BK)."""
    if len(states) != len(model.blocks):
        raise ValueError(f"the state has {len(states)} blocks but the model {len(model.blocks)}: it comes from "
                         "another model")
    for i, (block, state) in enumerate(zip(model.blocks, states)):
        mixer = block.mixer
        want = ((mixer.conv_size - 1, mixer.d_model), (mixer.num_heads, mixer.rank, mixer.head_dim))
        got = (tuple(state.ssm.conv.shape[1:]), tuple(state.ssm.ssm.shape[1:]))
        if got != want or (state.bk is None) != (block.bk is None):
            raise ValueError(f"block {i}: the state (conv, AR-SSM rows {got}, BK {state.bk is not None}) does not "
                             f"match the model ({want}, BK {block.bk is not None}): it comes from another model or "
                             "from before prune_ranks")


class _Bucket:
    """Static buffers of one batch size: ids [N], the state of N rows, the logits [N, V], the graph."""

    def __init__(self, template: States, size: int):
        def zeros_like_rows(t: torch.Tensor) -> torch.Tensor:
            return torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=t.device)

        self.size = size
        self.ids = torch.zeros(size, dtype=torch.long, device=template[0].ssm.ssm.device)
        self.states = [BlockState(ARSSMState(zeros_like_rows(s.ssm.conv), zeros_like_rows(s.ssm.ssm)),
                                  None if s.bk is None else zeros_like_rows(s.bk)) for s in template]
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, states: States) -> None:
        """Rows 0..B-1 <- states; the padding rows are zeroed (they are computed and never read)."""
        rows = batch_size(states)
        for buf, src in zip(self.states, states):
            pairs = [(buf.ssm.conv, src.ssm.conv), (buf.ssm.ssm, src.ssm.ssm)]
            if buf.bk is not None:
                pairs.append((buf.bk, src.bk))
            for dst, value in pairs:
                if value is None or value.shape[1:] != dst.shape[1:] or value.dtype != dst.dtype:
                    raise ValueError("the state does not match the model this decoder was built for "
                                     f"(got {None if value is None else (tuple(value.shape), value.dtype)}, "
                                     f"expected rows of {tuple(dst.shape[1:])} {dst.dtype})")
                dst[:rows].copy_(value)
                dst[rows:].zero_()
        self.ids.zero_()


class MuseDecoder:
    """MuseLM decode steps over static state buffers, captured in one CUDA graph per batch bucket.

    Args:
        model: a MuseLM in eval mode. Its weights must stay where they are while the decoder is used
            (a graph replays the addresses it captured): after `prune_ranks`, `convert_to_lns`, `.to()`
            or `load_state_dict(..., assign=True)` build a new decoder.
        cuda_graph: None (graphs on CUDA, eager elsewhere), True (CUDA only), False (eager static steps).
        buckets: graph batch sizes, ascending.

    Example:
        logits, states = prefill(model, ids)          # muse_lm.models.batched_state
        decoder = MuseDecoder(model); decoder.load(states)
        for _ in range(n):
            logits = decoder.step(logits.argmax(-1))  # a view, valid until the next step
    """

    def __init__(self, model: MuseLM, *, cuda_graph: bool | None = None, buckets: tuple[int, ...] = BUCKETS):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets={buckets!r} must be distinct positive sizes in ascending order")
        self.model, self.buckets = model, tuple(buckets)
        self.device = _model_device(model)
        self.cuda_graph = resolve_cuda_graph(self.device, cuda_graph)
        self._buckets: dict[int, _Bucket] = {}
        self._active: _Bucket | None = None
        self._rows = 0
        # Graphs of all buckets share one memory pool: only one runs at a time, and nothing they
        # leave behind is read (their outputs are copied into buffers outside the pool).
        self._pool = None
        if self.cuda_graph:
            with torch.cuda.device(self.device):
                self._pool = torch.cuda.graph_pool_handle()
        self.session = 0  # bumped by every load: a generator can tell that another one took over

    @property
    def batch(self) -> int:
        """Rows loaded by the last `load` (0 before any)."""
        return self._rows

    @property
    def captured(self) -> tuple[int, ...]:
        """Bucket sizes that have a graph (or, eagerly, buffers) so far."""
        return tuple(sorted(self._buckets))

    @torch.no_grad()
    def load(self, states: States) -> None:
        """Copies a cache of B rows (from `prefill`, `decode_step`, `cat_states`...) into the buffers of
        bucket_size(B), capturing that bucket's graph the first time it is used."""
        if self.model.training:
            raise ValueError("MuseDecoder needs the model in eval mode (training updates gate statistics "
                             "and draws gate noise); call model.eval() first")
        _check_states(self.model, states)
        rows = batch_size(states)
        size = bucket_size(rows, self.buckets)
        bucket = self._buckets.get(size)
        if bucket is None:
            bucket = self._build(states, size)
        bucket.load(states)
        self._active, self._rows = bucket, rows
        self.session += 1

    def _build(self, template: States, size: int) -> _Bucket:
        # Normal tensors even under inference_mode: later calls update them in place in any mode.
        with torch.inference_mode(False):
            bucket = _Bucket(template, size)
            if self.cuda_graph:
                self._capture(bucket)
        self._buckets[size] = bucket
        return bucket

    def _capture(self, bucket: _Bucket) -> None:
        model = self.model
        with _unchecked_ids(model):
            bucket.logits = torch.empty_like(static_decode_step(model, bucket.ids, bucket.states))

            def body() -> None:
                bucket.logits.copy_(static_decode_step(model, bucket.ids, bucket.states))

            bucket.graph = capture(body, self.device, self._pool)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B] (each row's newest token) -> logits [B, V]; the loaded state advances one token.

        With graphs the logits are a view of a static buffer, overwritten by the next step: use
        (or clone) them before stepping again.
        """
        bucket = self._active
        if bucket is None:
            raise ValueError("MuseDecoder.step before load: load a prefilled state first")
        if ids.shape != (self._rows,):
            raise ValueError(f"step takes one token per loaded row, shape [{self._rows}]; got {tuple(ids.shape)}")
        bucket.ids[: self._rows].copy_(ids)
        if bucket.graph is not None:
            with torch.cuda.device(self.device):
                bucket.graph.replay()
            return bucket.logits[: self._rows]
        with _unchecked_ids(self.model):
            return static_decode_step(self.model, bucket.ids, bucket.states)[: self._rows]

    def states(self) -> States:
        """A copy of the loaded rows' current state (e.g. to hand them back to `decode_step`)."""
        if self._active is None:
            raise ValueError("MuseDecoder.states before load")
        n = self._rows

        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:n].clone()

        return [BlockState(ARSSMState(rows(s.ssm.conv), rows(s.ssm.ssm)), rows(s.bk)) for s in self._active.states]


def weights_signature(model: nn.Module) -> tuple:
    """What a captured step depends on besides the buffers it is given: where every parameter and
    buffer lives (address, dtype, shape) and every block's gate mode. Equal signatures: the graphs
    still compute the model's step."""
    tensors = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))
    modes = tuple(getattr(getattr(b, "mixer", None), "gate_mode", None) for b in getattr(model, "blocks", ()))
    return tensors, modes


class _DecoderSlot:
    """Where a model keeps its captured decoder. Copies and pickles of the model start empty: graphs
    are tied to this model's memory."""

    def __init__(self) -> None:
        self.decoder: MuseDecoder | None = None
        self.signature: tuple | None = None

    def __deepcopy__(self, memo: dict) -> _DecoderSlot:
        return _DecoderSlot()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


_SLOT = "_decode_graph_slot"


def cached_decoder(model: MuseLM) -> MuseDecoder:
    """The model's graph decoder, kept on the model so repeated `generate` calls reuse its graphs;
    rebuilt (graphs captured again) whenever `weights_signature(model)` or the autocast state has
    changed."""
    slot = model.__dict__.get(_SLOT)
    if slot is None:
        slot = _DecoderSlot()
        setattr(model, _SLOT, slot)
    device_type = _model_device(model).type
    # A graph replays the kernels it captured: autocast on or off at capture is part of what it computes.
    autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
    signature = (weights_signature(model), autocast)
    if slot.decoder is None or slot.signature != signature:
        slot.decoder, slot.signature = None, None  # the old graphs' memory goes back first
        slot.decoder, slot.signature = MuseDecoder(model, cuda_graph=True), signature
    return slot.decoder


def release_decoder(model: MuseLM) -> None:
    """Drops the model's cached graphs and their buffers (memory goes back to the allocator)."""
    slot = model.__dict__.get(_SLOT)
    if slot is not None:
        slot.decoder, slot.signature = None, None


class KVCacheDecoder:
    """TransformerLM decode steps over a static KV cache, captured in one CUDA graph.

    Args:
        model: a TransformerLM in eval mode.
        batch: rows (all rows have the same prompt length).
        max_len: positions the cache holds (prompt + new tokens); the mask covers all of them every step,
            so keep it close to what the run needs.
        cuda_graph: None (graphs on CUDA), True (CUDA only), False (eager: `TransformerLM.decode_kv`,
            attention over exactly the valid prefix).

    Example:
        dec = KVCacheDecoder(model, batch=1, max_len=T + n); logits = dec.prefill(ids)
        for _ in range(n):
            logits = dec.step(logits.argmax(-1))
    """

    def __init__(self, model: TransformerLM, batch: int, max_len: int, *, cuda_graph: bool | None = None):
        if model.training:
            raise ValueError("KVCacheDecoder needs the model in eval mode; call model.eval() first")
        self.model, self.device = model, _model_device(model)
        self.cuda_graph = resolve_cuda_graph(self.device, cuda_graph)
        self.graph: torch.cuda.CUDAGraph | None = None
        with torch.inference_mode(False):  # updated in place later, whatever the caller's mode
            self.cache: KVCache = model.new_kv_cache(batch, max_len)
            if self.cuda_graph:
                self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        cache, model = self.cache, self.model
        self._ids = torch.zeros(cache.batch, dtype=torch.long, device=cache.length.device)
        rewind = cache.length.zero_  # warm-up steps write at position 0, so never past max_len
        with _unchecked_ids(model):
            self._logits = torch.empty_like(model.kv_step(self._ids, cache))

            def body() -> None:
                self._logits.copy_(model.kv_step(self._ids, cache))

            rewind()
            self.graph = capture(body, self.device, before_warmup=rewind)
        # What the warm-up steps wrote is overwritten by prefill before anything reads it.
        rewind()

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [batch, T] -> next-token logits [batch, V]; fills positions 0..T-1."""
        return self.model.prefill_kv(ids, self.cache)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [batch] -> logits [batch, V] (with graphs a view of a static buffer: use it before the next step)."""
        cache = self.cache
        if self.graph is None:
            return self.model.decode_kv(ids, cache)
        if ids.shape != (cache.batch,):
            raise ValueError(f"step takes one token per row, shape [{cache.batch}]; got {tuple(ids.shape)}")
        if cache.filled >= cache.max_len:
            raise ValueError(f"the KV cache is full ({cache.max_len} positions); build a decoder with a larger max_len")
        self._ids.copy_(ids)
        with torch.cuda.device(self.device):
            self.graph.replay()
        cache.filled += 1
        return self._logits

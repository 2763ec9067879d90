"""Stable counting sort of token ids by each digit of a 2-core TT table, on the device.

The sorted backward (`triton.py`) needs, for each core, the tokens grouped by that core's digit
(id // v2 for the first core, id % v2 for the second), in token order inside a group, and where
each group starts. torch.sort + searchsorted took ~10 small kernels per core for this (cub's radix
passes, index fills, casts, memsets): ~60 us of a 200 us lookup fwd+bwd on an H100 at 32768 ids.
A digit has few values (at most 4096 for any vocab below 16.7M rows, the factors being near the
square root), so a counting sort does both cores in two launches:

1. `_digit_count_kernel`, one program per (block of ids, core): the block's digit histogram.
2. `_digit_scatter_kernel`, same grid: the block's (digit, index) pairs sorted in registers; an id's
   place is the start of its digit's group, plus the ids with that digit in earlier blocks, plus its
   rank among its digit's ids in its own block. The order is stable, so it is the same on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_DIGITS = 4096  # digit values per core (the histograms are this wide at most)
MAX_BLOCK = 4096  # ids one program sorts in registers
_MIN_BLOCK = 1024
_MAX_BLOCKS = 64  # blocks while they hold at most MAX_BLOCK ids: each program reads every block's histogram


@triton.jit
def _digits(ids_ptr, n, ok, core, V2):
    """Core `core`'s digit of ids[n]: id // V2 for core 0, id % V2 for core 1 (int32: ids < 2**31)."""
    ids = tl.load(ids_ptr + n, mask=ok, other=0).to(tl.int32)
    return tl.where(core == 0, ids // V2, ids % V2)


@triton.jit
def _digit_count_kernel(ids_ptr, hist_ptr, N, V2, NB, BLOCK: tl.constexpr, BINS: tl.constexpr):
    """hist[core, blk, d] = number of ids in block `blk` whose digit is d (int32)."""
    blk = tl.program_id(0)
    core = tl.program_id(1)
    n = blk * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    counts = tl.histogram(_digits(ids_ptr, n, ok, core, V2), BINS, mask=ok)
    tl.store(hist_ptr + (core * NB + blk) * BINS + tl.arange(0, BINS), counts)


@triton.jit
def _digit_scatter_kernel(
    ids_ptr, hist_ptr, order_ptr, start_ptr, N, V1, V2, NB, STARTS, BLOCK: tl.constexpr, BINS: tl.constexpr
):
    """order[core, place] = id index (int32), places stable by digit; program (0, core) also writes
    start[core, d] for d = 0..v (the group of digit d is order[core, start[d]:start[d + 1]])."""
    blk = tl.program_id(0)
    core = tl.program_id(1)
    bins = tl.arange(0, BINS)
    total = tl.zeros([BINS], dtype=tl.int32)
    before = tl.zeros([BINS], dtype=tl.int32)
    mine = tl.zeros([BINS], dtype=tl.int32)
    j = 0
    while j < NB:
        h = tl.load(hist_ptr + (core * NB + j) * BINS + bins)
        total += h
        before += tl.where(j < blk, h, 0)
        mine += tl.where(j == blk, h, 0)
        j += 1
    first = tl.cumsum(total, axis=0) - total  # exclusive: where each digit's group starts
    if blk == 0:
        v = tl.where(core == 0, V1, V2)
        tl.store(start_ptr + core * STARTS + bins, first, mask=bins <= v)
    # Sorting (digit, index) pairs puts the block's ids in stable digit order; the j-th of them goes
    # to its group's start + the ids of its digit in earlier blocks + its rank among its digit here.
    place = first + before - (tl.cumsum(mine, axis=0) - mine)
    local = tl.arange(0, BLOCK)
    ok = blk * BLOCK + local < N
    digit = _digits(ids_ptr, blk * BLOCK + local, ok, core, V2)
    key = tl.sort(tl.where(ok, digit, BINS) * BLOCK + local)  # the tail's padding sorts last
    dest = tl.gather(place, tl.minimum(key // BLOCK, BINS - 1), 0) + local
    src = blk * BLOCK + key % BLOCK
    tl.store(order_ptr + core * N + dest, src, mask=src < N)


def sort_by_digits(ids: Tensor, v1: int, v2: int) -> tuple[Tensor, Tensor]:
    """Ids grouped by each core's digit, stably: (order `[2, N]` int32, starts `[2, max(v1, v2) + 1]`
    int32). Row c of order lists the indices of `ids` (`[N]`, contiguous, in [0, v1 * v2)) by core c's
    digit; digit d's indices are order[c, starts[c, d]:starts[c, d + 1]] (starts[c, v_c] = N; entries
    past v_c are unused). No host sync. Each scatter program reads every block's histogram: fine at
    up to ~1M ids (245 blocks); a separate prefix scan of the histograms would scale further."""
    if max(v1, v2) > MAX_DIGITS:
        raise ValueError(f"sort_by_digits: digits of {max(v1, v2)} values exceed {MAX_DIGITS}; "
                         "use tt_lookup_backward(method='atomic') for such a table")
    ids = ids.contiguous()  # the kernels index ids densely
    n = ids.shape[0]
    starts = max(v1, v2) + 1
    if n == 0:
        return (torch.empty(2, 0, device=ids.device, dtype=torch.int32),
                torch.zeros(2, starts, device=ids.device, dtype=torch.int32))
    bins = triton.next_power_of_2(max(v1, v2) + 1)
    # Blocks of at least _MIN_BLOCK ids (fewer, if there are fewer), more once 64 would not hold them all.
    smallest = min(_MIN_BLOCK, triton.next_power_of_2(n))
    block = min(MAX_BLOCK, max(smallest, triton.next_power_of_2(triton.cdiv(n, _MAX_BLOCKS))))
    nb = triton.cdiv(n, block)
    hist = torch.empty(2, nb, bins, device=ids.device, dtype=torch.int32)
    order = torch.empty(2, n, device=ids.device, dtype=torch.int32)
    start = torch.empty(2, starts, device=ids.device, dtype=torch.int32)
    _digit_count_kernel[(nb, 2)](ids, hist, n, v2, nb, BLOCK=block, BINS=bins, num_warps=4)
    _digit_scatter_kernel[(nb, 2)](ids, hist, order, start, n, v1, v2, nb, starts, BLOCK=block, BINS=bins,
                                   num_warps=8)
    return order, start

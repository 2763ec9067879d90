"""Pure-torch references for the semiseparable (AR-SSM / SSD) scan.

Per head, with h_t an R x P matrix state:

    h_t = exp(log_a_t) * h_{t-1} + u_t x_t^T,        y_t = v_t^T h_t

which is y = (L o (V U^T)) X with L[t, s] = exp(cum_t - cum_s) for s <= t, cum = cumsum(log_a).

Three forms, all taking x [B,T,H,P], u and v [B,T,H,R], log_a [B,T,H]:
- `semiseparable_chunked`: the Mamba-2 SSD chunked form (the implementation behind the public op);
- `semiseparable_recurrent`: token by token (test oracle);
- `semiseparable_quadratic`: the full T x T masked matrix (test oracle).
Inputs are assumed validated (see `muse_lm.ops.semiseparable`). Math runs in fp32 (fp64 when any
input is fp64); y comes back in x's dtype, states in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# core(x, u, v, log_a, h0) -> (y, h_T), all in the compute dtype, one sequence per batch row.
_Core = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 if any given tensor is fp64, else fp32 (bf16/fp16 inputs are computed in fp32)."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def _causal_decay(cum: Tensor) -> Tensor:
    """cum [*, L, H] (cumulative log-decay) -> D [*, L(t), L(s), H] = exp(cum_t - cum_s) for s <= t, else 0.

    The exponent is a *difference* taken before exp and masked before exp: exp(cum_t) * exp(-cum_s)
    would overflow (inf * 0 = nan) once cum passes about -88 in fp32.
    """
    length = cum.shape[-2]
    seg = cum.unsqueeze(-2) - cum.unsqueeze(-3)
    causal = torch.ones(length, length, dtype=torch.bool, device=cum.device).tril().unsqueeze(-1)
    return torch.where(causal, seg, torch.full_like(seg, float("-inf"))).exp()


def _chunked_core(x: Tensor, u: Tensor, v: Tensor, log_a: Tensor, h0: Tensor, chunk_size: int):
    """SSD chunked form: intra-chunk masked products for all chunks at once, then a short loop that
    carries the state from chunk to chunk."""
    batch, length, heads, p_dim = x.shape
    pad = (-length) % chunk_size
    if pad:
        # Padded tokens have u = 0 (add nothing) and log_a = 0 (no decay): h_T passes through unchanged.
        # Zeros concatenated, not F.pad: a compiled backward with dynamic shapes turned the pad's
        # gradient (a negative pad, at run time a strided narrowing) into a view of strides it had
        # traced as contiguous ("view size is not compatible"; test_block_recompute.py).
        x, u, v, log_a = (torch.cat([t, t.new_zeros(batch, pad, *t.shape[2:])], dim=1) for t in (x, u, v, log_a))
    n_chunks = (length + pad) // chunk_size
    xc = x.reshape(batch, n_chunks, chunk_size, heads, p_dim)
    uc = u.reshape(batch, n_chunks, chunk_size, heads, -1)
    vc = v.reshape(batch, n_chunks, chunk_size, heads, -1)
    cum = log_a.reshape(batch, n_chunks, chunk_size, heads).cumsum(2)

    scores = torch.einsum("bnthr,bnshr->bntsh", vc, uc) * _causal_decay(cum)
    y = torch.einsum("bntsh,bnshp->bnthp", scores, xc)
    # State each chunk adds on its own, decayed to the chunk's last token.
    to_end = (cum[:, :, -1:] - cum).exp()
    local = torch.einsum("bnsh,bnshr,bnshp->bnhrp", to_end, uc, xc)
    chunk_decay = cum[:, :, -1].exp()[..., None, None]

    state, entering = h0, []
    for n in range(n_chunks):
        entering.append(state)
        state = chunk_decay[:, n] * state + local[:, n]
    prev = torch.stack(entering, 1)
    y = y + cum.exp().unsqueeze(-1) * torch.einsum("bnthr,bnhrp->bnthp", vc, prev)
    return y.reshape(batch, n_chunks * chunk_size, heads, p_dim)[:, :length], state


def _recurrent_core(x: Tensor, u: Tensor, v: Tensor, log_a: Tensor, h0: Tensor):
    state, ys = h0, []
    for t in range(x.shape[1]):
        y_t, state = semiseparable_step_reference(x[:, t], u[:, t], v[:, t], log_a[:, t], state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


def _quadratic_core(x: Tensor, u: Tensor, v: Tensor, log_a: Tensor, h0: Tensor):
    cum = log_a.cumsum(1)
    mixer = torch.einsum("bthr,bshr->btsh", v, u) * _causal_decay(cum)  # (L o V U^T) per head
    y = torch.einsum("btsh,bshp->bthp", mixer, x)
    y = y + cum.exp().unsqueeze(-1) * torch.einsum("bthr,bhrp->bthp", v, h0)
    weights = (cum[:, -1:] - cum).exp()
    final = cum[:, -1].exp()[..., None, None] * h0 + torch.einsum("bsh,bshr,bshp->bhrp", weights, u, x)
    return y, final


def _run(
    core: _Core,
    x: Tensor,
    u: Tensor,
    v: Tensor,
    log_a: Tensor,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Casts to the compute dtype and runs `core` on the batch, or on each cu_seqlens segment."""
    cdt = compute_dtype(x, u, v, log_a, initial_state)
    xs, us, vs, las = (t.to(cdt) for t in (x, u, v, log_a))
    batch, _, heads, p_dim = x.shape
    r_dim = u.shape[-1]
    if cu_seqlens is None:
        h0 = x.new_zeros(batch, heads, r_dim, p_dim, dtype=cdt) if initial_state is None else initial_state
        y, final = core(xs, us, vs, las, h0.to(cdt))
    else:
        bounds = cu_seqlens.tolist()
        ys, finals = [], []
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            if initial_state is None:
                h0 = x.new_zeros(1, heads, r_dim, p_dim, dtype=cdt)
            else:
                h0 = initial_state[n : n + 1].to(cdt)
            if end == start:  # an empty segment keeps its initial state
                finals.append(h0)
                continue
            y_n, final_n = core(xs[:, start:end], us[:, start:end], vs[:, start:end], las[:, start:end], h0)
            ys.append(y_n)
            finals.append(final_n)
        y, final = torch.cat(ys, 1), torch.cat(finals, 0)
    return y.to(x.dtype), (final if output_final_state else None)


def semiseparable_chunked(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    log_a: Tensor,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunked (SSD) reference. Same contract as `muse_lm.ops.semiseparable_scan`.

    Args:
        x: [B,T,H,P]; u, v: [B,T,H,R]; log_a: [B,T,H] (<= 0).
        initial_state: [B,H,R,P] ([N,H,R,P] with cu_seqlens) or None for zeros.
        cu_seqlens: [N+1] segment boundaries (then B == 1), the state restarts at each.
        chunk_size: tokens per chunk; any positive value, the last chunk may be ragged.
    Returns:
        y [B,T,H,P] in x's dtype, and the final state [B,H,R,P] (or [N,H,R,P]) if asked for.
    """
    core = lambda *args: _chunked_core(*args, chunk_size=chunk_size)
    return _run(core, x, u, v, log_a, initial_state, output_final_state, cu_seqlens)


def semiseparable_recurrent(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    log_a: Tensor,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token recurrence (oracle, O(T) python steps). Same contract as `semiseparable_chunked`."""
    return _run(_recurrent_core, x, u, v, log_a, initial_state, output_final_state, cu_seqlens)


def semiseparable_quadratic(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    log_a: Tensor,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Full T x T masked form y = (L o V U^T) X (oracle, O(T^2) memory). Same contract as above."""
    return _run(_quadratic_core, x, u, v, log_a, initial_state, output_final_state, cu_seqlens)


def semiseparable_step_reference(
    x_t: Tensor, u_t: Tensor, v_t: Tensor, log_a_t: Tensor, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One token: x_t [B,H,P], u_t/v_t [B,H,R], log_a_t [B,H], state [B,H,R,P] or None (zeros).

    Returns y_t [B,H,P] in x_t's dtype and the new state [B,H,R,P] in the compute dtype.
    """
    cdt = compute_dtype(x_t, u_t, v_t, log_a_t, state)
    xs, us, vs, las = (t.to(cdt) for t in (x_t, u_t, v_t, log_a_t))
    if state is None:
        state = xs.new_zeros(*us.shape, xs.shape[-1])
    new_state = las.exp()[..., None, None] * state.to(cdt) + us.unsqueeze(-1) * xs.unsqueeze(-2)
    y_t = torch.einsum("bhr,bhrp->bhp", vs, new_state)
    return y_t.to(x_t.dtype), new_state

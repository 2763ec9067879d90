"""Pure-torch reference for the Birman-Schwinger (BK) resolvent diagonal.

H_{1..t} is the tridiagonal matrix on positions 1..t with diagonal a_k = 2 + v_k and off-diagonals
-1. With theta_k = det(H_{1..k} - z):

    theta_k = (a_k - z) theta_{k-1} - theta_{k-2},   theta_0 = 1, theta_{-1} = 0,
    [theta_t, theta_{t-1}]^T = M_t ... M_1 [1, 0]^T,  M_k = [[a_k - z, -1], [1, 0]],
    G_t = [(H_{1..t} - z)^{-1}]_{tt} = theta_{t-1} / theta_t.

The prefix products come from a Hillis-Steele scan of 2x2 complex matrices. theta_t grows or
decays geometrically in t, so every product is divided by its largest |entry| and the scale is
carried as a real log (log|theta_t| = log_scale_t + log|P_t[0,0]|); the scale cancels in G.
Each token depends only on M_1..M_t: causal by construction.
"""

from __future__ import annotations

import torch
from torch import Tensor

# A batch of 2x2 matrices as four [B,T,K] complex tensors (m00, m01, m10, m11).
_Mats = tuple[Tensor, Tensor, Tensor, Tensor]


def complex_dtype(v: Tensor, z: Tensor) -> torch.dtype:
    """complex128 if v is fp64 or z is complex128, else complex64."""
    return torch.complex128 if torch.float64 in (v.dtype, z.real.dtype) else torch.complex64


def _matmul(left: _Mats, right: _Mats) -> _Mats:
    l00, l01, l10, l11 = left
    r00, r01, r10, r11 = right
    return (l00 * r00 + l01 * r10, l00 * r01 + l01 * r11, l10 * r00 + l11 * r10, l10 * r01 + l11 * r11)


def _normalize(mats: _Mats) -> tuple[_Mats, Tensor]:
    """Divides each matrix by its largest |entry|; returns the matrices and log of that scale.

    The scale is detached: G is a ratio, invariant to it, so its gradient contribution is exactly
    zero and skipping it avoids differentiating a max.
    """
    scale = torch.stack([m.abs() for m in mats]).amax(0).detach()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero products stay zero
    return tuple(m / scale for m in mats), scale.log()


def transfer_scan(v: Tensor, z: Tensor) -> tuple[_Mats, Tensor]:
    """Normalized prefix products P_t = M_t ... M_1 for v [B,T,K] real, z [K] complex.

    Returns ((p00, p01, p10, p11) each [B,T,K] complex, log_scale [B,T,K] real, no gradient):
    the true product is exp(log_scale_t) * P_t.
    """
    cdt = complex_dtype(v, z)
    diag = (2 + v.to(cdt.to_real())).to(cdt) - z.to(cdt)
    ones = torch.ones_like(diag)
    mats, log_scale = _normalize((diag, -ones, ones, torch.zeros_like(diag)))
    length, offset = v.shape[1], 1
    while offset < length:
        # Later factors multiply on the left: P_t = (M_t..M_{t-o+1}) (M_{t-o}..M_1).
        left = tuple(m[:, offset:] for m in mats)
        right = tuple(m[:, :-offset] for m in mats)
        combined, log_c = _normalize(_matmul(left, right))
        mats = tuple(torch.cat([m[:, :offset], c], 1) for m, c in zip(mats, combined))
        new_scale = log_scale[:, offset:] + log_scale[:, :-offset] + log_c
        log_scale = torch.cat([log_scale[:, :offset], new_scale], 1)
        offset *= 2
    return mats, log_scale


def bk_resolvent_reference(v: Tensor, z: Tensor) -> Tensor:
    """G [B,T,K] complex = theta_{t-1} / theta_t for v [B,T,K] real, z [K] complex (Im z > 0)."""
    (p00, _, p10, _), _ = transfer_scan(v, z)
    return p10 / p00


def bk_resolvent_step_reference(v_t: Tensor, z: Tensor, g_prev: Tensor | None) -> Tensor:
    """O(1) decode update G_t = 1 / ((a_t - z) - G_{t-1}) with G_0 = 0; v_t [B,K], g_prev [B,K]."""
    cdt = complex_dtype(v_t, z)
    diag = (2 + v_t.to(cdt.to_real())).to(cdt) - z.to(cdt)
    return 1 / diag if g_prev is None else 1 / (diag - g_prev.to(cdt))

"""Causal Birman-Schwinger (BK) spectral features.

Per BK head k: potential v_t = c_k tanh(w_k . x_t), H = -Delta + diag(v) on positions 1..t, and the
resolvent diagonal G_t = [(H_{1..t} - z_k)^{-1}]_{tt} with z_k = E_k + i eta_k, eta_k > 0. Since H is
real symmetric, |G_t| <= 1/eta_k; the features are eta*Re G and eta*Im G (bounded by 1), projected
back to d_model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from muse_lm.layers.aligned import aligned_linear
from muse_lm.ops import bk_resolvent
from muse_lm.ops.scan import bk_resolvent_step


class BKSpectralFeatures(nn.Module):
    """x [B, T, D] -> (features [B, T, D], state). The state is G_{t} [B, K] complex (O(1) per token).

    Args:
        d_model: D.
        num_heads: K, number of BK spectral parameters z_k.
        eta_min: floor of Im z, which bounds |G| by 1/eta_min.
    """

    def __init__(self, d_model: int, num_heads: int = 4, *, eta_min: float = 0.05, init_std: float = 0.02,
                 out_init_std: float | None = None):
        super().__init__()
        self.d_model, self.num_heads, self.eta_min = d_model, num_heads, eta_min
        self.potential = nn.Linear(d_model, num_heads, bias=False)
        self.coupling = nn.Parameter(torch.empty(num_heads))
        self.energy = nn.Parameter(torch.empty(num_heads))
        self.eta_raw = nn.Parameter(torch.empty(num_heads))
        self.out = nn.Linear(2 * num_heads, d_model, bias=False)
        self.init_std = init_std
        self.out_init_std = out_init_std if out_init_std is not None else init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.potential.weight, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.out.weight, std=self.out_init_std)
        with torch.no_grad():
            self.coupling.fill_(1.0)
            # Spread the energies over the free Laplacian's band [0, 4].
            self.energy.copy_(torch.linspace(0.5, 3.5, self.num_heads))
            eta = torch.full((self.num_heads,), 0.5) - self.eta_min
            self.eta_raw.copy_(eta + torch.log(-torch.expm1(-eta)))  # softplus^-1

    def spectral_parameter(self) -> torch.Tensor:
        """z [K] complex64, Im z = eta_min + softplus(eta_raw) > 0."""
        eta = self.eta_min + F.softplus(self.eta_raw.float())
        return torch.complex(self.energy.float(), eta)

    def resolvent(self, x: torch.Tensor, state: torch.Tensor | None = None):
        """x [B, T, D] -> (G [B, T, K] complex64, last G [B, K])."""
        # K = 4 potentials a token: 8-byte rows, which sent all three of this GEMM's passes to cuBLAS's
        # align-2 kernels (0.7 ms of a 47 ms H100 step); padded to 8 columns, the slice is tiny.
        pot = (aligned_linear(x, self.potential.weight)[..., : self.num_heads]
               if type(self.potential) is nn.Linear else self.potential(x))
        v = self.coupling.float() * torch.tanh(pot.float())
        z = self.spectral_parameter()
        if state is None:
            g = bk_resolvent(v, z)
        else:
            # Continuing a sequence (decoding): the O(1) update, token by token.
            steps, prev = [], state
            for t in range(v.shape[1]):
                prev = bk_resolvent_step(v[:, t], z, prev)
                steps.append(prev)
            g = torch.stack(steps, dim=1)
        return g, g[:, -1]

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        g, last = self.resolvent(x, state)
        eta = self.spectral_parameter().imag
        feats = torch.cat([g.real * eta, g.imag * eta], dim=-1).to(x.dtype)
        return self.out(feats), last

    def initial_state(self, batch: int, device: torch.device) -> torch.Tensor:
        """G_0 := 0 (theta_{-1} = 0), the state before the first token."""
        return torch.zeros(batch, self.num_heads, dtype=torch.complex64, device=device)

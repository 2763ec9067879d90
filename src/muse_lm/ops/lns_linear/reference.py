"""8-bit LNS weights: the format, encode / decode, and the torch reference of `lns_linear`.

Format (DESIGN.md, LNS): one byte per weight, bit 7 = sign, bits 0-6 = log code c in 0..127, with a
per-output-row scale s (fp32) = max |w| of the row:

    c = 0        ->  exactly 0 (whatever the sign bit)
    c in 1..127  ->  (-1)^sign * s * 2^((c - 127) / 8)

F = 3 fractional bits: consecutive codes are 2^(1/8) apart and code 127 is the row maximum itself,
so the 127 codes cover s * 2^-15.75 .. s. Encoding rounds in the log domain to the nearest code,
c = round(8 * log2(|w| / s)) + 127 (ties to even), so a nonzero weight keeps its sign and is off by
at most a factor 2^(1/16) (relative error <= 2^(1/16) - 1 = 4.4%); magnitudes below s * 2^-15.8125
(half a code under the smallest code) become code 0, an exact zero. An all-zero row has s = 0 and
all codes 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CODE_BITS",
    "FRAC_BITS",
    "MAX_CODE",
    "lns_decode",
    "lns_decode_unit",
    "lns_encode",
    "lns_linear_reference",
]

FRAC_BITS = 3
CODE_BITS = 7
MAX_CODE = (1 << CODE_BITS) - 1  # 127: the row maximum
SIGN_BIT = 1 << CODE_BITS  # 128
# Relative error bound of a nonzero encoded weight: half a code step in the log domain.
MAX_REL_ERROR = 2.0 ** (1 / (2 << FRAC_BITS)) - 1


def lns_encode(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [N, K] float -> (codes [N, K] uint8, scale [N] fp32), computed in fp32 (no grad).

    Non-finite weights are not checked here (this runs every training step of a trainable
    `LNSLinear`, where a host sync would cost): a NaN/inf row gives a NaN/inf scale, which the
    stability monitor then sees in the loss. `LNSLinear.from_linear` checks before encoding.
    """
    with torch.no_grad():
        w = weight.detach().float()
        mag = w.abs()
        scale = mag.amax(dim=1)
        # log2 of 0 is -inf -> code < 1 -> 0; a zero row (scale 0) gives 0/0 = NaN, masked below.
        level = torch.round(torch.log2(mag / scale[:, None]) * (1 << FRAC_BITS)) + MAX_CODE
        level = torch.nan_to_num(level, nan=0.0, neginf=0.0).clamp_(0, MAX_CODE)
        codes = level.to(torch.uint8)
        sign = (w < 0) & (codes > 0)
        codes = codes | (sign.to(torch.uint8) << CODE_BITS)
    return codes, scale


def lns_decode_unit(codes: Tensor) -> Tensor:
    """codes [..] uint8 -> (-1)^sign * 2^((c - 127) / 8) in fp32 (0 for c = 0): the weight / scale."""
    c = codes.to(torch.int32)
    mag = c & MAX_CODE
    unit = torch.exp2((mag.float() - MAX_CODE) / (1 << FRAC_BITS))
    unit = torch.where(mag == 0, torch.zeros_like(unit), unit)
    return torch.where((c & SIGN_BIT) != 0, -unit, unit)


def lns_decode(codes: Tensor, scale: Tensor) -> Tensor:
    """(codes [N, K] uint8, scale [N]) -> weight [N, K] fp32."""
    return lns_decode_unit(codes) * scale.float()[:, None]


def lns_linear_reference(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None,
                         latent: Tensor | None = None) -> Tensor:
    """x [..., K] @ decode(codes, scale)^T + bias: the weight decoded in fp32, rounded to x's dtype.

    `latent` ([N, K] float, optional): the straight-through weight. The forward value is unchanged
    and the gradient the decoded weight receives goes to `latent` unchanged (STE).
    """
    w = lns_decode(codes, scale)
    if latent is not None:
        w = latent + (w - latent).detach()
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

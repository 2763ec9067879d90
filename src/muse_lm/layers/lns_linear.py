"""`LNSLinear`: a Linear with 8-bit LNS weights (muse_lm.ops.lns_linear), and `convert_to_lns`."""

from __future__ import annotations

import math

import torch
from torch import nn

from muse_lm.layers.ffn import SwiGLU
from muse_lm.ops.lns_linear import lns_encode, lns_linear

__all__ = ["LNS_TARGETS", "LNSLinear", "convert_to_lns"]


class LNSLinear(nn.Module):
    """y = x @ W^T + b with W stored as 8-bit LNS codes (1 sign bit, 7-bit log code with 3 fractional
    bits, per-output-row fp32 scale; see `muse_lm.ops.lns_linear.reference`).

    trainable=False: buffers `codes` [out, in] uint8, `scale` [out] fp32 and `bias` [out] (or None):
    half of bf16's weight bytes, nothing to train (the layer still passes gradients to its input).
    trainable=True: a latent float `weight` (nn.Parameter, the only stored weight) is quantized afresh
    every forward; the forward uses the decoded codes and the gradient goes straight through to
    `weight` (STE). Its state_dict has nn.Linear's keys, so a checkpoint of a model trained this way
    loads into the float model too; `convert_to_lns(model, which, trainable=False)` then stores the
    very codes the training forward used.

    A fresh trainable=False layer holds all-zero codes: build it with `from_linear` or load a
    state_dict. x: [..., in] -> [..., out] in x's dtype (under autocast: the autocast dtype).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, trainable: bool = False):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"LNSLinear: in_features={in_features} and out_features={out_features} must be >= 1")
        self.in_features, self.out_features, self.trainable = in_features, out_features, trainable
        if trainable:
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
            self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
            self._init_like_linear()
        else:
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
            self.register_buffer("scale", torch.zeros(out_features))
            self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def _init_like_linear(self) -> None:
        # nn.Linear's default init, so LNSLinear(trainable=True) is a drop-in for a fresh nn.Linear.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, lin: nn.Linear, trainable: bool = False) -> LNSLinear:
        """An LNSLinear with `lin`'s weight (encoded; trainable: also kept as the latent) and bias, on
        lin's device. Raises ValueError for non-finite weights (they have no LNS code)."""
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"LNSLinear.from_linear needs an nn.Linear, got {type(lin).__name__}")
        weight = lin.weight.detach()
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"LNSLinear.from_linear: the weight {tuple(weight.shape)} has NaN or inf entries, "
                             "which have no LNS code; fix the model (or its checkpoint) before converting")
        layer = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, trainable=trainable)
        layer = layer.to(weight.device)
        with torch.no_grad():
            if trainable:
                layer.weight.data = weight.clone()
                if lin.bias is not None:
                    layer.bias.data = lin.bias.detach().clone()
            else:
                layer.codes, layer.scale = lns_encode(weight)
                if lin.bias is not None:
                    layer.bias = lin.bias.detach().clone()
        return layer

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [out, in] uint8, scale [out] fp32) the forward uses now."""
        return lns_encode(self.weight) if self.trainable else (self.codes, self.scale)

    def weight_bytes(self) -> int:
        """Bytes of the stored inference weight: codes + scales (the latent weight is not counted)."""
        return self.out_features * self.in_features + 4 * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Like nn.Linear under autocast: compute in the autocast dtype.
            x = x.to(torch.get_autocast_dtype(device_type))
        codes, scale = self.quantized()
        return lns_linear(x, codes, scale, self.bias, latent=self.weight if self.trainable else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, trainable={self.trainable}")


# The documented module sets `convert_to_lns` can convert.
LNS_TARGETS = {
    "ffn": "the Linear layers inside every SwiGLU feed-forward block",
    "all": "every nn.Linear of the model",
}


def _targets(model: nn.Module, which: str) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, Linear) for every Linear that `which` names."""
    found = []
    for parent in model.modules():
        if which == "ffn" and not isinstance(parent, SwiGLU):
            continue
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found.append((parent, name, child))
    return found


def convert_to_lns(model: nn.Module, which: str = "ffn", trainable: bool = False) -> nn.Module:
    """Replaces, in place, the nn.Linear layers that `which` names (see `LNS_TARGETS`) with
    `LNSLinear.from_linear(lin, trainable)`; returns `model`. Layers that are LNSLinear already are
    left alone. Raises ValueError for an unknown `which`."""
    if which not in LNS_TARGETS:
        choices = "; ".join(f"{k!r}: {v}" for k, v in LNS_TARGETS.items())
        raise ValueError(f"convert_to_lns: which={which!r} is not a known set; choose one of {choices}")
    for parent, name, lin in _targets(model, which):
        setattr(parent, name, LNSLinear.from_linear(lin, trainable=trainable))
    return model

"""TransformerLM: the controlled baseline (pre-norm, RoPE, SDPA causal attention, SwiGLU, tied dense
embedding with the same fused cross-entropy as MuseLM's dense ablation)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from muse_lm.errors import CheckpointError, ConfigError
from muse_lm.layers import DenseTiedEmbedding, RMSNorm, SwiGLU
from muse_lm.models.pretrained import read_model_dir, save_model_dir


@dataclass
class TransformerConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_mult: float = 8 / 3
    norm_eps: float = 1e-5
    init_std: float = 0.02
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ConfigError(f"TransformerConfig.{name}={value!r} is invalid: must be a positive integer")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"TransformerConfig.n_heads={self.n_heads} is invalid: d_model={self.d_model} "
                              "must split into heads of even width (RoPE rotates pairs)")

    @property
    def ffn_hidden(self) -> int:
        return 64 * -(-int(self.ffn_mult * self.d_model) // 64)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding. x [B, H, T, Dh] -> same shape."""
    T, Dh = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, Dh, 2, device=x.device, dtype=torch.float32) / Dh)
    ang = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, out_std: float):
        super().__init__()
        self.n_heads, self.base = cfg.n_heads, cfg.rope_base
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=cfg.init_std)
        nn.init.normal_(self.proj.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rope(q, self.base), rope(k, self.base), v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.norm1, self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, out_std)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        nn.init.normal_(self.ffn.w13.weight, std=cfg.init_std)
        nn.init.normal_(self.ffn.w2.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class TransformerLM(nn.Module):
    """Same call contract as MuseLM: `model(ids)` -> logits, `model(ids, targets, return_parts=True)`
    -> (loss, ce, aux) with aux = 0."""

    model_type = "transformer"

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = DenseTiedEmbedding(config.vocab_size, config.d_model, init_std=config.init_std)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.gradient_checkpointing = False
        # As MuseLM: range-checking ids costs a host sync on CUDA; the trainer checks its data once
        # (`validate_ids`) and turns this off.
        self.check_ids = True

    def validate_ids(self, ids: torch.Tensor) -> None:
        """Raises ValueError naming the first id outside [0, vocab_size) (MuseLM's contract)."""
        if ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"token ids must be an integer tensor, got {ids.dtype}")
        V = self.config.vocab_size
        bad = (ids < 0) | (ids >= V)
        if ids.numel() and bool(bad.any()):
            raise ValueError(f"token id {int(ids[bad].flatten()[0])} is outside the vocabulary [0, {V}) "
                             f"(model vocab_size={V}); use the tokenizer the model was trained with")

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, *, return_parts: bool = False):
        if self.check_ids:
            self.validate_ids(ids)
        x = self.embed(ids)
        for block in self.blocks:
            use_ckpt = self.gradient_checkpointing and self.training
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        h = self.norm_f(x)
        if targets is None:
            return self.embed.logits(h)
        ce = self.embed.loss(h, targets)
        aux = ce.new_zeros(())
        return (ce, ce, aux) if return_parts else ce

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.num_parameters() if exclude_embedding else total

    def save_pretrained(self, path: str | Path) -> Path:
        return save_model_dir(path, self, {"model_type": self.model_type, "model": self.config.to_dict(),
                                           "vocab_size": self.config.vocab_size})

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> TransformerLM:
        ckpt, config, state = read_model_dir(path, map_location)
        if config.get("model_type") != cls.model_type:
            raise CheckpointError(f"{ckpt} holds a {config.get('model_type')!r} model, not {cls.model_type!r}")
        model = cls(TransformerConfig(**config["model"]))
        model.load_state_dict(state)
        return model

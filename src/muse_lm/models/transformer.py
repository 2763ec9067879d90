"""TransformerLM: the controlled baseline (pre-norm, RoPE, SDPA causal attention, SwiGLU, tied dense
embedding with the same fused cross-entropy as MuseLM's dense ablation).

Decoding uses a static KV cache (`KVCache`: K/V preallocated at a maximum length, the filled length a
device tensor), so a decode step has fixed shapes and no host sync and can be captured in a CUDA graph
(`muse_lm.models.decode_graph.KVCacheDecoder`), the same way as MuseLM's state-cache step."""

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


def rope_at(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """`rope` at given positions: x [B, H, T, Dh], positions [T] int (a device tensor, no host sync).

    The angles are computed exactly as `rope` computes them for positions 0..T-1, so a cached
    decode step rotates its token bit for bit like the full forward does.
    """
    Dh = x.shape[-1]
    inv = base ** (-torch.arange(0, Dh, 2, device=x.device, dtype=torch.float32) / Dh)
    ang = positions.to(torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


@dataclass
class KVCache:
    """A static KV cache for batched decoding of equal-length rows.

    k, v: one `[B, H, max_len, Dh]` tensor per layer, preallocated; `length`: `[]` int64 on the device,
    the number of positions filled (what a captured decode step reads and advances); `filled`: the same
    number on the host, kept by the Python callers so bounds are checked without a sync; `positions`:
    `arange(max_len)` on the device (the valid-prefix mask is `positions <= length`).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: torch.Tensor
    positions: torch.Tensor
    filled: int = 0

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        """Bytes of K and V (the context-dependent memory)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


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

    def prefill_kv(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """`forward` over positions 0..T-1 that also writes the rotated keys and the values into
        k_cache, v_cache `[B, H, max_len, Dh]` (positions 0..T-1). x [B, T, D] -> [B, T, D]."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = rope(q, self.base), rope(k, self.base)
        k_cache[:, :, :T].copy_(k)
        v_cache[:, :, :T].copy_(v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def decode_kv(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                  positions: torch.Tensor, valid: int | None = None) -> torch.Tensor:
        """One token at position `length` ([] int64 on the device): writes its key and value there, then
        attends over positions <= length. x [B, 1, D] -> [B, 1, D].

        valid: length + 1 when the caller knows it on the host: SDPA then runs over exactly that prefix
        (no mask, so the flash kernel applies). None: over all max_len positions with the mask
        `positions <= length` (fixed shapes, no host sync: what a CUDA graph captures).
        """
        B, _, D = x.shape
        q, k, v = self.qkv(x).view(B, 1, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        at = length.view(1)
        q, k = rope_at(q, at, self.base), rope_at(k, at, self.base)
        k_cache.index_copy_(2, at, k)
        v_cache.index_copy_(2, at, v)
        if valid is None:
            mask = (positions <= length).view(1, -1)  # [L=1, S=max_len], broadcast over batch and heads
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k_cache[:, :, :valid], v_cache[:, :, :valid])
        return self.proj(y.transpose(1, 2).reshape(B, 1, D))


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

    def prefill_kv(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.prefill_kv(self.norm1(x), k_cache, v_cache)
        return x + self.ffn(self.norm2(x))

    def decode_kv(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                  positions: torch.Tensor, valid: int | None = None) -> torch.Tensor:
        x = x + self.attn.decode_kv(self.norm1(x), k_cache, v_cache, length, positions, valid)
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

    # ---- decoding with a static KV cache -------------------------------------------------------
    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` positions, in the weights' dtype and device
        (2 * n_layers * batch * max_len * d_model elements: allocate only what the run needs)."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"new_kv_cache: batch={batch} and max_len={max_len} must both be >= 1")
        weight = self.blocks[0].attn.qkv.weight
        cfg = self.config
        shape = (batch, cfg.n_heads, max_len, cfg.d_model // cfg.n_heads)
        zeros = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(2 * cfg.n_layers)]
        return KVCache(zeros[0::2], zeros[1::2], torch.zeros((), dtype=torch.long, device=weight.device),
                       torch.arange(max_len, device=weight.device))

    @torch.no_grad()
    def prefill_kv(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids [B, T] into an empty cache (positions 0..T-1) -> next-token logits [B, V] (the last
        position's only: no [B, T, V] tensor)."""
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] != cache.batch:
            raise ValueError(f"prefill_kv needs ids [batch={cache.batch}, T >= 1], got {tuple(ids.shape)}")
        if cache.filled:
            raise ValueError(f"prefill_kv needs an empty cache, this one holds {cache.filled} positions; "
                             "make a new one with new_kv_cache")
        if ids.shape[1] > cache.max_len:
            raise ValueError(f"a prompt of {ids.shape[1]} tokens does not fit a cache of max_len={cache.max_len}")
        if self.check_ids:
            self.validate_ids(ids)
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x = block.prefill_kv(x, cache.k[i], cache.v[i])
        cache.length.fill_(ids.shape[1])
        cache.filled = ids.shape[1]
        return self.embed.logits(self.norm_f(x[:, -1]))

    @torch.no_grad()
    def decode_kv(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids [B] (each row's newest token) -> logits [B, V]; the token's K/V go to position
        `cache.filled`, which then advances. Raises ValueError when the cache is full."""
        if ids.shape != (cache.batch,):
            raise ValueError(f"decode_kv takes one token per row, shape [{cache.batch}]; got {tuple(ids.shape)}")
        if cache.filled >= cache.max_len:
            raise ValueError(f"the KV cache is full ({cache.max_len} positions); allocate a longer one")
        if self.check_ids:
            self.validate_ids(ids)
        logits = self.kv_step(ids, cache, valid=cache.filled + 1)
        cache.filled += 1
        return logits

    def kv_step(self, ids: torch.Tensor, cache: KVCache, *, valid: int | None = None) -> torch.Tensor:
        """The body of `decode_kv` without its checks and host bookkeeping (`cache.filled` is not
        touched): the position is read from and advanced on the device. With valid=None the shapes
        are fixed and nothing syncs with the host, so it can be captured in a CUDA graph; callers
        check the bound themselves. ids [B] -> logits [B, V]."""
        x = self.embed(ids[:, None])
        for i, block in enumerate(self.blocks):
            x = block.decode_kv(x, cache.k[i], cache.v[i], cache.length, cache.positions, valid)
        cache.length.add_(1)
        return self.embed.logits(self.norm_f(x[:, 0]))

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

"""MuseLM: HTT embedding -> n x [norm -> AR-SSM (+ BK) -> residual; norm -> SwiGLU -> residual]
-> norm -> tied TT head. No position table: the mixer is causal and recurrent, so any length works."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from muse_lm.errors import CheckpointError
from muse_lm.layers import (
    AdaptiveRankSemiseparableLayer,
    ARSSMState,
    BKSpectralFeatures,
    DenseTiedEmbedding,
    HTTEmbedding,
    RMSNorm,
    SwiGLU,
)
from muse_lm.layers.ar_ssm import PruneReport, recomputing
from muse_lm.layers.recompute import recompute_in_backward
from muse_lm.models.config import MuseConfig
from muse_lm.models.generation import GenerationMixin
from muse_lm.models.pretrained import read_model_dir, save_model_dir


def _recompute_contexts():
    """torch.utils.checkpoint's context_fn: nothing around the first forward; `recomputing()`
    around the recomputation in backward (running statistics are updated once per batch)."""
    return contextlib.nullcontext(), recomputing()


@dataclass
class BlockState:
    """One block's recurrent cache: the AR-SSM state and the BK running resolvent (or None)."""

    ssm: ARSSMState
    bk: torch.Tensor | None


class MuseBlock(nn.Module):
    def __init__(self, cfg: MuseConfig, index: int = 0):
        """Block `index` of the model (its AR-SSM rank is `cfg.layer_rank(index)`)."""
        super().__init__()
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = AdaptiveRankSemiseparableLayer(
            cfg.d_model, cfg.max_rank, cfg.min_rank, num_heads=cfg.n_heads, expand=cfg.ssm_expand,
            conv_size=cfg.conv_size, chunk_size=cfg.chunk_size, gate_mode=cfg.gate_mode,
            gumbel_temperature=cfg.gumbel_temperature, gate_l1=cfg.gate_l1, init_std=cfg.init_std,
            out_init_std=out_std, rank=cfg.layer_rank(index))
        self.bk = (BKSpectralFeatures(cfg.d_model, cfg.bk_heads, init_std=cfg.init_std, out_init_std=out_std)
                   if cfg.bk_heads > 0 else None)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        nn.init.normal_(self.ffn.w13.weight, std=cfg.init_std)
        nn.init.normal_(self.ffn.w2.weight, std=out_std)

    def _norm_conv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm1(x), the mixer's conv of it), both [B, T, D]."""
        h = self.norm1(x)
        return h, self.mixer.conv_input(h)

    def forward(self, x: torch.Tensor, state: BlockState | None = None, return_state: bool = False):
        """x [B, T, D] -> (x [B, T, D], gate penalty, BlockState | None)."""
        # The norms' outputs (and the mixer's conv) are rebuilt from the residual stream in a compiled
        # backward rather than kept beside it for the projections' weight gradients (layers/recompute.py).
        # The norm and the conv are one region: at the border of two, the first one's output is kept.
        if state is None and not return_state:
            h, xc = recompute_in_backward(self._norm_conv, x)
            mixed, penalty, ssm_state = self.mixer(h, conv_out=xc)
        else:
            h = self.norm1(x)
            mixed, penalty, ssm_state = self.mixer(h, state.ssm if state else None, return_state=return_state)
        bk_state = None
        if self.bk is not None:
            feats, bk_state = self.bk(h, state.bk if state else None)
            mixed = mixed + feats
        x = x + mixed
        x = x + self.ffn(recompute_in_backward(self.norm2, x))
        new_state = BlockState(ssm_state, bk_state) if (return_state or state is not None) else None
        return x, penalty, new_state


class MuseLM(GenerationMixin, nn.Module):
    """The muse_lm language model.

    `model(ids)` -> logits [B, T, V]; `model(ids, targets)` -> loss (cross-entropy + gate penalty)
    computed by the fused head without ever forming the logits; `return_parts=True` -> (loss, ce, aux).
    """

    model_type = "muse"

    def __init__(self, config: MuseConfig):
        super().__init__()
        self.config = config
        if config.embedding == "htt":
            self.embed = HTTEmbedding(config.vocab_size, config.d_model, config.tt_rank, config.tt_cores,
                                      init_std=config.init_std)
        else:
            self.embed = DenseTiedEmbedding(config.vocab_size, config.d_model, init_std=config.init_std)
        self.blocks = nn.ModuleList(MuseBlock(config, i) for i in range(config.n_layers))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.gradient_checkpointing = False
        # Range-checking ids costs a host sync on CUDA; the trainer checks its data once and turns this off.
        self.check_ids = True

    # ---- forward -------------------------------------------------------------------------------
    def validate_ids(self, ids: torch.Tensor) -> None:
        """Raises ValueError naming the first id outside [0, vocab_size)."""
        if ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() == 0:
            return
        V = self.config.vocab_size
        bad = (ids < 0) | (ids >= V)
        if bool(bad.any()):
            first = int(ids[bad].flatten()[0])
            raise ValueError(f"token id {first} is outside the vocabulary [0, {V}): the tokenizer and the "
                             f"model disagree (model vocab_size={V}); use the run's own tokenizer.json")

    def trunk(self, ids: torch.Tensor, states: list[BlockState] | None = None, return_state: bool = False):
        """ids [B, T] -> (final-normed hidden [B, T, D], summed gate penalty, states | None)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be [batch, time], got shape {tuple(ids.shape)}")
        if self.check_ids:
            self.validate_ids(ids)
        x = self.embed(ids)
        aux = x.new_zeros((), dtype=torch.float32)
        new_states = [] if (return_state or states is not None) else None
        for i, block in enumerate(self.blocks):
            state = states[i] if states is not None else None
            if self.gradient_checkpointing and self.training and new_states is None:
                x, penalty, st = checkpoint(block, x, use_reentrant=False, context_fn=_recompute_contexts)
            else:
                x, penalty, st = block(x, state, return_state)
            aux = aux + penalty
            if new_states is not None:
                new_states.append(st)
        return self.norm_f(x), aux, new_states

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, *, return_parts: bool = False):
        h, aux, _ = self.trunk(ids)
        if targets is None:
            return self.embed.logits(h)
        if targets.shape != ids.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal ids shape {tuple(ids.shape)}")
        ce = self.embed.loss(h, targets)
        loss = ce + aux
        return (loss, ce, aux) if return_parts else loss

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., D] (already final-normed) -> logits [..., V]."""
        return self.embed.logits(h)

    # ---- gates ---------------------------------------------------------------------------------
    def set_gate_mode(self, mode: str, *, gumbel_temperature: float | None = None) -> None:
        """Switches every AR-SSM layer's rank gate; the choice is stored in the config (and saved)."""
        for block in self.blocks:
            block.mixer.set_gate_mode(mode, gumbel_temperature=gumbel_temperature)
        self.config.gate_mode = mode
        if gumbel_temperature is not None:
            self.config.gumbel_temperature = gumbel_temperature

    def effective_ranks(self) -> list[float]:
        return [float(b.mixer.effective_rank()) for b in self.blocks]

    def prune_ranks(self, threshold: float) -> list[PruneReport]:
        """Prunes every block's AR-SSM at `threshold` (see `AdaptiveRankSemiseparableLayer.prune_ranks`)
        and records the ranks left in `config.ranks`, so the model saves and loads at its new shape.

        Every layer is checked before any is changed: a threshold that would empty one layer raises
        ValueError and leaves the whole model as it was. Build optimizers after pruning.
        """
        for i, block in enumerate(self.blocks):
            try:
                block.mixer.plan_pruning(threshold)
            except ValueError as err:
                raise ValueError(f"block {i}: {err}") from None
        reports = [block.mixer.prune_ranks(threshold) for block in self.blocks]
        # In place, like set_gate_mode: whoever holds this config sees the model's real shape.
        self.config.ranks = [r.rank_after for r in reports]
        self.config.__post_init__()
        return reports

    # ---- sizes ---------------------------------------------------------------------------------
    def num_parameters(self, exclude_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.num_parameters() if exclude_embedding else total

    # ---- persistence ---------------------------------------------------------------------------
    def config_json(self) -> dict:
        return {"model_type": self.model_type, "model": self.config.to_dict(),
                "vocab_size": self.config.vocab_size}

    def save_pretrained(self, path: str | Path) -> Path:
        """Writes path/{model.safetensors, config.json, checksums.json} atomically."""
        return save_model_dir(path, self, self.config_json())

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> MuseLM:
        """Loads a run directory (its `latest` checkpoint) or one checkpoint directory."""
        ckpt, config, state = read_model_dir(path, map_location)
        if config.get("model_type", "muse") != cls.model_type:
            raise CheckpointError(f"{ckpt} holds a {config.get('model_type')!r} model, not {cls.model_type!r}")
        model = cls(MuseConfig.from_dict(config["model"]))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{ckpt}: weights do not match the config (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}); the checkpoint is damaged or from another version")
        return model.to(map_location)

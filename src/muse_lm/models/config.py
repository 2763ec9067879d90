"""`MuseConfig`: the shape of a MuseLM. Validated on construction; errors name the field."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from muse_lm.config_utils import config_from_dict, require
from muse_lm.layers.gates import GATE_MODES

EMBEDDINGS = ("htt", "dense")


def _require(cond: bool, name: str, value: Any, fix: str) -> None:
    require("MuseConfig", cond, name, value, fix)


@dataclass
class MuseConfig:
    """Architecture of MuseLM.

    Per block: RMSNorm -> AR-SSM (+ BK features) -> residual; RMSNorm -> SwiGLU -> residual.
    The embedding is tied to the head (HTT cores, or a dense table for ablations).
    """

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    # AR-SSM: n_heads heads, each with value width head_dim = ssm_expand * d_model / n_heads
    # and a rank-gated state of max_rank x head_dim.
    n_heads: int = 4
    ssm_expand: int = 2
    max_rank: int = 32
    min_rank: int = 4
    conv_size: int = 4
    chunk_size: int = 64
    gate_mode: str = "soft"
    gumbel_temperature: float = 1.0
    gate_l1: float = 1e-4
    # Rank each block's AR-SSM holds, one per layer (set by `MuseLM.prune_ranks`); None: max_rank
    # everywhere. max_rank still fixes the shapes' upper bound and v's 1/sqrt(max_rank) scale.
    ranks: list[int] | None = None
    # BK spectral features: number of BK heads (0 turns the features off).
    bk_heads: int = 4
    # SwiGLU hidden width = ffn_mult * d_model, rounded up to a multiple of 64.
    ffn_mult: float = 8 / 3
    embedding: str = "htt"
    tt_rank: int = 16
    tt_cores: int = 2
    norm_eps: float = 1e-5
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ssm_expand", "max_rank",
                     "conv_size", "chunk_size", "tt_rank"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, value, "must be a positive integer")
        _require(self.vocab_size >= 2, "vocab_size", self.vocab_size, "must be at least 2")
        _require(isinstance(self.min_rank, int) and 0 <= self.min_rank <= self.max_rank, "min_rank",
                 self.min_rank, f"must be an integer in [0, max_rank={self.max_rank}]")
        _require((self.ssm_expand * self.d_model) % self.n_heads == 0, "n_heads", self.n_heads,
                 f"must divide ssm_expand * d_model = {self.ssm_expand * self.d_model}")
        self._check_ranks()
        _require(self.gate_mode in GATE_MODES, "gate_mode", self.gate_mode, f"use one of {GATE_MODES}")
        _require(self.gumbel_temperature > 0, "gumbel_temperature", self.gumbel_temperature,
                 "must be > 0")
        _require(self.gate_l1 >= 0, "gate_l1", self.gate_l1, "must be >= 0")
        _require(isinstance(self.bk_heads, int) and self.bk_heads >= 0, "bk_heads", self.bk_heads,
                 "must be an integer >= 0 (0 turns BK features off)")
        _require(self.ffn_mult > 0, "ffn_mult", self.ffn_mult, "must be > 0")
        _require(self.embedding in EMBEDDINGS, "embedding", self.embedding, f"use one of {EMBEDDINGS}")
        _require(self.tt_cores in (2, 3), "tt_cores", self.tt_cores, "HTT supports 2 or 3 cores")
        _require(self.norm_eps > 0, "norm_eps", self.norm_eps, "must be > 0")
        _require(self.init_std > 0, "init_std", self.init_std, "must be > 0")

    def _check_ranks(self) -> None:
        if self.ranks is None:
            return
        lo = max(self.min_rank, 1)
        fix = (f"must be None or a list of n_layers={self.n_layers} integers in [max(min_rank, 1)={lo}, "
               f"max_rank={self.max_rank}] (the rank of each block after pruning)")
        _require(isinstance(self.ranks, (list, tuple)) and len(self.ranks) == self.n_layers, "ranks",
                 self.ranks, fix)
        _require(all(isinstance(r, int) and not isinstance(r, bool) and lo <= r <= self.max_rank
                     for r in self.ranks), "ranks", self.ranks, fix)
        self.ranks = list(self.ranks)  # JSON round trips give lists; keep equal configs equal

    def layer_rank(self, index: int) -> int:
        """The rank block `index` holds: ranks[index], or max_rank when ranks is None."""
        return self.max_rank if self.ranks is None else self.ranks[index]

    @property
    def head_dim(self) -> int:
        return self.ssm_expand * self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return 64 * -(-int(self.ffn_mult * self.d_model) // 64)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MuseConfig:
        return config_from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

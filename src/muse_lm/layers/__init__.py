"""nn.Modules built from muse_lm.ops."""

from muse_lm.layers.ar_ssm import AdaptiveRankSemiseparableLayer, ARSSMState
from muse_lm.layers.bk import BKSpectralFeatures
from muse_lm.layers.ffn import SwiGLU
from muse_lm.layers.gates import GATE_MODES, rank_gate
from muse_lm.layers.htt import DenseTiedEmbedding, HolographicTTEmbedding, HTTEmbedding
from muse_lm.layers.lns_linear import LNSLinear, convert_to_lns
from muse_lm.layers.norms import RMSNorm

__all__ = [
    "GATE_MODES",
    "ARSSMState",
    "AdaptiveRankSemiseparableLayer",
    "BKSpectralFeatures",
    "DenseTiedEmbedding",
    "HTTEmbedding",
    "HolographicTTEmbedding",
    "LNSLinear",
    "RMSNorm",
    "SwiGLU",
    "convert_to_lns",
    "rank_gate",
]

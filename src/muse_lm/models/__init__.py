"""Models: MuseLM and the TransformerLM baseline."""

from muse_lm.models.config import MuseConfig
from muse_lm.models.muse import MuseLM
from muse_lm.models.transformer import TransformerConfig, TransformerLM

__all__ = ["MuseConfig", "MuseLM", "TransformerConfig", "TransformerLM"]

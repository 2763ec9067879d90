"""muse_lm: memory-efficient, linear-time language models for the GPU people actually have."""

from muse_lm.models import MuseConfig, MuseLM, TransformerConfig, TransformerLM
from muse_lm.presets import get_preset, list_presets, print_preset_comparison

__version__ = "0.1.0"

__all__ = [
    "MuseConfig",
    "MuseLM",
    "TransformerConfig",
    "TransformerLM",
    "__version__",
    "get_preset",
    "list_presets",
    "print_preset_comparison",
]

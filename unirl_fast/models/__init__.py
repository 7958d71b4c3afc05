"""The unified model: a transformers LM expert and a diffusers DiT expert joined by learnable queries.

diffusers is imported lazily (only when a DiT or autoencoder is built), so this package imports without it.
"""
from .config import PRESETS, UnifiedConfig, preset_config
from .connector import QueryConnector
from .tokenizer import CharTokenizer
from .unified import Conditioning, UnifiedModel

__all__ = ["UnifiedModel", "UnifiedConfig", "Conditioning", "QueryConnector", "CharTokenizer", "PRESETS",
           "preset_config"]

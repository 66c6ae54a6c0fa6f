"""DeBiFormer models. `create_model(name, **overrides)` is the entry point."""

from debiformer_jax.models.config import ALIASES, PRESETS, DeBiFormerConfig, get_config
from debiformer_jax.models.debiformer import Block, DeBiFormer, Implementation, create_model

"""DeBiFormer models. `create_model(name, **overrides)` is the entry point."""

from debiformer_jax.models.architecture import ALIASES, PRESETS, Architecture, get_architecture
from debiformer_jax.models.debiformer import Block, DeBiFormer, create_model
from debiformer_jax.models.implementation import Implementation

"""Converting official PyTorch DeBiFormer checkpoints for the JAX model."""

from debiformer_jax.convert.backbone import BackboneStateDict, backbone_state_dict
from debiformer_jax.convert.converter import (checkpoint_architecture, convert_state_dict,
                                              load_torch_checkpoint)
from debiformer_jax.convert.name_map import Entry, name_map
from debiformer_jax.convert.reader import read_torch_state_dict

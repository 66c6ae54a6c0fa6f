"""PyTorch reference implementation of the official DeBiFormer, for parity tests and conversion."""

from debiformer_jax.reference.torch_debiformer import (DeBiFormerTorch, build_torch_model,
                                                       clear_routing_input, min_routing_margin,
                                                       randomize_)

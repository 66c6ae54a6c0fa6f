"""Test-wide settings: quiet TensorFlow, full-precision float32 matmuls."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

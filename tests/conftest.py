"""Test-wide settings: quiet TensorFlow, keep it off any accelerator, float32 matmuls."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

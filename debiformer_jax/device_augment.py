"""The end of the input transform, run inside the jitted steps on uint8 batches.

The host pipelines (data/input_pipeline.py) stop at uint8 NHWC images: a quarter of the bytes
of float32 to batch and move, and no per-pixel float work on the host CPUs, which feed the
chips. Here the batch is normalised with ImageNet mean/std (0..255 scale, as
`augment.normalize` on the host, to float32 rounding) and, in training, the random-erasing
boxes the host drew (`augment.erase_box`) are filled with N(0, 1) noise in normalised space,
as timm's RandomErasing (mode 'pixel') does after its Normalize.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from debiformer_jax.data.augment import MEAN_RGB, STD_RGB


def normalize(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 `(x - MEAN_RGB) / STD_RGB`."""
  x = images.astype(jnp.float32)
  return (x - jnp.asarray(MEAN_RGB, jnp.float32)) / jnp.asarray(STD_RGB, jnp.float32)


def erase(rng: jax.Array, images: jax.Array, boxes: jax.Array) -> jax.Array:
  """Fills box b of image b with per-pixel, per-channel N(0, 1) noise.

  images: float [B, H, W, C], normalised. boxes: int32 [B, 4] = (top, left, rows, cols);
  rows = cols = 0 leaves the image as it is.
  """
  height, width = images.shape[1], images.shape[2]
  top, left, rows, cols = (boxes[:, i, None, None] for i in range(4))
  y = jnp.arange(height)[None, :, None]
  x = jnp.arange(width)[None, None, :]
  inside = (y >= top) & (y < top + rows) & (x >= left) & (x < left + cols)
  noise = jax.random.normal(rng, images.shape, images.dtype)
  return jnp.where(inside[..., None], noise, images)

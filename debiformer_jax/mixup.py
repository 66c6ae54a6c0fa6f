"""Mixup / CutMix with label smoothing, in JAX, for use inside the jitted train step.

timm's `Mixup` in batch mode: one lambda per call, the partner of example i is example
B-1-i (the batch reversed), CutMix chosen with probability `switch_prob` when both alphas
are positive, and for CutMix lambda replaced by 1 - (box area / image area). Images are
NHWC (any float dtype); targets are float32 [B, num_classes] and sum to 1.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """One-hot with `on = 1 - smoothing + smoothing / num_classes`, `off = smoothing /
  num_classes` (timm's convention), float32 [B, num_classes]."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off


def cutmix_box(rng: jax.Array, height: int, width: int,
               lam: jax.Array) -> Tuple[jax.Array, ...]:
  """timm's rand_bbox: a box of side int(side * sqrt(1 - lam)) centred uniformly in the
  image (centre in [0, side)), each half-extent side // 2, clipped to the image.
  Returns int32 (top, bottom, left, right), bottom/right exclusive."""
  ky, kx = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  top = jnp.clip(cy - cut_h // 2, 0, height)
  bottom = jnp.clip(cy + cut_h // 2, 0, height)
  left = jnp.clip(cx - cut_w // 2, 0, width)
  right = jnp.clip(cx + cut_w // 2, 0, width)
  return top, bottom, left, right


def _cutmix(rng, images, partner, lam):
  height, width = images.shape[1], images.shape[2]
  top, bottom, left, right = cutmix_box(rng, height, width, lam)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  mixed = jnp.where(box[None, :, :, None], partner, images)
  area = ((bottom - top) * (right - left)).astype(jnp.float32)
  return mixed, 1.0 - area / (height * width)


def _mixup(images, partner, lam):
  mixed = lam * images.astype(jnp.float32) + (1.0 - lam) * partner.astype(jnp.float32)
  return mixed.astype(images.dtype), lam


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, *,
                 num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5,
                 label_smoothing: float = 0.1) -> Tuple[jax.Array, jax.Array]:
  """Mixes a batch with its reverse; returns (images, soft targets [B, num_classes]).

  With both alphas 0 the images are returned unchanged and the targets are only
  label-smoothed. Alphas, `num_classes` and `switch_prob` must be static (Python numbers).
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 4)
  partner = images[::-1]
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha)
    lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
    images, lam = jax.lax.cond(
        use_cutmix,
        lambda: _cutmix(k_box, images, partner, lam_cut),
        lambda: _mixup(images, partner, lam_mix))
  elif cutmix_alpha > 0:
    images, lam = _cutmix(k_box, images, partner,
                          jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha))
  else:
    images, lam = _mixup(images, partner, jax.random.beta(k_mix, mixup_alpha, mixup_alpha))
  lam = jnp.asarray(lam, jnp.float32)
  return images, lam * targets + (1.0 - lam) * targets[::-1]

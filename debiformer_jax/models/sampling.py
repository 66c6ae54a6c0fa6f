"""Bilinear sampling with PyTorch `grid_sample(mode='bilinear', align_corners=True)` semantics.

Coordinates are normalised to [-1, 1] and given as (y, x) pairs (the official code stores
(y, x) and swaps to (x, y) only for grid_sample). With align_corners=True, -1 and +1 are the
centres of the first and last pixel: pixel = (g + 1) / 2 * (size - 1). Corners that fall
outside the map contribute zero (padding_mode='zeros'), as in
`jax.scipy.ndimage.map_coordinates(order=1, mode='constant', cval=0)`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _corners(g, size):
  """Integer corner indices and bilinear weights along one axis for normalised coords g."""
  pix = (g + 1.0) * 0.5 * (size - 1)
  lo = jnp.floor(pix)
  frac = pix - lo
  lo = lo.astype(jnp.int32)
  hi = lo + 1
  w_lo = jnp.where((lo >= 0) & (lo < size), 1.0 - frac, 0.0)
  w_hi = jnp.where((hi >= 0) & (hi < size), frac, 0.0)
  return jnp.clip(lo, 0, size - 1), jnp.clip(hi, 0, size - 1), w_lo, w_hi


def bilinear_sample(features, coords):
  """Samples `features` (B, H, W, C) at `coords` (B, P, 2) of normalised (y, x) -> (B, P, C).

  Gather form: four corner gathers per point, weighted.
  """
  b, h, w, c = features.shape
  y0, y1, wy0, wy1 = _corners(coords[..., 0], h)
  x0, x1, wx0, wx1 = _corners(coords[..., 1], w)
  flat = features.reshape(b, h * w, c)

  def corner(yi, xi):
    idx = (yi * w + xi)[..., None]  # (B, P, 1)
    return jnp.take_along_axis(flat, idx, axis=1)

  dt = features.dtype
  out = (corner(y0, x0) * (wy0 * wx0)[..., None].astype(dt)
         + corner(y0, x1) * (wy0 * wx1)[..., None].astype(dt)
         + corner(y1, x0) * (wy1 * wx0)[..., None].astype(dt)
         + corner(y1, x1) * (wy1 * wx1)[..., None].astype(dt))
  return out


def interpolation_matrix(g, size, dtype=jnp.float32):
  """Dense bilinear weights (..., size) along one axis for normalised coords g (...).

  Row p holds the (at most two) non-zero weights of point p; out-of-range corners get none,
  which is exactly zero padding. Used by the matmul (MXU-friendly) formulation.
  """
  lo, hi, w_lo, w_hi = _corners(g, size)
  eye = jnp.arange(size)
  return ((eye == lo[..., None]) * w_lo[..., None]
          + (eye == hi[..., None]) * w_hi[..., None]).astype(dtype)


def bilinear_sample_matmul(features, coords):
  """Same as `bilinear_sample`, as two contractions with separable interpolation weights."""
  _, h, w, _ = features.shape
  wy = interpolation_matrix(coords[..., 0], h, features.dtype)  # (B, P, H)
  wx = interpolation_matrix(coords[..., 1], w, features.dtype)  # (B, P, W)
  hi = lax.Precision.HIGHEST  # exact interpolation on TPU too, like the gather form
  rows = jnp.einsum('bph,bhwc->bpwc', wy, features, precision=hi)
  return jnp.einsum('bpw,bpwc->bpc', wx, rows, precision=hi)


SAMPLERS = {'gather': bilinear_sample, 'matmul': bilinear_sample_matmul}


def get_sampler(name: str):
  if name not in SAMPLERS:
    raise ValueError(f'unknown sampling implementation {name!r}; choose from {sorted(SAMPLERS)}.')
  return SAMPLERS[name]

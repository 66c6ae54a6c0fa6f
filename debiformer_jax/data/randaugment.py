"""RandAugment (timm's `rand-...` policy strings) as TF ops on uint8 RGB images [H, W, 3].

Each op reproduces, bit for bit, the PIL operation timm applies (ImageOps, ImageEnhance,
and `Image.transform(AFFINE)` for Rotate / ShearX/Y / TranslateX/YRel with PIL's
pixel-centre convention, its edge handling and FILL_RGB outside the image). Geometric ops
sample bicubically as timm's training recipe asks PIL to (its affine bicubic, a = -1);
'bilinear' is available per op. `rand_augment` draws everything from one stateless seed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Tuple

import tensorflow as tf

from debiformer_jax.data.augment import FILL_RGB, split_seed

_LEVEL_MAX = 10.0  # timm's _LEVEL_DENOM: magnitudes live on a 0..10 scale.

# timm's _RAND_INCREASING_TRANSFORMS (inc1) and _RAND_TRANSFORMS (inc0), in timm's order.
INCREASING_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
    'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
    'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel')
DEFAULT_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel')


@dataclasses.dataclass(frozen=True)
class RandAugmentParams:
  """A parsed policy. `magnitude_std` > 100 in the string means uniform in [0, magnitude]."""

  num_layers: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.0
  magnitude_max: float = _LEVEL_MAX
  prob: float = 0.5
  ops: Tuple[str, ...] = DEFAULT_OPS


def parse_randaugment(spec: str) -> RandAugmentParams:
  """Parses timm's policy string, e.g. 'rand-m9-mstd0.5-inc1'.

  Sections after 'rand': m<magnitude>, n<num_layers>, mstd<std>, mmax<max>, p<prob>,
  inc<0|1>. Anything else raises ValueError.
  """
  parts = spec.split('-') if isinstance(spec, str) else []
  if not parts or parts[0] != 'rand':
    raise ValueError(f'RandAugment policy {spec!r} must start with "rand", '
                     f'e.g. "rand-m9-mstd0.5-inc1".')
  fields = dict(num_layers=2, magnitude=9.0, magnitude_std=0.0, magnitude_max=_LEVEL_MAX,
                prob=0.5)
  increasing = False
  for part in parts[1:]:
    match = re.fullmatch(r'(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)', part)
    if not match:
      raise ValueError(f'RandAugment policy {spec!r}: unknown section {part!r}; known: '
                       f'm<magnitude> n<layers> mstd<std> mmax<max> p<prob> inc<0|1>.')
    key, value = match.group(1), float(match.group(2))
    if key == 'm':
      fields['magnitude'] = value
    elif key == 'n':
      if value != int(value) or value < 1:
        raise ValueError(f'RandAugment policy {spec!r}: n must be a positive integer.')
      fields['num_layers'] = int(value)
    elif key == 'mstd':
      fields['magnitude_std'] = math.inf if value > 100 else value
    elif key == 'mmax':
      fields['magnitude_max'] = value
    elif key == 'p':
      if value > 1:
        raise ValueError(f'RandAugment policy {spec!r}: p must be in [0, 1].')
      fields['prob'] = value
    else:
      increasing = value != 0
  return RandAugmentParams(ops=INCREASING_OPS if increasing else DEFAULT_OPS, **fields)


# ---------------------------------------------------------------------------------------
# Ops. Each takes a uint8 [H, W, 3] image (and a scalar argument) and returns uint8.


def _f64(value) -> tf.Tensor:
  """float64 tensor; Python numbers are converted directly (not via float32)."""
  if isinstance(value, (tf.Tensor, tf.Variable)):
    return tf.cast(value, tf.float64)
  return tf.convert_to_tensor(value, tf.float64)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL Image.blend(degenerate, image, factor): float32 arithmetic, clip, truncate."""
  d = tf.cast(degenerate, tf.float32)
  x = d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d)
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL convert('L'): (19595 R + 38470 G + 7471 B + 2**15) >> 16, int32 [H, W]."""
  x = tf.cast(image, tf.int32)
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 32768) // 65536


def _apply_lut(image: tf.Tensor, lut: tf.Tensor) -> tf.Tensor:
  """Per-channel lookup; `lut` is int [3, 256]."""
  x = tf.cast(image, tf.int32)
  idx = x + tf.constant([0, 256, 512])
  flat = tf.reshape(tf.cast(lut, tf.int32), [-1])
  return tf.cast(tf.clip_by_value(tf.gather(flat, idx), 0, 255), tf.uint8)


def _histograms(image: tf.Tensor) -> tf.Tensor:
  """int32 [3, 256] per-channel histograms."""
  x = tf.reshape(tf.cast(image, tf.int32), [-1, 3])
  return tf.stack([tf.math.bincount(x[:, c], minlength=256, maxlength=256)
                   for c in range(3)])


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """ImageOps.autocontrast (cutoff 0): per channel, int((x - lo) * 255 / (hi - lo))."""
  x = tf.cast(image, tf.float64)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  offset = -lo * scale
  stretched = tf.clip_by_value(tf.floor(x * scale + offset), 0.0, 255.0)
  return tf.cast(tf.where(hi > lo, stretched, x), tf.uint8)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """ImageOps.equalize: per channel histogram equalisation with PIL's integer steps."""
  hist = _histograms(image)
  ids = tf.range(256)[None, :]
  last_nonzero = tf.reduce_max(tf.where(hist > 0, ids, -1), axis=1)
  last_count = tf.gather(hist, last_nonzero, batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last_count) // 255
  safe_step = tf.maximum(step, 1)[:, None]
  lut = (safe_step // 2 + tf.cumsum(hist, axis=1, exclusive=True)) // safe_step
  lut = tf.where(step[:, None] > 0, lut, tf.broadcast_to(ids, [3, 256]))
  return _apply_lut(image, lut)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keeps the `bits` most significant bits (0..8)."""
  shift = 8 - tf.cast(bits, tf.int32)
  x = tf.bitwise.right_shift(tf.cast(image, tf.int32), shift)
  return tf.cast(tf.bitwise.left_shift(x, shift), tf.uint8)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Inverts pixels >= threshold (threshold 256 = identity)."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image: tf.Tensor, addition, threshold=128) -> tf.Tensor:
  """Adds `addition` (clipped at 255) to pixels below `threshold`."""
  x = tf.cast(image, tf.int32)
  added = tf.minimum(x + tf.cast(addition, tf.int32), 255)
  return tf.cast(tf.where(x < threshold, added, x), tf.uint8)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """ImageEnhance.Color: blend with the grayscale image."""
  gray = tf.cast(_grayscale(image), tf.uint8)
  return _blend(tf.stack([gray] * 3, axis=-1), image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """ImageEnhance.Contrast: blend with the constant mean grey level (rounded)."""
  mean = tf.reduce_mean(tf.cast(_grayscale(image), tf.float64))
  degenerate = tf.fill(tf.shape(image), tf.cast(tf.floor(mean + 0.5), tf.uint8))
  return _blend(degenerate, image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """ImageEnhance.Brightness: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (3x3, centre 5, /13; the
  one-pixel border is left unfiltered, values rounded)."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding='VALID')[0]
  smooth = tf.cast(tf.clip_by_value(tf.round(smooth), 0.0, 255.0), tf.uint8)
  shape = tf.shape(image)
  rows = tf.range(shape[0])[:, None]
  cols = tf.range(shape[1])[None, :]
  interior = (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)
  padded = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior[:, :, None], padded, image)
  return _blend(degenerate, image, factor)


def _pil_cubic(v0, v1, v2, v3, d):
  """PIL's cubic convolution through four samples (its affine BICUBIC, a = -1)."""
  p2 = v2 - v0
  p3 = 2.0 * (v0 - v1) + v2 - v3
  p4 = -v0 + v1 - v2 + v3
  return v1 + d * (p2 + d * (p3 + d * p4))


def _pil_sample(image: tf.Tensor, x_in: tf.Tensor, y_in: tf.Tensor, interpolation: str,
                x_centred: bool = False, y_centred: bool = False) -> tf.Tensor:
  """Samples uint8 [H, W, 3] at float64 continuous points [h, w] as PIL's transform filters
  do: float64, edge-clamped neighbours, truncated to uint8. Points outside the image are
  not handled here.

  `x_centred` (`y_centred`) says that every x (y) point is a pixel centre: the fraction is
  0, where PIL's interpolation along that axis returns the centre tap exactly (v1 + 0 * ...),
  so only that tap is gathered (4 gathers instead of 16 for bicubic), with the same result.
  """
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  flat = tf.reshape(tf.cast(image, tf.float64), [-1, 3])
  xs = x_in - 0.5
  ys = y_in - 0.5
  x0 = tf.floor(xs)
  y0 = tf.floor(ys)
  dx = (xs - x0)[..., None]
  dy = (ys - y0)[..., None]
  x0 = tf.cast(x0, tf.int32)
  y0 = tf.cast(y0, tf.int32)
  offsets = (0, 1) if interpolation == 'bilinear' else (-1, 0, 1, 2)
  cols = [tf.clip_by_value(x0 + o, 0, width - 1) for o in ((0,) if x_centred else offsets)]
  rows = [tf.clip_by_value(y0 + o, 0, height - 1) * width
          for o in ((0,) if y_centred else offsets)]
  if interpolation == 'bilinear':
    interpolate = lambda v, t: v[0] + (v[1] - v[0]) * t
  else:
    interpolate = lambda v, t: _pil_cubic(*v, t)
  per_row = [tf.gather(flat, r + cols[0]) if x_centred else
             interpolate([tf.gather(flat, r + c) for c in cols], dx) for r in rows]
  value = per_row[0] if y_centred else interpolate(per_row, dy)
  return tf.cast(tf.floor(tf.clip_by_value(value, 0.0, 255.0)), tf.uint8)


def _is_constant_row(row, constants) -> bool:
  """Whether an affine matrix row holds these Python constants (not tensors)."""
  return all(isinstance(v, (int, float)) for v in row) and tuple(row) == constants


def affine(image: tf.Tensor, matrix, interpolation: str = 'bicubic') -> tf.Tensor:
  """PIL `Image.transform(size, AFFINE, matrix, resample, fillcolor=FILL_RGB)`.

  `matrix` (a, b, c, d, e, f) maps an output point (x, y) to the input point
  (a x + b y + c, d x + e y + f) in PIL's continuous coordinates (pixel centres at +0.5).
  As in PIL, an output pixel whose sample point falls outside the input gets the fill
  colour; one inside is interpolated ('bicubic' or 'bilinear') from edge-clamped
  neighbours. Shears and translations along one axis (the other axis' row the constants
  (1, 0, 0) or (0, 1, 0)) interpolate along that axis only, which is exact.
  """
  if interpolation not in ('bicubic', 'bilinear'):
    raise ValueError(f'interpolation must be "bicubic" or "bilinear", got {interpolation!r}.')
  x_centred = _is_constant_row(matrix[:3], (1, 0, 0))  # x_in = x
  y_centred = _is_constant_row(matrix[3:], (0, 1, 0))  # y_in = y
  a, b, c, d, e, f = [_f64(v) for v in matrix]
  shape = tf.shape(image)
  height = tf.cast(shape[0], tf.float64)
  width = tf.cast(shape[1], tf.float64)
  xs = tf.range(width)[None, :] + 0.5
  ys = tf.range(height)[:, None] + 0.5
  x_in = a * xs + b * ys + c
  y_in = d * xs + e * ys + f
  inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
  out = _pil_sample(image, x_in, y_in, interpolation, x_centred, y_centred)
  return tf.where(inside[:, :, None], out, tf.constant(FILL_RGB, tf.uint8))


def rotate(image: tf.Tensor, degrees, interpolation: str = 'bicubic') -> tf.Tensor:
  """PIL Image.rotate: counter-clockwise about the image centre, same size."""
  shape = tf.cast(tf.shape(image), tf.float64)
  cx, cy = shape[1] / 2.0, shape[0] / 2.0
  theta = -(_f64(degrees) * (math.pi / 180.0))
  # PIL rounds the matrix to 15 decimals (so 90 degrees is exact).
  cos = tf.round(tf.cos(theta) * 1e15) / 1e15
  sin = tf.round(tf.sin(theta) * 1e15) / 1e15
  c = (cos * -cx + sin * -cy) + cx
  f = (-sin * -cx + cos * -cy) + cy
  return affine(image, (cos, sin, c, -sin, cos, f), interpolation)


def shear_x(image: tf.Tensor, factor, interpolation: str = 'bicubic') -> tf.Tensor:
  return affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), interpolation)


def shear_y(image: tf.Tensor, factor, interpolation: str = 'bicubic') -> tf.Tensor:
  return affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), interpolation)


def translate_x(image: tf.Tensor, pixels, interpolation: str = 'bicubic') -> tf.Tensor:
  """Output pixel x shows input pixel x + pixels (positive moves the content left)."""
  return affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), interpolation)


def translate_y(image: tf.Tensor, pixels, interpolation: str = 'bicubic') -> tf.Tensor:
  return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), interpolation)


# ---------------------------------------------------------------------------------------
# Magnitude (0..10) -> op argument, timm's level functions. `sign` is +1 or -1.


def _int(v):
  return tf.floor(v)  # int() of a non-negative value.


def _level(m):
  return m / _LEVEL_MAX


def _apply_op(name: str, image: tf.Tensor, m: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
  """Applies op `name` at magnitude `m` (float64 scalar) with random sign `sign`."""
  size = tf.cast(tf.shape(image), tf.float64)
  if name == 'AutoContrast':
    return auto_contrast(image)
  if name == 'Equalize':
    return equalize(image)
  if name == 'Invert':
    return invert(image)
  if name == 'Rotate':
    return rotate(image, sign * _level(m) * 30.0)
  if name == 'Posterize':
    return posterize(image, _int(_level(m) * 4.0))
  if name == 'PosterizeIncreasing':
    return posterize(image, 4.0 - _int(_level(m) * 4.0))
  if name == 'Solarize':
    return solarize(image, _int(_level(m) * 256.0))
  if name == 'SolarizeIncreasing':
    return solarize(image, 256.0 - _int(_level(m) * 256.0))
  if name == 'SolarizeAdd':
    return solarize_add(image, _int(_level(m) * 110.0))
  enhance = {'Color': color, 'Contrast': contrast, 'Brightness': brightness,
             'Sharpness': sharpness}
  if name in enhance:
    return enhance[name](image, _level(m) * 1.8 + 0.1)
  if name.endswith('Increasing') and name[:-len('Increasing')] in enhance:
    return enhance[name[:-len('Increasing')]](image, 1.0 + sign * _level(m) * 0.9)
  if name == 'ShearX':
    return shear_x(image, sign * _level(m) * 0.3)
  if name == 'ShearY':
    return shear_y(image, sign * _level(m) * 0.3)
  if name == 'TranslateXRel':
    return translate_x(image, sign * _level(m) * 0.45 * size[1])
  if name == 'TranslateYRel':
    return translate_y(image, sign * _level(m) * 0.45 * size[0])
  raise ValueError(f'Unknown RandAugment op {name!r}.')


def apply_op(name: str, image: tf.Tensor, magnitude, sign=1.0) -> tf.Tensor:
  """Public single-op entry point (magnitude on the 0..10 scale, sign +1/-1)."""
  return _apply_op(name, image, _f64(magnitude), _f64(sign))


def sample_magnitude(seed: tf.Tensor, params: RandAugmentParams) -> tf.Tensor:
  """timm AugmentOp magnitude: N(m, std) (or U(0, m) for infinite std) clipped to
  [0, magnitude_max]; float64 scalar."""
  m = params.magnitude
  if params.magnitude_std == math.inf:
    value = tf.random.stateless_uniform([], seed, 0.0, m, dtype=tf.float64)
  elif params.magnitude_std > 0:
    value = m + params.magnitude_std * tf.random.stateless_normal([], seed, dtype=tf.float64)
  else:
    value = tf.constant(m, tf.float64)
  return tf.clip_by_value(value, 0.0, params.magnitude_max)


@functools.lru_cache(maxsize=None)
def _layer_fn(params: RandAugmentParams):
  """One RandAugment layer as a tf.function, traced once per policy (keeps graphs small)."""
  num_ops = len(params.ops)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int64)])
  def layer(image, seed):
    s_op, s_apply, s_mag, s_sign = tf.unstack(split_seed(seed, 4))
    op = tf.random.stateless_uniform([], s_op, 0, num_ops, dtype=tf.int32)
    applied = tf.random.stateless_uniform([], s_apply) < params.prob
    magnitude = sample_magnitude(s_mag, params)
    sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5,
                    tf.constant(-1.0, tf.float64), tf.constant(1.0, tf.float64))
    # Branch `num_ops` is "skip this layer".
    branch = tf.where(applied, op, num_ops)
    branches = [functools.partial(_apply_op, name, image, magnitude, sign)
                for name in params.ops]
    branches.append(lambda: image)
    out = tf.switch_case(branch, branches)
    out.set_shape([None, None, 3])
    return out

  return layer


def rand_augment(image: tf.Tensor, seed: tf.Tensor, params: RandAugmentParams) -> tf.Tensor:
  """`num_layers` ops chosen uniformly with replacement; each applied with prob `prob`,
  with its own magnitude (sample_magnitude) and random sign. uint8 [H, W, 3] in and out."""
  static_shape = image.shape
  layer = _layer_fn(params)
  for layer_seed in tf.unstack(split_seed(tf.cast(seed, tf.int64), params.num_layers)):
    image = layer(image, layer_seed)
  image.set_shape(static_shape)
  return image

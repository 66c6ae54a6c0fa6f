"""Per-example image ops for the tf.data input pipeline (no RandAugment: see randaugment.py).

Conventions: images are HWC (NHWC once batched), RGB. "uint8" images hold 0..255; the
normalised float32 image is `(x - MEAN_RGB) / STD_RGB` with mean/std on the 0..255 scale.
Every random op takes an explicit stateless seed (int32/int64 tensor of shape [2]) so that
a pipeline built from them is a pure function of its seeds. Each op works inside
`tf.data.Dataset.map` (graph mode, dynamic height/width).

Semantics follow torchvision / timm (RandomResizedCrop, RandomHorizontalFlip, Resize +
CenterCrop, RandomErasing) on PIL images; the bicubic resize reproduces PIL's
fixed-point resampler exactly. The pipelines hand uint8 images to the device, which
normalises them and fills the erasing box there (`debiformer_jax/device_augment.py`):
a quarter of the bytes to move, and no float work on the host.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import tensorflow as tf

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# ImageNet mean pixel rounded to integers; the fill colour of RandAugment's geometric ops.
FILL_RGB = (124, 116, 104)

_CROP_ATTEMPTS = 10


def _hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow (these ops run on the host) off GPUs/TPUs: they belong to JAX."""
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # Already initialised, or no such device type.
      pass


_hide_accelerators_from_tf()


def split_seed(seed: tf.Tensor, num: int) -> tf.Tensor:
  """`num` independent stateless seeds ([num, 2]) derived from one seed ([2])."""
  return tf.random.experimental.stateless_split(seed, num)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval,
                                     dtype=tf.float32)


def decode_image(data: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 [H, W, 3] (grayscale and RGBA become RGB)."""

  def _jpeg():
    return tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE')

  def _other():
    return tf.io.decode_image(data, channels=3, expand_animations=False)

  image = tf.cond(tf.io.is_jpeg(data), _jpeg, _other)
  image.set_shape([None, None, 3])
  return image


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds and clips a float image to uint8 (what PIL does when it writes 8-bit pixels)."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


_PRECISION_BITS = 22  # PIL's fixed-point resampling precision for 8-bit images.


def _bicubic_kernel(x: tf.Tensor) -> tf.Tensor:
  """Keys cubic with a = -0.5, PIL's expression order (float64)."""
  a = -0.5
  x = tf.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def _resample_weights(in_size: tf.Tensor, out_size: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """PIL's bicubic resampling weights along one axis: (weights, indices), [out, taps] each.

  Output i is sum_k weights[i, k] * input[indices[i, k]] in 22-bit fixed point (weights are
  integers stored as float64, indices int32): support widened by the scale when shrinking
  (antialiasing), taps normalised to sum 1, then rounded as PIL rounds them. Taps past the
  input's end have weight 0 (their index is clamped).
  """
  in_f = tf.cast(in_size, tf.float64)
  scale = in_f / tf.cast(out_size, tf.float64)
  filter_scale = tf.maximum(scale, 1.0)
  support = 2.0 * filter_scale
  ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
  center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
  xmin = tf.maximum(tf.floor(center - support + 0.5), 0.0)
  xmax = tf.minimum(tf.floor(center + support + 0.5), in_f) - xmin
  taps = tf.cast(tf.range(ksize), tf.float64)[None, :]
  w = _bicubic_kernel(((taps + xmin[:, None]) - center[:, None] + 0.5) / filter_scale)
  w = tf.where(taps < xmax[:, None], w, 0.0)
  total = tf.reduce_sum(w, axis=1, keepdims=True)
  w = tf.where(total != 0.0, w / tf.where(total != 0.0, total, 1.0), w)
  one = float(1 << _PRECISION_BITS)
  w = tf.where(w < 0, tf.math.ceil(-0.5 + w * one), tf.floor(0.5 + w * one))
  indices = tf.minimum(tf.cast(taps + xmin[:, None], tf.int32), in_size - 1)
  return w, indices


def _resample_rows(image: tf.Tensor, weights: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
  """Resamples axis 0 of uint8 [N, M, C] with `_resample_weights` rows ([out, taps] each) as
  PIL's 8-bit pass does: int32 accumulation of integer weights times 8-bit values (exact:
  |sum| < 2**31, as in PIL), rounding offset, arithmetic shift, clip."""
  shape = tf.shape(image)
  flat = tf.reshape(image, [shape[0], -1])
  taps = tf.cast(tf.gather(flat, indices), tf.int32)  # [out, taps, M*C]
  acc = tf.reduce_sum(taps * tf.cast(weights, tf.int32)[:, :, None], axis=1)
  acc += 1 << (_PRECISION_BITS - 1)
  out = tf.clip_by_value(tf.bitwise.right_shift(acc, _PRECISION_BITS), 0, 255)
  return tf.reshape(tf.cast(out, tf.uint8), tf.concat([tf.shape(indices)[:1], shape[1:]], 0))


def resize_bicubic(image: tf.Tensor, height, width, window=None) -> tf.Tensor:
  """PIL `Image.resize((width, height), BICUBIC)` of a uint8 [H, W, 3] image, bit-exact:
  horizontal pass, rounding to uint8, then vertical pass; a pass whose size does not
  change is skipped.

  `window` (top, left, rows, cols) returns only that part of the resized image, computing
  only it: the vertical pass' output rows of the window and the input rows they read, the
  horizontal pass' output columns of the window (the same pixels as resizing, then cropping).
  """
  image = tf.convert_to_tensor(image, tf.uint8)
  height = tf.convert_to_tensor(height, tf.int32)
  width = tf.convert_to_tensor(width, tf.int32)
  top, left, rows, cols = (0, 0, height, width) if window is None else window
  shape = tf.shape(image)
  same_h, same_w = tf.equal(shape[0], height), tf.equal(shape[1], width)
  v_weights, v_indices = (t[top:top + rows] for t in _resample_weights(shape[0], height))
  h_weights, h_indices = (t[left:left + cols] for t in _resample_weights(shape[1], width))
  first = tf.where(same_h, top, tf.reduce_min(v_indices))
  last = tf.where(same_h, top + rows, tf.reduce_max(v_indices) + 1)
  slab = image[first:last]
  out = tf.cond(
      same_w, lambda: slab[:, left:left + cols],
      lambda: tf.transpose(_resample_rows(tf.transpose(slab, [1, 0, 2]), h_weights, h_indices),
                           [1, 0, 2]))
  out = tf.cond(same_h, lambda: out, lambda: _resample_rows(out, v_weights, v_indices - first))
  out.set_shape([None, None, 3])
  return out


def sample_crop_window(seed, height, width, scale=(0.08, 1.0),
                       ratio=(3.0 / 4.0, 4.0 / 3.0)) -> Tuple[tf.Tensor, ...]:
  """torchvision's RandomResizedCrop.get_params: (top, left, crop_h, crop_w), int32.

  Ten attempts, each with an area fraction ~ U(scale) and a log-uniform aspect ratio;
  the first attempt that fits wins. If none fits, the centre crop of the whole image
  with its aspect ratio clamped into `ratio` is used.
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  s_area, s_ratio, s_top, s_left = tf.unstack(split_seed(seed, 4))
  area = h * w * _uniform(s_area, [_CROP_ATTEMPTS], scale[0], scale[1])
  log_r = _uniform(s_ratio, [_CROP_ATTEMPTS], math.log(ratio[0]), math.log(ratio[1]))
  aspect = tf.exp(log_r)
  cw = tf.round(tf.sqrt(area * aspect))
  ch = tf.round(tf.sqrt(area / aspect))
  fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  # torch.randint(0, n + 1): offsets uniform over every position the crop fits in.
  top = tf.floor(_uniform(s_top, [_CROP_ATTEMPTS]) * (h - ch + 1.0))
  left = tf.floor(_uniform(s_left, [_CROP_ATTEMPTS]) * (w - cw + 1.0))

  in_ratio = w / h
  fb_w = tf.where(in_ratio < ratio[0], w,
                  tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w))
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  fb_top = tf.floor((h - fb_h) / 2.0)
  fb_left = tf.floor((w - fb_w) / 2.0)

  found = tf.reduce_any(fits)
  pick = lambda v, fb: tf.cast(tf.where(found, v[first], fb), tf.int32)
  return pick(top, fb_top), pick(left, fb_left), pick(ch, fb_h), pick(cw, fb_w)


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
                        decode_and_crop: bool = True) -> tf.Tensor:
  """RandomResizedCrop to uint8 [size, size, 3], bicubic.

  `image` is either a decoded uint8 [H, W, 3] image or a scalar string of encoded bytes.
  With `decode_and_crop`, encoded JPEGs go through `decode_and_crop_jpeg`, which decodes
  only the window: much faster, but with chroma-subsampled JPEGs pixels next to the
  window's edge can differ by a level or two from decoding the whole image and cropping.
  """
  image = tf.convert_to_tensor(image)
  if image.dtype == tf.string and not decode_and_crop:
    image = decode_image(image)
  if image.dtype == tf.string:
    data = image

    def _jpeg():
      shape = tf.image.extract_jpeg_shape(data)
      top, left, ch, cw = sample_crop_window(seed, shape[0], shape[1], scale, ratio)
      return tf.image.decode_and_crop_jpeg(data, tf.stack([top, left, ch, cw]), channels=3,
                                           dct_method='INTEGER_ACCURATE')

    def _other():
      decoded = decode_image(data)
      shape = tf.shape(decoded)
      top, left, ch, cw = sample_crop_window(seed, shape[0], shape[1], scale, ratio)
      return decoded[top:top + ch, left:left + cw]

    crop = tf.cond(tf.io.is_jpeg(data), _jpeg, _other)
  else:
    shape = tf.shape(image)
    top, left, ch, cw = sample_crop_window(seed, shape[0], shape[1], scale, ratio)
    crop = image[top:top + ch, left:left + cw]
  crop.set_shape([None, None, 3])
  out = resize_bicubic(crop, size, size)
  out.set_shape([size, size, 3])
  return out


def random_flip(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
  """Mirrors the image left-right with probability `prob`."""
  image = tf.convert_to_tensor(image)
  flip = _uniform(seed) < prob
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """uint8 (or 0..255 float) RGB -> float32 `(x - MEAN_RGB) / STD_RGB`."""
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(MEAN_RGB)) / tf.constant(STD_RGB)


def erase_box(seed: tf.Tensor, height, width, prob: float = 0.25,
              min_area: float = 0.02, max_area: float = 1.0 / 3.0,
              min_aspect: float = 0.3, max_aspect: float | None = None) -> tf.Tensor:
  """timm RandomErasing's box (mode 'pixel', one box), drawn on the host: int32 [4] =
  (top, left, rows, cols), all 0 when nothing is erased. The train step fills the box with
  per-pixel, per-channel N(0, 1) noise in normalised space (`device_augment.erase`).

  With probability `prob` a box of area fraction U(min_area, max_area) and log-uniform
  aspect ratio (h/w) in [min_aspect, 1/min_aspect]. Ten attempts; an attempt fits when the
  box is strictly smaller than the image on both sides; if none fits nothing is erased.
  """
  max_aspect = max_aspect or 1.0 / min_aspect
  s_do, s_area, s_aspect, s_top, s_left = tf.unstack(split_seed(seed, 5))
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  area = h * w * _uniform(s_area, [_CROP_ATTEMPTS], min_area, max_area)
  aspect = tf.exp(_uniform(s_aspect, [_CROP_ATTEMPTS], math.log(min_aspect),
                           math.log(max_aspect)))
  eh = tf.round(tf.sqrt(area * aspect))
  ew = tf.round(tf.sqrt(area / aspect))
  fits = (ew < w) & (eh < h)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  # random.randint(0, n - e): inclusive on both ends.
  top = tf.floor(_uniform(s_top, [_CROP_ATTEMPTS]) * (h - eh + 1.0))[first]
  left = tf.floor(_uniform(s_left, [_CROP_ATTEMPTS]) * (w - ew + 1.0))[first]
  erase = (_uniform(s_do) < prob) & tf.reduce_any(fits)
  box = tf.cast(tf.stack([top, left, eh[first], ew[first]]), tf.int32)
  return tf.where(erase, box, tf.zeros([4], tf.int32))


def eval_resize_size(size: int, crop_pct: float) -> int:
  """Shorter-side size before the centre crop: floor(size / crop_pct) (224, 0.875 -> 256)."""
  return int(math.floor(size / crop_pct))


def resize_shorter_center_crop(image: tf.Tensor, size: int, crop_pct: float = 0.875) -> tf.Tensor:
  """Eval transform: bicubic resize of the shorter side to `eval_resize_size`, centre crop.

  `image` is uint8 [H, W, 3] or encoded bytes; returns uint8 [size, size, 3].
  torchvision rounding: the longer side becomes int(short_new * long / short), the crop
  offset is round((n - size) / 2) (round half to even).
  """
  image = tf.convert_to_tensor(image)
  if image.dtype == tf.string:
    image = decode_image(image)
  target = eval_resize_size(size, crop_pct)
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float64)
  w = tf.cast(shape[1], tf.float64)
  short = tf.minimum(h, w)
  scaled = lambda n: tf.cast(tf.floor(target * n / short), tf.int32)
  new_h = tf.where(h <= w, target, scaled(h))
  new_w = tf.where(w <= h, target, scaled(w))
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
  out = resize_bicubic(image, new_h, new_w, window=(top, left, size, size))
  out.set_shape([size, size, 3])
  return out


def eval_image(image: tf.Tensor, size: int, crop_pct: float = 0.875) -> tf.Tensor:
  """The eval transform of one image (predict, export): uint8 [H, W, 3] (or encoded bytes)
  -> float32 normalised [size, size, 3] (`resize_shorter_center_crop`, then `normalize`).
  The eval pipeline crops on the host and normalises on the device
  (`device_augment.normalize`, equal to float32 rounding)."""
  return normalize(resize_shorter_center_crop(image, size, crop_pct))

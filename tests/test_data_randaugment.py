"""RandAugment: policy parsing, each op against PIL / hand formulas, sampling statistics."""

import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from debiformer_jax.data import randaugment as ra

FILL = (124, 116, 104)


def _noise(h=17, w=23, lo=0, hi=256, seed=0):
  return np.random.RandomState(seed).randint(lo, hi, (h, w, 3)).astype(np.uint8)


def _eq(mine, ref):
  np.testing.assert_array_equal(np.asarray(mine), np.asarray(ref))


def test_parse_default_policy():
  p = ra.parse_randaugment('rand-m9-mstd0.5-inc1')
  assert p.num_layers == 2 and p.magnitude == 9 and p.magnitude_std == 0.5
  assert p.magnitude_max == 10 and p.prob == 0.5
  assert p.ops == ra.INCREASING_OPS and len(p.ops) == 15
  assert set(p.ops) == {
      'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
      'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
      'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
      'TranslateYRel'}


def test_parse_variants():
  p = ra.parse_randaugment('rand-m7-n3-mstd101-mmax8-p0.3')
  assert (p.magnitude, p.num_layers, p.magnitude_std, p.magnitude_max, p.prob) == (
      7, 3, math.inf, 8, 0.3)
  assert p.ops == ra.DEFAULT_OPS
  assert ra.parse_randaugment('rand-m9-inc0').ops == ra.DEFAULT_OPS


@pytest.mark.parametrize('bad', ['', 'rand-x9', 'auto-m9', 'rand-m9-foo', 'original',
                                 'rand-n0', 'rand-p2'])
def test_parse_rejects_unknown(bad):
  with pytest.raises(ValueError):
    ra.parse_randaugment(bad)


def test_pixel_ops_by_hand():
  img = _noise()
  x = img.astype(int)
  _eq(ra.invert(img), 255 - x)
  for bits in range(0, 9):
    _eq(ra.posterize(img, bits), x & (~(2 ** (8 - bits) - 1) & 0xFF))
  for t in (0, 77, 128, 256):
    _eq(ra.solarize(img, t), np.where(x < t, x, 255 - x))
  for add in (0, 40, 110):
    _eq(ra.solarize_add(img, add), np.where(x < 128, np.minimum(x + add, 255), x))


def test_autocontrast_by_hand_and_pil():
  img = _noise(lo=40, hi=200)
  x = img.astype(np.float64)
  lo, hi = x.min((0, 1)), x.max((0, 1))
  scale = 255 / (hi - lo)
  _eq(ra.auto_contrast(img), np.clip(np.floor(x * scale + -lo * scale), 0, 255))
  _eq(ra.auto_contrast(img), ImageOps.autocontrast(Image.fromarray(img)))
  flat = np.full((4, 4, 3), 9, np.uint8)
  _eq(ra.auto_contrast(flat), flat)


@pytest.mark.parametrize('kind', ['noise', 'dark', 'binary', 'flat'])
def test_equalize_matches_pil(kind):
  rs = np.random.RandomState(1)
  img = {'noise': _noise(64, 48),
         'dark': (rs.rand(40, 40, 3) ** 3 * 255).astype(np.uint8),
         'binary': rs.randint(0, 2, (9, 9, 3)).astype(np.uint8) * 255,
         'flat': np.full((5, 5, 3), 7, np.uint8)}[kind]
  _eq(ra.equalize(img), ImageOps.equalize(Image.fromarray(img)))


@pytest.mark.parametrize('factor', [0.1, 0.55, 1.0, 1.5, 1.9])
def test_enhance_ops_match_pil(factor):
  img = _noise(lo=20, hi=230)
  pil = Image.fromarray(img)
  _eq(ra.color(img, factor), ImageEnhance.Color(pil).enhance(factor))
  _eq(ra.contrast(img, factor), ImageEnhance.Contrast(pil).enhance(factor))
  _eq(ra.brightness(img, factor), ImageEnhance.Brightness(pil).enhance(factor))
  _eq(ra.sharpness(img, factor), ImageEnhance.Sharpness(pil).enhance(factor))


def test_brightness_contrast_formulas():
  img = _noise(lo=20, hi=230)
  x = img.astype(np.float32)
  _eq(ra.brightness(img, 1.3), np.clip(x * np.float32(1.3), 0, 255).astype(np.uint8))
  gray = (img[..., 0].astype(int) * 19595 + img[..., 1].astype(int) * 38470
          + img[..., 2].astype(int) * 7471 + 32768) >> 16
  mean = np.float32(int(gray.mean() + 0.5))
  _eq(ra.contrast(img, 0.5), np.clip(mean + np.float32(0.5) * (x - mean), 0, 255).astype(np.uint8))


def test_rotate_90_and_translate_by_hand():
  sq = _noise(8, 8)
  _eq(ra.rotate(sq, 90), np.rot90(sq))  # PIL: counter-clockwise.
  _eq(ra.rotate(sq, -90), np.rot90(sq, -1))
  img = _noise(6, 9)
  out = ra.translate_x(img, 3).numpy()
  _eq(out[:, :6], img[:, 3:])
  _eq(out[:, 6:], np.broadcast_to(FILL, (6, 3, 3)))
  out = ra.translate_y(img, -2).numpy()
  _eq(out[2:], img[:-2])
  _eq(out[:2], np.broadcast_to(FILL, (2, 9, 3)))


@pytest.mark.parametrize('interp,resample', [('bicubic', Image.BICUBIC),
                                             ('bilinear', Image.BILINEAR)])
def test_geometric_ops_match_pil(interp, resample):
  img = _noise()
  pil = Image.fromarray(img)
  for deg in (17, -29.3, 90):
    _eq(ra.rotate(img, deg, interp), pil.rotate(deg, resample=resample, fillcolor=FILL))
  for f in (0.3, -0.2, 0.1234):
    _eq(ra.shear_x(img, f, interp), pil.transform(pil.size, Image.AFFINE, (1, f, 0, 0, 1, 0),
                                                  resample=resample, fillcolor=FILL))
    _eq(ra.shear_y(img, f, interp), pil.transform(pil.size, Image.AFFINE, (1, 0, 0, f, 1, 0),
                                                  resample=resample, fillcolor=FILL))
  for p in (4.4, -7.77):
    _eq(ra.translate_x(img, p, interp), pil.transform(pil.size, Image.AFFINE, (1, 0, p, 0, 1, 0),
                                                      resample=resample, fillcolor=FILL))
    _eq(ra.translate_y(img, p, interp), pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, p),
                                                      resample=resample, fillcolor=FILL))


def test_level_to_argument_mappings():
  """apply_op at magnitude m reproduces timm's level functions."""
  img = _noise(16, 20)
  pil = Image.fromarray(img)
  m = 9.0
  _eq(ra.apply_op('PosterizeIncreasing', img, m), ra.posterize(img, 4 - int(4 * m / 10)))
  _eq(ra.apply_op('SolarizeIncreasing', img, m), ra.solarize(img, 256 - int(256 * m / 10)))
  _eq(ra.apply_op('SolarizeAdd', img, m), ra.solarize_add(img, int(110 * m / 10)))
  for sign in (1, -1):
    f = 1 + sign * (m / 10 * 0.9)  # timm: level / 10 * 0.9, then the sign.
    _eq(ra.apply_op('ColorIncreasing', img, m, sign), ImageEnhance.Color(pil).enhance(f))
    _eq(ra.apply_op('SharpnessIncreasing', img, m, sign),
        ImageEnhance.Sharpness(pil).enhance(f))
    _eq(ra.apply_op('Rotate', img, m, sign),
        pil.rotate(sign * (m / 10 * 30), resample=Image.BICUBIC, fillcolor=FILL))
    s = sign * (m / 10 * 0.3)
    _eq(ra.apply_op('ShearX', img, m, sign),
        pil.transform(pil.size, Image.AFFINE, (1, s, 0, 0, 1, 0), resample=Image.BICUBIC,
                      fillcolor=FILL))
    t = sign * (m / 10 * 0.45) * 20  # Fraction of the width (20).
    _eq(ra.apply_op('TranslateXRel', img, m, sign),
        pil.transform(pil.size, Image.AFFINE, (1, 0, t, 0, 1, 0), resample=Image.BICUBIC,
                      fillcolor=FILL))
  _eq(ra.apply_op('PosterizeIncreasing', img, 10.0), np.zeros_like(img))
  _eq(ra.apply_op('SolarizeIncreasing', img, 0.0), img)


def test_magnitude_sampling_statistics():
  p = ra.parse_randaugment('rand-m9-mstd0.5-inc1')
  seeds = tf.random.experimental.stateless_split(tf.constant([3, 4], tf.int64), 4000)
  mags = np.array([float(ra.sample_magnitude(s, p)) for s in seeds])
  assert mags.min() >= 0 and mags.max() <= 10
  assert abs(mags.mean() - 9.0) < 0.05  # Clipping at 10 pulls the mean down a little.
  assert 0.4 < mags.std() < 0.52
  assert 0.01 < (mags == 10.0).mean() < 0.04  # P(N(9, .5) > 10) ~ 2.3 %.
  fixed = ra.parse_randaugment('rand-m9')
  assert float(ra.sample_magnitude(seeds[0], fixed)) == 9.0
  uni = ra.parse_randaugment('rand-m8-mstd101')
  u = np.array([float(ra.sample_magnitude(s, uni)) for s in seeds[:500]])
  assert u.min() >= 0 and u.max() <= 8 and abs(u.mean() - 4) < 0.3


def test_rand_augment_choices_and_determinism():
  """Ops uniform with replacement, each applied w.p. 0.5: identity w.p. 1/4 (plus ops
  that happen to be no-ops); seeded output reproducible; works inside tf.data."""
  p = ra.parse_randaugment('rand-m9-mstd0.5-inc1')
  img = _noise(12, 12)
  ds = tf.data.Dataset.range(300).map(
      lambda i: ra.rand_augment(tf.constant(img), tf.stack([i, tf.constant(5, tf.int64)]), p))
  outs = [o for o in ds.as_numpy_iterator()]
  unchanged = np.mean([np.array_equal(o, img) for o in outs])
  assert 0.17 < unchanged < 0.40
  again = ra.rand_augment(img, tf.constant([7, 5], tf.int64), p)
  _eq(again, outs[7])
  assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)

"""Mixup / CutMix (JAX, jitted) semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debiformer_jax.mixup import cutmix_box, mixup_cutmix, smooth_one_hot

B, H, W, C, K = 6, 16, 12, 3, 10


def _batch():
  # Example i is the constant image i + 1, so every pixel tells where it came from.
  images = jnp.broadcast_to(jnp.arange(1, B + 1, dtype=jnp.float32)[:, None, None, None],
                            (B, H, W, C))
  labels = jnp.array([0, 3, 3, 7, 9, 1])
  return images, labels


@functools.lru_cache(maxsize=None)
def _jitted(**kwargs):
  return jax.jit(functools.partial(mixup_cutmix, num_classes=K, **kwargs))


def _run(key, **kwargs):
  images, labels = _batch()
  return _jitted(**kwargs)(jax.random.PRNGKey(key), images, labels)


def test_label_smoothing_values():
  t = np.asarray(smooth_one_hot(jnp.array([2, 0]), 10, 0.1))
  np.testing.assert_allclose(t[0], [0.01, 0.01, 0.91] + [0.01] * 7, rtol=1e-6)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)


def test_disabled_is_identity_with_smoothing():
  images, labels = _batch()
  out, targets = _run(0, mixup_alpha=0.0, cutmix_alpha=0.0)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_allclose(targets, smooth_one_hot(labels, K, 0.1), rtol=1e-6)


@pytest.mark.parametrize('key', range(12))
def test_targets_sum_to_one_and_lambda_matches_pixels(key):
  images, labels = _batch()
  out, targets = _run(key)
  out, targets = np.asarray(out), np.asarray(targets)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
  assert (targets >= 0).all()
  one_hot = np.asarray(smooth_one_hot(labels, K, 0.1))
  partner = np.arange(1, B + 1)[::-1]
  own = np.arange(1, B + 1)
  # Recover lambda from example 0 (own value 1, partner value B): works for both modes.
  frac_own = (out[0] == own[0]).mean()
  if np.all((out == own[:, None, None, None]) | (out == partner[:, None, None, None])):
    lam = frac_own  # CutMix: pixels are copied, lambda = 1 - box area.
  else:
    lam = float((out[0, 0, 0, 0] - partner[0]) / (own[0] - partner[0]))  # Mixup.
    expected = lam * own + (1 - lam) * partner
    np.testing.assert_allclose(out, np.broadcast_to(expected[:, None, None, None], out.shape),
                               rtol=1e-5)
  assert 0.0 <= lam <= 1.0
  np.testing.assert_allclose(targets, lam * one_hot + (1 - lam) * one_hot[::-1], atol=1e-5)


def test_cutmix_box_comes_from_reversed_batch():
  images, labels = _batch()
  seen = 0
  for key in range(20):
    out, targets = _run(key, mixup_alpha=0.0, cutmix_alpha=1.0)
    out = np.asarray(out)
    box = out[..., 0] != np.asarray(images)[..., 0]
    # Same box for every example, filled from example B-1-i.
    assert (box == box[0]).all()
    for i in range(B):
      np.testing.assert_array_equal(out[i][box[i]], B - i)
    if box[0].any():
      rows, cols = np.nonzero(box[0])
      assert box[0].sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # One rectangle.
      seen += 1
    lam = 1.0 - box[0].mean()
    one_hot = np.asarray(smooth_one_hot(labels, K, 0.1))
    np.testing.assert_allclose(targets, lam * one_hot + (1 - lam) * one_hot[::-1], atol=1e-5)
  assert seen > 10


def test_cutmix_box_matches_timm_rule():
  for key in range(50):
    lam = float(jax.random.uniform(jax.random.PRNGKey(1000 + key)))
    top, bottom, left, right = [int(v) for v in cutmix_box(jax.random.PRNGKey(key), H, W,
                                                           jnp.float32(lam))]
    cut_h, cut_w = int(H * np.sqrt(1 - lam)), int(W * np.sqrt(1 - lam))
    assert 0 <= top <= bottom <= H and 0 <= left <= right <= W
    assert bottom - top <= 2 * (cut_h // 2) and right - left <= 2 * (cut_w // 2)


def test_switch_probability_and_lambda_distribution():
  images, labels = _batch()
  fn = _jitted()
  cut = 0
  lams = []
  for key in range(200):
    out, targets = fn(jax.random.PRNGKey(key), images, labels)
    out = np.asarray(out)
    if np.all(np.isin(out[0], [1.0, float(B)])):
      cut += 1
    else:
      lams.append(float((out[0, 0, 0, 0] - B) / (1 - B)))
  assert 70 < cut < 130  # switch_prob 0.5.
  # Beta(0.8, 0.8): mean 0.5, variance 1 / (4 * 2.6) ~ 0.096.
  assert abs(np.mean(lams) - 0.5) < 0.1 and 0.06 < np.var(lams) < 0.13


def test_mixup_only_and_dtype():
  images, labels = _batch()
  out, _ = mixup_cutmix(jax.random.PRNGKey(0), images.astype(jnp.bfloat16), labels,
                        num_classes=K, cutmix_alpha=0.0)
  assert out.dtype == jnp.bfloat16 and out.shape == images.shape

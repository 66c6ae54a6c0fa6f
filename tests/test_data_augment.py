"""Per-example ops of debiformer_jax.data.augment on known images (CPU, TF eager)."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from debiformer_jax import device_augment
from debiformer_jax.data import augment


def _gradient(h, w):
  yy, xx = np.mgrid[0:h, 0:w]
  return np.stack([yy * 255 // max(h - 1, 1), xx * 255 // max(w - 1, 1),
                   (yy + xx) * 255 // max(h + w - 2, 1)], -1).astype(np.uint8)


def _noise(h, w, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def _seed(i):
  return tf.constant([i, 17], tf.int64)


def _jpeg(array, **kwargs):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, 'JPEG', **kwargs)
  return buf.getvalue()


@pytest.mark.parametrize('shape,size', [((40, 40), (24, 24)), ((37, 50), (20, 31)),
                                        ((17, 13), (64, 48)), ((9, 300), (9, 40))])
def test_resize_bicubic_matches_pil_exactly(shape, size):
  for image in (_gradient(*shape), _noise(*shape)):
    mine = augment.resize_bicubic(image, size[0], size[1]).numpy()
    ref = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))
    np.testing.assert_array_equal(mine, ref)


@pytest.mark.parametrize('shape,size,window', [
    ((37, 50), (20, 31), (3, 5, 12, 20)), ((17, 13), (64, 48), (0, 7, 64, 30)),
    ((60, 45), (60, 30), (10, 2, 40, 25)), ((40, 33), (24, 33), (5, 4, 16, 20)),
    ((40, 40), (24, 24), (0, 0, 24, 24))])
def test_resize_bicubic_window_is_pil_resize_then_crop(shape, size, window):
  top, left, rows, cols = window
  for image in (_gradient(*shape), _noise(*shape)):
    mine = augment.resize_bicubic(image, size[0], size[1], window=window).numpy()
    ref = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))
    np.testing.assert_array_equal(mine, ref[top:top + rows, left:left + cols])


def test_random_resized_crop_size_and_determinism():
  image = _noise(50, 70)
  for i in range(5):
    out = augment.random_resized_crop(image, _seed(i), 24)
    assert out.shape == (24, 24, 3) and out.dtype == tf.uint8
    np.testing.assert_array_equal(out, augment.random_resized_crop(image, _seed(i), 24))


def test_random_resized_crop_full_square_is_plain_resize():
  image = _gradient(40, 40)
  out = augment.random_resized_crop(image, _seed(3), 24, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  ref = np.asarray(Image.fromarray(image).resize((24, 24), Image.BICUBIC))
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(out, augment.resize_bicubic(image, 24, 24))


def test_crop_window_bounds_and_fallback():
  for i in range(30):
    top, left, h, w = [int(v) for v in augment.sample_crop_window(_seed(i), 60, 80)]
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
    assert 0.08 * 4800 * 0.9 <= h * w <= 4800
    assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
  # A 10:1 strip can never fit a crop with ratio <= 4/3 at full area: centre fallback.
  top, left, h, w = [int(v) for v in
                     augment.sample_crop_window(_seed(0), 10, 100, scale=(1.0, 1.0))]
  assert (h, w) == (10, round(10 * 4 / 3)) and top == 0 and left == (100 - w) // 2


def test_random_resized_crop_encoded_bytes():
  image = _gradient(60, 80)
  png = io.BytesIO()
  Image.fromarray(image).save(png, 'PNG')
  from_png = augment.random_resized_crop(tf.constant(png.getvalue()), _seed(1), 32)
  np.testing.assert_array_equal(from_png, augment.random_resized_crop(image, _seed(1), 32))
  # JPEG: full decode then crop equals PIL's decode then crop; decode_and_crop is close.
  jpeg = _jpeg(image, quality=95)
  decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB'))
  slow = augment.random_resized_crop(tf.constant(jpeg), _seed(2), 32, decode_and_crop=False)
  np.testing.assert_array_equal(slow, augment.random_resized_crop(decoded, _seed(2), 32))
  fast = augment.random_resized_crop(tf.constant(jpeg), _seed(2), 32)
  assert np.abs(fast.numpy().astype(int) - slow.numpy().astype(int)).max() <= 3


def test_decode_jpeg_matches_pil():
  image = _gradient(30, 45)
  data = _jpeg(image, quality=85)
  np.testing.assert_array_equal(augment.decode_image(tf.constant(data)),
                                np.asarray(Image.open(io.BytesIO(data)).convert('RGB')))
  gray = io.BytesIO()
  Image.fromarray(image[..., 0]).save(gray, 'PNG')
  out = augment.decode_image(tf.constant(gray.getvalue())).numpy()
  assert out.shape == (30, 45, 3)
  np.testing.assert_array_equal(out[..., 2], image[..., 0])


def test_random_flip():
  image = _gradient(5, 7)
  flips = 0
  for i in range(200):
    out = augment.random_flip(image, _seed(i)).numpy()
    if np.array_equal(out, image[:, ::-1]):
      flips += 1
    else:
      np.testing.assert_array_equal(out, image)
  assert 70 < flips < 130
  np.testing.assert_array_equal(augment.random_flip(image, _seed(0), prob=1.0), image[:, ::-1])
  np.testing.assert_array_equal(augment.random_flip(image, _seed(0), prob=0.0), image)


def test_normalize_values():
  image = np.array([[[0, 0, 0], [255, 255, 255], [124, 116, 104]]], np.uint8)
  out = augment.normalize(image).numpy()
  assert out.dtype == np.float32
  mean = np.array([0.485, 0.456, 0.406])
  std = np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(out[0, 0], -mean / std, rtol=1e-6)
  np.testing.assert_allclose(out[0, 1], (1 - mean) / std, rtol=1e-6)
  np.testing.assert_allclose(out[0, 2], (np.array([124, 116, 104]) / 255 - mean) / std,
                             rtol=1e-5, atol=1e-6)


def _erased(image, seed, prob):
  """`augment.erase_box` drawn for `image` and filled by `device_augment.erase`."""
  box = augment.erase_box(seed, image.shape[0], image.shape[1], prob).numpy()
  out = device_augment.erase(jax.random.PRNGKey(int(seed[0])), jnp.asarray(image)[None],
                             jnp.asarray(box)[None])
  return box, np.asarray(out[0])


def test_random_erasing_bounds():
  image = np.full([40, 50, 3], 7.0, np.float32)
  areas = []
  for i in range(60):
    box, out = _erased(image, _seed(i), prob=1.0)
    erased = np.any(out != 7.0, axis=-1)
    if not erased.any():
      assert box.tolist() == [0, 0, 0, 0]  # No attempt fitted (rare): nothing erased.
      continue
    rows, cols = np.nonzero(erased)
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert box.tolist() == [rows.min(), cols.min(), h, w]
    assert erased.sum() == h * w  # One rectangle.
    assert h < 40 and w < 50
    # Rounded sides: area within [0.02, 1/3] of the image up to rounding.
    assert 0.02 * 2000 * 0.6 <= h * w <= 2000 / 3 * 1.25
    assert 0.3 * 0.6 <= h / w <= 3.34 / 0.6
    noise = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert abs(noise.mean()) < 0.5 and 0.6 < noise.std() < 1.4
    areas.append(h * w)
  assert len(areas) > 50
  for i in range(5):
    box, out = _erased(image, _seed(i), prob=0.0)
    assert box.tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(out, image)


def test_random_erasing_probability():
  hits = sum(bool(augment.erase_box(_seed(i), 16, 16, 0.25).numpy()[2] > 0) for i in range(200))
  assert 25 <= hits <= 75


def test_device_normalize_matches_host_normalize():
  """The steps' normalisation (uint8 batches on the device) is the host's to float32 rounding
  (XLA may divide by a constant as a multiplication by its reciprocal: 1 ulp)."""
  image = _noise(24, 20, seed=3)
  np.testing.assert_allclose(
      np.asarray(jax.jit(device_augment.normalize)(image[None]))[0],
      augment.normalize(image).numpy(), rtol=2.5e-7, atol=2.5e-7)


def test_device_erase_fills_each_image_its_own_box():
  images = jnp.zeros([3, 10, 12, 3])
  boxes = jnp.array([[1, 2, 3, 4], [0, 0, 0, 0], [5, 0, 5, 12]], jnp.int32)
  out = np.asarray(device_augment.erase(jax.random.PRNGKey(0), images, boxes))
  erased = (out != 0).any(-1)
  expected = np.zeros([3, 10, 12], bool)
  expected[0, 1:4, 2:6] = True
  expected[2, 5:10, :] = True
  np.testing.assert_array_equal(erased, expected)


def test_eval_resize_numbers():
  assert augment.eval_resize_size(224, 0.875) == 256
  assert augment.eval_resize_size(384, 1.0) == 384
  assert augment.eval_resize_size(32, 0.875) == 36


@pytest.mark.parametrize('shape', [(300, 400), (400, 300), (256, 256), (37, 29)])
def test_eval_resize_center_crop_matches_torchvision_rule(shape):
  image = _noise(*shape, seed=1)
  out = augment.resize_shorter_center_crop(image, 224, 0.875).numpy()
  assert out.shape == (224, 224, 3)
  h, w = shape
  if h <= w:
    new_h, new_w = 256, int(256 * w / h)
  else:
    new_h, new_w = int(256 * h / w), 256
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
  top, left = int(round((new_h - 224) / 2)), int(round((new_w - 224) / 2))
  np.testing.assert_array_equal(out, resized[top:top + 224, left:left + 224])


def test_eval_from_encoded_bytes():
  image = _gradient(40, 60)
  png = io.BytesIO()
  Image.fromarray(image).save(png, 'PNG')
  np.testing.assert_array_equal(
      augment.resize_shorter_center_crop(tf.constant(png.getvalue()), 32, 0.875),
      augment.resize_shorter_center_crop(image, 32, 0.875))


def test_ops_trace_in_tf_data():
  """The ops work inside Dataset.map (graph mode, unknown image size)."""
  data = tf.data.Dataset.from_tensor_slices(tf.constant(_noise(2 * 30, 20).reshape(2, 30, 20, 3)))

  def fn(image):
    seed = tf.constant([1, 2], tf.int64)
    x = augment.random_resized_crop(image, seed, 16)
    x = augment.random_flip(x, seed)
    box = augment.erase_box(seed, 16, 16, 1.0)
    return x, box, augment.resize_shorter_center_crop(image, 16)

  for crop, box, center in data.map(fn):
    assert crop.shape == (16, 16, 3) and center.shape == (16, 16, 3) and box.shape == (4,)
    assert crop.dtype == center.dtype == tf.uint8 and box.dtype == tf.int32

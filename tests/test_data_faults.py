"""Image faults: undecodable images are named, skipped, counted and limited; strict mode stops
at the first; an empty ImageFolder class folder is named in a warning."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from debiformer_jax import config as config_lib
from debiformer_jax.data import input_pipeline as ip
from tests import _train_testlib as lib

SIZE = 16


def _corrupt(root):
  """Two broken train images (garbage bytes, a truncated JPEG) and one broken val image."""
  garbage = os.path.join(root, 'train', 'cat', '0.jpg')
  truncated = os.path.join(root, 'train', 'dog', '1.jpg')
  val = os.path.join(root, 'val', 'fish', '0.jpg')
  with open(garbage, 'wb') as f:
    f.write(b'this is not a jpeg' * 20)
  with open(truncated, 'rb') as f:
    data = f.read()
  with open(truncated, 'wb') as f:
    f.write(data[:len(data) // 3])
  with open(val, 'wb') as f:
    f.write(b'\xff\xd8\xff' + b'garbage' * 30)
  return garbage, truncated, val


@pytest.fixture(scope='module')
def broken_folder(tmp_path_factory):
  root = lib.write_jpeg_folder(str(tmp_path_factory.mktemp('broken')), train_per_class=4,
                               val_per_class=2, size=64)
  return root, _corrupt(root)


def _cfg(root, **overrides):
  cfg = lib.data_config('imagefolder', folder=root, randaugment='', random_erase=0.0)
  cfg.update(overrides)
  return cfg


def _warnings(monkeypatch):
  seen = []
  monkeypatch.setattr(absl_logging, 'warning', lambda msg, *a: seen.append(msg % a))
  return seen


def test_undecodable_train_images_are_skipped_named_once_and_counted(broken_folder,
                                                                     monkeypatch):
  root, (garbage, truncated, _) = broken_folder
  seen = _warnings(monkeypatch)
  it = ip.create_train_iterator(_cfg(root, max_undecodable_fraction=0.5),
                                global_batch_size=4, image_size=SIZE, seed=0)
  batches = [next(it) for _ in range(6)]  # Two epochs of 12.
  for b in batches:
    assert set(b) == {'image', 'label', 'erase'} and b['image'].shape == (4, SIZE, SIZE, 3)
    assert (b['image'].max(axis=(1, 2, 3)) > 0).all()
  assert garbage in it.undecodable.names
  # The truncated JPEG fails whenever its crop window reaches past the data: on some epochs.
  assert it.undecodable.names <= {garbage, truncated}
  assert 2 <= it.undecodable.skipped <= 4
  skipped = [m for m in seen if 'cannot be decoded' in m]
  assert len(skipped) == len(it.undecodable.names)  # Each file named once.
  assert any(garbage in m for m in skipped)


def test_resume_stays_exact_with_skipped_images(broken_folder):
  root, _ = broken_folder
  cfg = _cfg(root, max_undecodable_fraction=0.5)
  it = ip.create_train_iterator(cfg, global_batch_size=4, image_size=SIZE, seed=3)
  full = [next(it) for _ in range(4)]
  assert it.undecodable.skipped  # The garbage file is in the first epoch of 12.
  resumed = ip.create_train_iterator(cfg, global_batch_size=4, image_size=SIZE, seed=3,
                                     start_step=2)
  for a in full[2:]:
    b = next(resumed)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_too_many_undecodable_images_stop_with_a_message(broken_folder):
  root, _ = broken_folder
  it = ip.create_train_iterator(_cfg(root, max_undecodable_fraction=0.01),
                                global_batch_size=4, image_size=SIZE, seed=0)
  with pytest.raises(ValueError, match=r'cannot be decoded.*max_undecodable_fraction=0.01'):
    for _ in range(3):
      next(it)


def test_strict_mode_fails_on_the_first_with_its_name(broken_folder):
  root, (garbage, truncated, val) = broken_folder
  it = ip.create_train_iterator(_cfg(root, max_undecodable_fraction=0.0),
                                global_batch_size=4, image_size=SIZE, seed=0)
  with pytest.raises(ValueError, match='cannot decode image') as e:
    for _ in range(3):
      next(it)
  assert garbage in str(e.value) or truncated in str(e.value)
  evals = ip.create_eval_iterator(_cfg(root, max_undecodable_fraction=0.0),
                                  global_batch_size=4, image_size=SIZE)
  with pytest.raises(ValueError, match=f'cannot decode image {val}'):
    list(evals)


def test_eval_masks_out_an_undecodable_image(broken_folder):
  root, (_, _, val) = broken_folder
  evals = ip.create_eval_iterator(_cfg(root, max_undecodable_fraction=0.5),
                                  global_batch_size=4, image_size=SIZE)
  batches = list(evals)
  assert sum(b['mask'].sum() for b in batches) == 6 - 1  # 6 val images, one broken.
  assert evals.undecodable.names == {val} and set(batches[0]) == {'image', 'label', 'mask'}


def test_tfds_records_name_the_undecodable_file(tmp_path):
  data_dir = lib.write_imagenet_metadata(str(tmp_path), 6, 2)
  cfg = lib.data_config('imagenet2012', data_dir=data_dir, max_undecodable_fraction=0.0)

  def bad_records(self, split, *args, **kwargs):
    ds = real(self, *args, split=split, **kwargs)
    names = ds.map(lambda ex: ex['file_name'])
    first = next(iter(names.take(1))).numpy().decode()
    broken.append(first)
    return ds.map(lambda ex: dict(ex, image=tf.where(ex['file_name'] == first,
                                                     tf.constant(b'broken'), ex['image'])))

  broken = []
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=data_dir):
    real = tfds.core.DatasetBuilder.as_dataset
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(tfds.core.DatasetBuilder, 'as_dataset', bad_records)
      it = ip.create_train_iterator(cfg, global_batch_size=2, image_size=SIZE, seed=0)
      with pytest.raises(ValueError, match='cannot decode image') as e:
        for _ in range(3):
          next(it)
  assert broken and broken[0] in str(e.value)


def test_empty_class_folder_is_named_in_a_warning(tmp_path, monkeypatch):
  root = lib.write_jpeg_folder(str(tmp_path / 'f'), train_per_class=1, val_per_class=1)
  empty = os.path.join(root, 'train', 'zebra')
  os.makedirs(empty)
  seen = _warnings(monkeypatch)
  info = ip.dataset_info(_cfg(root))
  assert 'zebra' in info.class_names
  assert [m for m in seen if empty in m and 'no .jpg' in m]
  assert not [m for m in seen if os.path.join(root, 'train', 'cat') + ' ' in m]


@pytest.mark.parametrize('value', [-0.1, 1.0, 2])
def test_max_undecodable_fraction_is_validated(value):
  cfg = config_lib.defaults()
  cfg.data.max_undecodable_fraction = value
  with pytest.raises(config_lib.ConfigError, match='data.max_undecodable_fraction'):
    config_lib.finalize(cfg, '/tmp/unused-workdir')

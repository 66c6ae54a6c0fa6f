"""The bundled scikit-learn digits ImageFolder."""

import collections
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from debiformer_jax.data import demo
from debiformer_jax.data import input_pipeline as ip
from tests import _train_testlib as lib


def _files(root):
  out = collections.Counter()
  for split in ('train', 'val'):
    for label in os.listdir(os.path.join(root, split)):
      out[split, label] = len(os.listdir(os.path.join(root, split, label)))
  return out


@pytest.fixture(scope='module')
def digits_root(tmp_path_factory):
  return demo.prepare_digits_imagefolder(str(tmp_path_factory.mktemp('d') / 'digits'))


def test_split_is_stratified_and_fixed():
  labels = load_digits().target
  train, val = demo.digits_split(labels)
  assert len(train) + len(val) == 1797 and not set(train) & set(val)
  for c in range(10):
    assert (labels[val] == c).sum() == round(0.2 * (labels == c).sum())
  again = demo.digits_split(labels)
  np.testing.assert_array_equal(train, again[0])


def test_prepare_writes_expected_files(digits_root):
  labels = load_digits().target
  train, val = demo.digits_split(labels)
  files = _files(digits_root)
  for c in range(10):
    assert files['train', str(c)] == (labels[train] == c).sum()
    assert files['val', str(c)] == (labels[val] == c).sum()
  assert sum(files.values()) == 1797
  image = Image.open(os.path.join(digits_root, 'train', str(labels[train[0]]),
                                  f'{train[0]:04d}.png'))
  assert image.size == (32, 32) and image.mode == 'RGB'
  pixels = np.asarray(image)
  expected = np.round(load_digits().images[train[0]] * 255 / 16).astype(np.uint8)
  np.testing.assert_array_equal(pixels[::4, ::4, 0], expected)
  # No temporary directories left next to it.
  assert os.listdir(os.path.dirname(digits_root)) == ['digits']


def test_prepare_is_idempotent(digits_root, monkeypatch):
  def fail(*args):
    raise AssertionError('rewrote a complete folder')

  monkeypatch.setattr(demo, '_write', fail)
  assert demo.prepare_digits_imagefolder(digits_root) == digits_root
  with pytest.raises(ValueError, match='prepared with'):
    demo.prepare_digits_imagefolder(digits_root, seed=1)


def test_incomplete_folder_is_never_taken_for_complete(tmp_path, monkeypatch):
  root = tmp_path / 'digits'

  def interrupted(path, *args):
    os.makedirs(os.path.join(path, 'train', '0'))
    raise KeyboardInterrupt

  monkeypatch.setattr(demo, '_write', interrupted)
  with pytest.raises(KeyboardInterrupt):
    demo.prepare_digits_imagefolder(str(root))
  assert not root.exists() and os.listdir(tmp_path) == []
  os.makedirs(root / 'junk')
  with pytest.raises(FileExistsError, match='not a complete digits folder'):
    demo.prepare_digits_imagefolder(str(root))


def test_digits_through_the_pipeline(digits_root):
  cfg = lib.data_config('imagefolder')
  cfg.folder = digits_root
  cfg.prepare = 'sklearn_digits'
  info = ip.dataset_info(cfg)
  assert info.num_classes == 10 and info.class_names == tuple(str(i) for i in range(10))
  assert (info.num_train, info.num_eval) == (1438, 359)
  batch = next(iter(ip.create_eval_iterator(cfg, global_batch_size=8, image_size=32)))
  assert batch['image'].shape == (8, 32, 32, 3) and batch['mask'].sum() == 8



def test_prepared_folder_has_normal_permissions(tmp_path, monkeypatch):
  """The folder follows the umask like any other directory (mkdtemp would give 0700)."""
  monkeypatch.setattr(demo, '_write', lambda *args: {'train': 0, 'val': 0})
  umask = os.umask(0o022)
  try:
    root = demo.prepare_digits_imagefolder(str(tmp_path / 'digits'))
  finally:
    os.umask(umask)
  assert os.stat(root).st_mode & 0o777 == 0o755

"""Train/eval input pipelines: ImageFolder of JPEGs, mocked tfds imagenet2012, sharding,
padding/masking, bit-exact resume, config validation."""

import collections
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from debiformer_jax.data import augment
from debiformer_jax.data import input_pipeline as ip
from tests import _train_testlib as lib

CLASSES = ('dog', 'ant', 'cat')  # Sorted: ant=0, cat=1, dog=2.
SIZE = 16
N_TRAIN, N_VAL = (4, 5, 3), (3, 2, 2)  # Per class (in CLASSES order); 12 train, 7 val.


def _color(label_name, example_id):
  """Solid colour: the class picks the bright channel, the example id the other two."""
  c = [12 * example_id + 10] * 3
  c[sorted(CLASSES).index(label_name)] = 250
  return c


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('imagefolder')
  example_id = 0
  for split, counts in (('train', N_TRAIN), ('val', N_VAL)):
    for name, count in zip(CLASSES, counts):
      os.makedirs(root / split / name)
      for i in range(count):
        image = np.full((20 + i, 24, 3), _color(name, example_id), np.uint8)
        Image.fromarray(image).save(root / split / name / f'{i}.JPEG', quality=100)
        example_id += 1
  return str(root)


def _folder_config(root, **overrides):
  cfg = lib.data_config('imagefolder')
  cfg.folder = root
  cfg.update(overrides)
  return cfg


def _pixels(batch_images):
  """uint8 images -> mean 0..255 colour per example, [B, 3]."""
  assert batch_images.dtype == np.uint8
  return batch_images.astype(np.float64).mean(axis=(1, 2))


def _ids(batch_images):
  """Example ids encoded in the dim channels (see _color)."""
  return np.round((_pixels(batch_images).min(-1) - 10) / 12).astype(int).tolist()


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_dataset_info_imagefolder(folder):
  info = ip.dataset_info(_folder_config(folder))
  assert (info.num_classes, info.num_train, info.num_eval) == (3, 12, 7)
  assert (info.train_split, info.eval_split) == ('train', 'val')
  assert info.class_names == ('ant', 'cat', 'dog')


def test_train_labels_and_shapes_imagefolder(folder):
  cfg = _folder_config(folder, randaugment='', random_erase=0.0)
  it = ip.create_train_iterator(cfg, global_batch_size=4, image_size=SIZE, seed=0)
  counts = collections.Counter()
  for batch in _take(it, 6):  # Two epochs of 12.
    assert batch['image'].shape == (4, SIZE, SIZE, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32
    np.testing.assert_array_equal(batch['erase'], np.zeros((4, 4), np.int32))
    colors = _pixels(batch['image'])
    np.testing.assert_array_equal(colors.argmax(-1), batch['label'])
    counts.update(batch['label'].tolist())
  # Every epoch is a permutation of the split: each example twice.
  assert counts == {0: 2 * 5, 1: 2 * 3, 2: 2 * 4}


def test_train_resume_is_bit_exact(folder):
  """Default recipe (RandAugment, erasing, flips): start_step=3 continues exactly."""
  cfg = _folder_config(folder)
  full = _take(ip.create_train_iterator(cfg, global_batch_size=4, image_size=SIZE, seed=5), 6)
  resumed = _take(ip.create_train_iterator(cfg, global_batch_size=4, image_size=SIZE, seed=5,
                                           start_step=3), 3)
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_array_equal(a['erase'], b['erase'])
  other = _take(ip.create_train_iterator(cfg, global_batch_size=4, image_size=SIZE, seed=6), 1)
  assert not np.array_equal(other[0]['image'], full[0]['image'])


def test_train_processes_read_disjoint_shards(folder):
  cfg = _folder_config(folder, randaugment='', random_erase=0.0, hflip=False)
  seen = []
  for index in range(2):
    it = ip.create_train_iterator(cfg, global_batch_size=4, image_size=SIZE, seed=0,
                                  process_index=index, process_count=2)
    batches = _take(it, 3)  # 6 examples = one epoch of each process's shard.
    assert batches[0]['image'].shape == (2, SIZE, SIZE, 3)
    seen.append(sorted(i for b in batches for i in _ids(b['image'])))
  # One epoch per process: disjoint halves of the 12 training examples.
  assert len(set(seen[0])) == len(set(seen[1])) == 6
  assert sorted(seen[0] + seen[1]) == list(range(12))


def _eval_examples(cfg, process_index=None, process_count=None, batch=4):
  it = ip.create_eval_iterator(cfg, global_batch_size=batch, image_size=SIZE,
                               process_index=process_index, process_count=process_count)
  batches = list(it)
  assert len(batches) == len(it) == it.num_batches
  examples = []
  for b in batches:
    assert b['image'].shape == (batch // (process_count or 1), SIZE, SIZE, 3)
    assert b['mask'].dtype == np.float32
    colors = _pixels(b['image'])
    for color, example_id, label, mask in zip(colors, _ids(b['image']), b['label'], b['mask']):
      if mask:
        assert np.argmax(color) == label
        examples.append((int(label), example_id))
      else:
        assert label == 0
  return batches, examples


def test_eval_pads_and_masks_imagefolder(folder):
  cfg = _folder_config(folder)
  batches, examples = _eval_examples(cfg)
  assert len(batches) == 2  # 7 examples, batch 4.
  assert sum(b['mask'].sum() for b in batches) == 7
  assert collections.Counter(label for label, _ in examples) == {0: 2, 1: 2, 2: 3}
  assert sorted(i for _, i in examples) == list(range(12, 19))  # Each example once.
  again = list(ip.create_eval_iterator(cfg, global_batch_size=4, image_size=SIZE))
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_eval_two_processes_cover_each_example_once(folder):
  cfg = _folder_config(folder)
  _, single = _eval_examples(cfg)
  per_process = [_eval_examples(cfg, index, 2) for index in range(2)]
  assert len(per_process[0][0]) == len(per_process[1][0]) == 2  # Same number of batches.
  union = per_process[0][1] + per_process[1][1]
  assert sorted(union) == sorted(single)
  assert sorted(i for _, i in union) == list(range(12, 19))


@pytest.mark.parametrize('n,count', [(7, 2), (10, 3), (2, 4), (1000, 7)])
def test_process_shard_partitions(n, count):
  covered = []
  for index in range(count):
    start, end = ip.process_shard(n, index, count)
    covered.extend(range(start, end))
    assert end - start in (n // count, -(-n // count))
  assert covered == list(range(n))
  with pytest.raises(ValueError):
    ip.process_shard(n, count, count)


@pytest.fixture(scope='module')
def mock_imagenet(tmp_path_factory):
  """imagenet2012 metadata (splits: train 10, validation 7) written offline; mock_data with
  MockPolicy.USE_FILES then serves random JPEGs for it."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name='train', shard_lengths=[10], num_bytes=0),
      tfds.core.SplitInfo(name='validation', shard_lengths=[7], num_bytes=0)]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  return data_dir


def test_mock_imagenet_train_and_eval(mock_imagenet):
  cfg = lib.data_config('imagenet2012')
  cfg.data_dir = mock_imagenet
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=mock_imagenet):
    info = ip.dataset_info(cfg)
    assert (info.num_classes, info.num_train, info.num_eval) == (1000, 10, 7)
    full = _take(ip.create_train_iterator(cfg, global_batch_size=4, image_size=SIZE,
                                          seed=1), 5)
    resumed = _take(ip.create_train_iterator(cfg, global_batch_size=4, image_size=SIZE,
                                             seed=1, start_step=2), 3)
    evals = list(ip.create_eval_iterator(cfg, global_batch_size=4, image_size=SIZE))
  for b in full:
    assert b['image'].shape == (4, SIZE, SIZE, 3) and b['image'].dtype == np.uint8
    assert b['label'].dtype == np.int32 and ((0 <= b['label']) & (b['label'] < 1000)).all()
  for a, b in zip(full[2:], resumed):  # Crosses the epoch boundary at example 10.
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert len(evals) == 2 and sum(b['mask'].sum() for b in evals) == 7
  assert evals[-1]['mask'].tolist() == [1, 1, 1, 0]
  # Both epochs hold the same examples, reshuffled.
  epoch1 = np.concatenate([b['label'] for b in full])[:10]
  epoch2 = np.concatenate([b['label'] for b in full])[10:20]
  assert sorted(epoch1) == sorted(epoch2) and not np.array_equal(epoch1, epoch2)
  cfg.eval_split = 'val'
  with pytest.raises(ValueError, match=r"data.eval_split='val'.*'train', 'validation'"):
    ip.dataset_info(cfg)


def test_imagenet_missing_says_how_to_prepare(tmp_path):
  cfg = lib.data_config()
  cfg.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    ip.dataset_info(cfg)
  msg = str(e.value)
  assert 'ILSVRC2012_img_train.tar' in msg and 'ILSVRC2012_img_val.tar' in msg
  assert '--config.data.download=True' in msg and '--config.data.manual_dir' in msg
  cfg.download = True
  cfg.manual_dir = str(tmp_path / 'manual')
  with pytest.raises(FileNotFoundError, match='lacks'):
    ip.dataset_info(cfg)


def test_missing_folder_and_split(folder, tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    ip.dataset_info(_folder_config(str(tmp_path / 'nope')))
  with pytest.raises(ValueError, match=r"data.eval_split='validation'.*\['train', 'val'\]"):
    ip.dataset_info(_folder_config(folder, eval_split='validation'))


def test_cache_does_not_change_the_stream(folder):
  kwargs = dict(global_batch_size=4, image_size=SIZE, seed=2)
  plain = _folder_config(folder, randaugment='')
  cached = _folder_config(folder, randaugment='', cache=True)
  for a, b in zip(_take(ip.create_train_iterator(plain, **kwargs), 4),
                  _take(ip.create_train_iterator(cached, **kwargs), 4)):
    np.testing.assert_array_equal(a['image'], b['image'])
  for a, b in zip(ip.create_eval_iterator(plain, global_batch_size=4, image_size=SIZE),
                  ip.create_eval_iterator(cached, global_batch_size=4, image_size=SIZE)):
    np.testing.assert_array_equal(a['image'], b['image'])

"""Datasets and the train/eval input pipelines.

tf.data runs on the host and yields numpy batches; the training loop turns them into
global jax.Arrays. Batches are dicts of
  'image': uint8 [local_batch, H, W, 3], RGB (the steps normalise it: device_augment.py),
  'label': int32 [local_batch],
for training 'erase': int32 [local_batch, 4], the random-erasing box of each image (top,
left, rows, cols; zeros for none), filled on the device, and for eval 'mask': float32
[local_batch] (1 real example, 0 padding).
local_batch = global_batch_size // process_count; every process reads its own contiguous
shard of each split.

Sources: 'imagenet2012' through tfds (prepared TFRecords), and 'imagefolder'
(root/<split>/<class>/*.{jpg,jpeg,png}) through tfds.folder_dataset.ImageFolder, which
sorts class names as torchvision does (over the union of the splits' class folders).

Determinism: the train stream is a pure function of (seed, process index, stream
position). Augmentation seeds are folded from the position, so `start_step=n` skips
n * local_batch positions before any decoding and continues bit-for-bit. ImageFolder
shards are reshuffled every epoch with a stateless full permutation (no shuffle buffer);
tfds record shards are read in file order and shuffled with a `shuffle_buffer` seeded per
epoch, so resuming there re-reads (without decoding) at most one epoch of records.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, List, Optional, Tuple

import jax
from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from debiformer_jax.data import augment
from debiformer_jax.data import class_names as class_names_lib
from debiformer_jax.data import randaugment


_FOREVER = 2 ** 62

_IMAGENET_HELP = (
    'To prepare it once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
    '(from image-net.org) in a directory DIR and run with '
    '--config.data.download=True --config.data.manual_dir=DIR '
    '(and --config.data.data_dir=... to choose where the prepared TFRecords go, '
    'about 150 GB).')


# ---------------------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train: int
  num_eval: int
  train_split: str
  eval_split: str
  class_names: Tuple[str, ...] = ()


def process_shard(num_examples: int, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Tuple[int, int]:
  """[start, end) of this process's contiguous share of `num_examples` (sizes differ by
  at most one)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} is not in [0, {count}).')
  return num_examples * index // count, num_examples * (index + 1) // count


class _Source:
  """One dataset: split sizes, class names, and the encoded examples of a process shard."""

  def __init__(self, cfg):
    self.cfg = cfg
    if cfg.prepare == 'sklearn_digits':
      from debiformer_jax.data import demo  # pylint: disable=g-import-not-at-top
      demo.prepare_digits_imagefolder(cfg.folder)
    if cfg.name == 'imagefolder':
      self.builder = _imagefolder_builder(cfg.folder)
    else:
      self.builder = _tfds_builder(cfg)
    self.is_folder = cfg.name == 'imagefolder'

  @property
  def class_names(self) -> Tuple[str, ...]:
    return tuple(self.builder.info.features['label'].names)

  def _check(self, split: str, field: str) -> None:
    known = list(self.builder.info.splits.keys())
    where = (f'the ImageFolder {self.builder.data_dir}' if self.is_folder
             else f'{self.cfg.name} in {self.builder.data_dir}')
    if self.is_folder and split not in known:
      raise ValueError(f'data.{field}={split!r}: {where} has no such split (sub-folder); '
                       f'found {known}.')
    try:
      self.builder.info.splits[split]
    except (KeyError, ValueError, AssertionError) as e:
      raise ValueError(f'data.{field}={split!r}: not a split of {where}; found {known} '
                       f'({e}).') from None

  def num_examples(self, split: str, field: str) -> int:
    self._check(split, field)
    return int(self.builder.info.splits[split].num_examples)

  def shard_sizes(self, split: str, field: str, process_count: int) -> List[int]:
    n = self.num_examples(split, field)
    if self.is_folder:
      return [e - s for s, e in (process_shard(n, i, process_count)
                                 for i in range(process_count))]
    return [int(self.builder.info.splits[sub].num_examples)
            for sub in tfds.even_splits(split, n=process_count)]

  def folder_examples(self, split: str, process_index: int, process_count: int):
    """(paths, labels) numpy arrays of the shard, in the builder's fixed order."""
    examples = getattr(self.builder, '_split_examples', None)
    if examples is None:
      raise RuntimeError('tfds ImageFolder no longer exposes its file list '
                         '(_split_examples); this tfds version is not supported.')
    examples = examples[split]
    start, end = process_shard(len(examples), process_index, process_count)
    label_feature = self.builder.info.features['label']
    paths = np.array([ex.image_path for ex in examples[start:end]], dtype=object)
    labels = np.array([label_feature.str2int(ex.label) for ex in examples[start:end]],
                      dtype=np.int64)
    return paths, labels

  def record_dataset(self, split: str, field: str, process_index: int, process_count: int,
                     count: int) -> tf.data.Dataset:
    """tfds records of the shard as (encoded image, label, name), in file order; the name is
    the record's `file_name` (imagenet2012 has one), else '<split> record <index>'. `field`
    is the config field that named the split (for messages)."""
    subsplit = tfds.even_splits(split, n=process_count)[process_index]
    ds = self.builder.as_dataset(split=subsplit, shuffle_files=False,
                                 decoders={'image': tfds.decode.SkipDecoding()})
    first = sum(self.shard_sizes(split, field, process_count)[:process_index])
    has_name = 'file_name' in self.builder.info.features

    def fields(ex, i):
      name = ex['file_name'] if has_name else tf.strings.format(
          '{} record {}', (split, i + first))
      return ex['image'], ex['label'], name

    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.range(_FOREVER)))
    return ds.map(_plain(fields)).take(count)


def _imagefolder_builder(root: str):
  root = os.path.expanduser(root)
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(
        f'data.folder={root!r} does not exist. Expected an ImageFolder: '
        f'{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg '
        f"(or data.prepare='sklearn_digits' to write the demo digits there).")
  builder = tfds.folder_dataset.ImageFolder(root)
  if not builder.info.splits:
    raise FileNotFoundError(f'data.folder={root!r} has no split sub-folders; expected '
                            f'{root}/<split>/<class>/<image>.')
  _warn_empty_classes(root, builder)
  return builder


def _warn_empty_classes(root: str, builder) -> None:
  """Warns about each class folder of a split that holds no image (it still gets a label)."""
  for split in builder.info.splits.keys():
    present = {ex.label for ex in getattr(builder, '_split_examples', {}).get(split, [])}
    split_dir = os.path.join(root, split)
    for name in sorted(tf.io.gfile.listdir(split_dir)):
      name = name.rstrip('/')
      if tf.io.gfile.isdir(os.path.join(split_dir, name)) and name not in present:
        logging.warning('ImageFolder class folder %s holds no .jpg/.jpeg/.png image; its '
                        'class still takes a label. Add images or remove the folder.',
                        os.path.join(split_dir, name))


def _tfds_builder(cfg):
  builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
  if builder.is_prepared():
    return builder
  if not cfg.download:
    raise FileNotFoundError(
        f'{cfg.name} is not prepared in {builder.data_dir}. {_IMAGENET_HELP}')
  if not cfg.manual_dir:
    raise ValueError(f'data.download=True needs data.manual_dir. {_IMAGENET_HELP}')
  manual_dir = os.path.expanduser(cfg.manual_dir)
  missing = [f for f in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
             if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
  if cfg.name == 'imagenet2012' and missing:
    raise FileNotFoundError(f'data.manual_dir={manual_dir!r} lacks {missing}. '
                            f'{_IMAGENET_HELP}')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def dataset_info(config) -> DatasetInfo:
  """Sizes, class count and class names (human-readable for imagenet2012) of the configured
  dataset (prepares the demo folder first)."""
  source = _Source(config)
  return DatasetInfo(
      num_classes=len(source.class_names),
      num_train=source.num_examples(config.train_split, 'train_split'),
      num_eval=source.num_examples(config.eval_split, 'eval_split'),
      train_split=config.train_split, eval_split=config.eval_split,
      class_names=class_names_lib.for_dataset(config.name, source.class_names))


# ---------------------------------------------------------------------------------------
# Pipelines.


def _process(process_index, process_count) -> Tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} is not in [0, {count}).')
  return index, count


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} must be a positive multiple '
                     f'of the process count {process_count}.')
  return global_batch_size // process_count


def _plain(fn):
  """Map functions here have no Python control flow on tensors: skip AutoGraph (slow)."""
  return tf.autograph.experimental.do_not_convert(fn)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  options.threading.max_intra_op_parallelism = 1
  return options


def _parallelism(cfg):
  return tf.data.AUTOTUNE if cfg.num_parallel_calls == -1 else cfg.num_parallel_calls


def _read_all(paths: np.ndarray) -> tf.Tensor:
  """The files' bytes as a string tensor (for data.cache on ImageFolder)."""
  out = []
  for p in paths:
    with tf.io.gfile.GFile(p, 'rb') as f:
      out.append(f.read())
  return tf.constant(out, tf.string, shape=[len(out)])


def _seed_int(key: tf.Tensor) -> tf.Tensor:
  """A non-negative int64 seed for ops (shuffle) that take one integer."""
  return tf.random.stateless_uniform([], seed=key, minval=0, maxval=2 ** 31 - 1,
                                     dtype=tf.int64)


def _skipping_undecodable(ds: tf.data.Dataset, preprocess, placeholder: dict,
                          parallelism) -> tf.data.Dataset:
  """Maps `preprocess(*element[:-1])` over elements whose last field is the image's name.

  An element whose preprocessing fails (an image that does not decode) becomes `placeholder`
  instead, so positions in the stream never shift. Every output gets 'ok' (bool) and 'name'.
  """

  def one(*element):
    name = element[-1]
    done = tf.data.Dataset.from_tensors(element[:-1]).map(
        _plain(lambda *e: dict(preprocess(*e), ok=True, name=name))).ignore_errors()
    failed = tf.data.Dataset.from_tensors(dict(placeholder, ok=False, name=name))
    return done.concatenate(failed).take(1)

  return ds.interleave(_plain(one), cycle_length=_cycle_length(parallelism), block_length=1,
                       num_parallel_calls=parallelism, deterministic=True)


def _cycle_length(parallelism) -> int:
  return (os.cpu_count() or 1) if parallelism == tf.data.AUTOTUNE else parallelism


class UndecodableImages:
  """Names, counts and limits the images of a split that could not be decoded (host side).

  Each file is logged once. More than `max_fraction` of the split's `num_examples` distinct
  undecodable files (with max_fraction 0: the first one) stops the run with a ValueError.
  """

  def __init__(self, split: str, num_examples: int, max_fraction: float):
    self.split = split
    self.num_examples = num_examples
    self.max_fraction = max_fraction
    self.names = set()
    self.skipped = 0  # Examples skipped so far (a file counts again in every epoch).

  def check(self, batch: dict) -> np.ndarray:
    """Pops 'ok' and 'name' from a numpy batch; returns 'ok' (bool [B])."""
    ok, names = batch.pop('ok'), batch.pop('name')
    for name in names[~ok]:
      self.skipped += 1
      name = name.decode('utf-8', 'replace')
      if name in self.names:
        continue
      self.names.add(name)
      if self.max_fraction == 0:
        raise ValueError(f'cannot decode image {name} (split {self.split!r}); remove or '
                         f'replace it, or set data.max_undecodable_fraction > 0 to skip '
                         f'such images.')
      logging.warning('Skipping image %s of split %r: it cannot be decoded.', name,
                      self.split)
      if len(self.names) > self.max_fraction * self.num_examples:
        raise ValueError(
            f'{len(self.names)} images of split {self.split!r} cannot be decoded (the last: '
            f'{name}), more than data.max_undecodable_fraction={self.max_fraction} of its '
            f'{self.num_examples}; check the dataset, or raise the fraction.')
    return ok


class TrainIterator:
  """The train batches; `undecodable` names and counts the images skipped so far.

  A skipped image's place in its batch holds a copy of the batch's first decodable example,
  so batches keep their size and `start_step` stays exact.
  """

  def __init__(self, batches: Iterator[dict], undecodable: UndecodableImages):
    self.batches = batches
    self.undecodable = undecodable

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> dict:
    batch = next(self.batches)
    ok = self.undecodable.check(batch)
    if not ok.all():
      if not ok.any():
        raise ValueError(f'no image of a batch of split {self.undecodable.split!r} can be '
                         f'decoded; check the dataset.')
      keep = np.where(ok, np.arange(len(ok)), np.argmax(ok))
      batch = {k: v[keep] for k, v in batch.items()}
    return batch


def create_train_iterator(data_config, *, global_batch_size: int, image_size: int,
                          seed: int, start_step: int = 0,
                          process_index: Optional[int] = None,
                          process_count: Optional[int] = None) -> TrainIterator:
  """Infinite iterator of augmented train batches for this process (see module doc).

  `start_step=n` yields exactly the batches an uninterrupted iterator yields from its
  (n+1)-th on. `process_index` / `process_count` default to JAX's.
  """
  cfg = data_config
  index, count = _process(process_index, process_count)
  local_batch = _local_batch(global_batch_size, count)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  source = _Source(cfg)
  n = source.shard_sizes(cfg.train_split, 'train_split', count)[index]
  if n == 0:
    raise ValueError(f'process {index} of {count} has no examples of split '
                     f'{cfg.train_split!r}.')
  ra_params = randaugment.parse_randaugment(cfg.randaugment) if cfg.randaugment else None
  scale = tuple(float(v) for v in cfg.rrc_scale)

  base_key = tf.constant([seed, index], tf.int64)
  order_key = tf.random.experimental.stateless_fold_in(base_key, 1)
  augment_key = tf.random.experimental.stateless_fold_in(base_key, 2)
  start = start_step * local_batch

  def preprocess(data, label, position):
    key = tf.random.experimental.stateless_fold_in(augment_key, position)
    s_crop, s_flip, s_ra, s_erase = tf.unstack(augment.split_seed(key, 4))
    image = augment.random_resized_crop(data, s_crop, image_size, scale=scale)
    if cfg.hflip:
      image = augment.random_flip(image, s_flip)
    if ra_params is not None:
      image = randaugment.rand_augment(image, s_ra, ra_params)
    box = augment.erase_box(s_erase, image_size, image_size, cfg.random_erase)
    return {'image': image, 'label': tf.cast(label, tf.int32), 'erase': box}

  if source.is_folder:
    paths, labels = source.folder_examples(cfg.train_split, index, count)
    names = tf.constant(paths.astype(str), tf.string)
    contents = _read_all(paths) if cfg.cache else names
    labels = tf.constant(labels)

    def fetch(position):
      epoch_key = tf.random.experimental.stateless_fold_in(order_key, position // n)
      j = tf.random.experimental.index_shuffle(position % n, epoch_key,
                                               tf.constant(n - 1, tf.int64))
      data = tf.gather(contents, j)
      if not cfg.cache:
        data = tf.io.read_file(data)
      return data, tf.gather(labels, j), position, tf.gather(names, j)

    ds = tf.data.Dataset.range(start, _FOREVER).map(
        _plain(fetch), num_parallel_calls=_parallelism(cfg))
  else:
    records = source.record_dataset(cfg.train_split, 'train_split', index, count, n)
    if cfg.cache:
      records = records.cache()
    buffer = min(int(cfg.shuffle_buffer), n)

    def epoch(e):
      if buffer <= 1:
        return records
      key = tf.random.experimental.stateless_fold_in(order_key, e)
      return records.shuffle(buffer, seed=_seed_int(key), reshuffle_each_iteration=False)

    first_epoch, offset = divmod(start, n)
    ds = tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(epoch).skip(offset)
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.range(start, _FOREVER))).map(
        _plain(lambda record, position: (record[0], record[1], position, record[2])))

  placeholder = {'image': tf.zeros([image_size, image_size, 3], tf.uint8),
                 'label': tf.constant(0, tf.int32), 'erase': tf.zeros([4], tf.int32)}
  ds = _skipping_undecodable(ds, preprocess, placeholder, _parallelism(cfg))
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  undecodable = UndecodableImages(cfg.train_split, n, cfg.max_undecodable_fraction)
  return TrainIterator(ds.with_options(_options()).as_numpy_iterator(), undecodable)


class EvalIterable:
  """Re-iterable eval batches: each `iter()` starts a fresh pass over the split.

  Every process yields `num_batches` batches; padding examples have mask 0 and label 0.
  """

  def __init__(self, dataset: tf.data.Dataset, num_batches: int, num_examples: int,
               local_examples: int, undecodable: UndecodableImages):
    self.dataset = dataset
    self.num_batches = num_batches
    self.num_examples = num_examples  # In the whole split, over all processes.
    self.local_examples = local_examples  # Real examples of this process.
    self.undecodable = undecodable  # An image that cannot be decoded gets mask 0.

  def __iter__(self) -> Iterator[dict]:
    for batch in self.dataset.as_numpy_iterator():
      batch['mask'] = batch['mask'] * self.undecodable.check(batch)
      yield batch

  def __len__(self) -> int:
    return self.num_batches


def create_eval_iterator(data_config, *, global_batch_size: int, image_size: int,
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> EvalIterable:
  """Eval batches (resize shorter side to size / eval_crop_pct, centre crop), padded and
  masked so that every example of the split counts exactly once over all processes."""
  cfg = data_config
  index, count = _process(process_index, process_count)
  local_batch = _local_batch(global_batch_size, count)
  source = _Source(cfg)
  sizes = source.shard_sizes(cfg.eval_split, 'eval_split', count)
  n = sizes[index]
  num_batches = -(-max(sizes) // local_batch)

  def preprocess(data, label):
    return {'image': augment.resize_shorter_center_crop(data, image_size, cfg.eval_crop_pct),
            'label': tf.cast(label, tf.int32),
            'mask': tf.constant(1.0, tf.float32)}

  placeholder = {'image': tf.zeros([image_size, image_size, 3], tf.uint8),
                 'label': tf.constant(0, tf.int32), 'mask': tf.constant(0.0, tf.float32)}
  padding = tf.data.Dataset.from_tensors(dict(placeholder, ok=True, name='')).repeat(
      num_batches * local_batch - n)
  if n == 0:
    ds = padding
  else:
    if source.is_folder:
      paths, labels = source.folder_examples(cfg.eval_split, index, count)
      names = paths.astype(str)
      if cfg.cache:
        records = tf.data.Dataset.from_tensor_slices((_read_all(paths), labels, names))
      else:
        records = tf.data.Dataset.from_tensor_slices((names, labels, names)).map(
            _plain(lambda path, label, name: (tf.io.read_file(path), label, name)))
    else:
      records = source.record_dataset(cfg.eval_split, 'eval_split', index, count, n)
      if cfg.cache:
        records = records.cache()
    ds = _skipping_undecodable(records, preprocess, placeholder, _parallelism(cfg))
    ds = ds.concatenate(padding)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  undecodable = UndecodableImages(cfg.eval_split, max(n, 1), cfg.max_undecodable_fraction)
  return EvalIterable(ds.with_options(_options()), num_batches,
                      source.num_examples(cfg.eval_split, 'eval_split'), n, undecodable)

"""ImageNet-like synthetic JPEGs for the input-pipeline benchmark, as an ImageFolder and as a
tfds dataset (TFRecords) holding the same bytes.

The images imitate what makes ImageNet expensive to decode, not what it shows: sizes around
500x375 (landscape and portrait, a spread of other sizes), baseline JPEG at quality 90 with
4:2:0 chroma, and content with detail at every scale (octaves of smooth noise plus pixel
noise), so files are about as large as ImageNet's (here ~90 KB on average, ImageNet's
train JPEGs ~110 KB). The content is a pure function of the seed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

QUALITY = 90
_VERSION = '1.0.0'
# (height, width) and weight: ImageNet's most common shapes, then a spread around them.
_COMMON_SIZES = (((375, 500), 0.45), ((500, 375), 0.15), ((333, 500), 0.1))
_SPREAD = 0.3  # The rest: longer side 300..800, aspect 0.6..1.0, either orientation.


@dataclasses.dataclass(frozen=True)
class Example:
  """One encoded image of a split: JPEG bytes, its class index and a file stem."""
  data: bytes
  label: int
  stem: str


def class_names(num_classes: int) -> Tuple[str, ...]:
  """Folder names that sort in label order: 'class000', 'class001', ..."""
  return tuple(f'class{i:03d}' for i in range(num_classes))


def sample_size(rng: np.random.Generator) -> Tuple[int, int]:
  """(height, width) of one image, ImageNet-like."""
  u = rng.uniform()
  for size, weight in _COMMON_SIZES:
    if u < weight:
      return size
    u -= weight
  long_side = int(rng.integers(300, 801))
  short_side = int(round(long_side * rng.uniform(0.6, 1.0)))
  return (short_side, long_side) if rng.uniform() < 0.75 else (long_side, short_side)


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """uint8 [height, width, 3]: octaves of bilinearly upsampled colour noise (cells of 128
  down to 4 pixels, amplitude falling with the cell size) plus per-pixel noise."""
  image = np.zeros((height, width, 3), np.float32)
  for cell, amplitude in ((128, 70.0), (32, 40.0), (8, 26.0), (3, 24.0)):
    grid = rng.normal(0.0, amplitude, (height // cell + 2, width // cell + 2, 3))
    image += tf.image.resize(grid[None].astype(np.float32), (height, width),
                             method='bilinear')[0].numpy()
  image += rng.normal(0.0, 9.0, image.shape).astype(np.float32)
  image += rng.uniform(60.0, 190.0, 3).astype(np.float32)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray) -> bytes:
  """Baseline JPEG at QUALITY with 4:2:0 chroma subsampling (libjpeg's default)."""
  return tf.io.encode_jpeg(image, quality=QUALITY, chroma_downsampling=True).numpy()


def make_split(num_images: int, num_classes: int, seed: int) -> List[Example]:
  """`num_images` encoded images, labels round-robin over the classes."""
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(num_images):
    image = synthetic_image(rng, *sample_size(rng))
    examples.append(Example(encode_jpeg(image), i % num_classes, f'{i:06d}'))
  return examples


def make_dataset(splits: Dict[str, int], num_classes: int,
                 seed: int = 0) -> Dict[str, List[Example]]:
  """{split: examples} with `splits[split]` images each (independent seeds per split)."""
  if num_classes < 1 or any(n < 1 for n in splits.values()):
    raise ValueError(f'need at least one class and one image per split, got '
                     f'{num_classes} classes and {splits}.')
  return {split: make_split(n, num_classes, seed * 1000 + i)
          for i, (split, n) in enumerate(sorted(splits.items()))}


def write_imagefolder(root: str, dataset: Dict[str, List[Example]], num_classes: int) -> str:
  """Writes root/<split>/<class>/<stem>.jpg (every class folder exists); returns root."""
  names = class_names(num_classes)
  for split, examples in dataset.items():
    for name in names:
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
    for ex in examples:
      with open(os.path.join(root, split, names[ex.label], ex.stem + '.jpg'), 'wb') as f:
        f.write(ex.data)
  return root


def write_tfds(data_dir: str, name: str, dataset: Dict[str, List[Example]],
               num_classes: int) -> str:
  """Writes a tfds dataset `name` into `data_dir` (features: 'image' JPEG, 'label',
  'file_name', as imagenet2012), readable with `tfds.builder(name, data_dir=data_dir)`.
  Returns the dataset's directory."""
  names = class_names(num_classes)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
      'label': tfds.features.ClassLabel(names=names),
      'file_name': tfds.features.Text(),
  })

  version_dir = os.path.join(data_dir, name, _VERSION)
  os.makedirs(version_dir, exist_ok=True)
  split_infos = []
  for split, examples in dataset.items():
    path = os.path.join(version_dir, f'{name}-{split}.tfrecord-00000-of-00001')
    with tf.io.TFRecordWriter(path) as writer:
      for ex in examples:
        writer.write(features.serialize_example({
            'image': ex.data, 'label': ex.label,
            'file_name': f'{split}/{names[ex.label]}/{ex.stem}.jpg'}))
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)],
                                           num_bytes=os.path.getsize(path)))
  tfds.folder_dataset.write_metadata(data_dir=version_dir, features=features,
                                     split_infos=split_infos, version=_VERSION,
                                     check_data=False)
  return version_dir

"""The bundled default dataset: scikit-learn's handwritten digits as an ImageFolder.

`prepare_digits_imagefolder(root)` writes the 1797 8x8 digits (0..16 grey levels) as
32x32 RGB PNGs (nearest-neighbour upscaling, values scaled to 0..255) into
`root/train/<digit>/NNNN.png` and `root/val/<digit>/NNNN.png`, with a stratified 80/20
split fixed by a seed. The folder is then read through the same ImageFolder path as user
data. No download is involved: scikit-learn ships the digits.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import numpy as np

MARKER = '.sklearn_digits.json'
_FORMAT_VERSION = 1


def digits_split(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0):
  """Stratified split: per class, a seeded permutation; the first round(frac * n) go to
  val. Returns (train_indices, val_indices), each sorted."""
  rng = np.random.default_rng(seed)
  train, val = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_val = int(round(val_fraction * len(idx)))
    val.extend(idx[:n_val])
    train.extend(idx[n_val:])
  return np.sort(np.array(train)), np.sort(np.array(val))


def _spec(size, val_fraction, seed, counts):
  return {'format': _FORMAT_VERSION, 'size': size, 'val_fraction': val_fraction,
          'seed': seed, 'counts': counts}


def _read_marker(root):
  try:
    with open(os.path.join(root, MARKER)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write(root, size, val_fraction, seed):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = np.asarray(digits.images)  # [N, 8, 8], 0..16
  labels = np.asarray(digits.target)
  scale = size // 8
  pixels = np.round(images * (255.0 / 16.0)).astype(np.uint8)
  pixels = np.kron(pixels, np.ones((1, scale, scale), np.uint8))
  train, val = digits_split(labels, val_fraction, seed)
  counts = {}
  for split, indices in (('train', train), ('val', val)):
    for i in indices:
      folder = os.path.join(root, split, str(labels[i]))
      os.makedirs(folder, exist_ok=True)
      rgb = np.repeat(pixels[i][:, :, None], 3, axis=2)
      Image.fromarray(rgb).save(os.path.join(folder, f'{i:04d}.png'))
    counts[split] = int(len(indices))
  return counts


def prepare_digits_imagefolder(root: str, *, size: int = 32, val_fraction: float = 0.2,
                               seed: int = 0) -> str:
  """Writes the digits ImageFolder into `root` (once) and returns `root`.

  Idempotent: a complete folder (marked by MARKER, written last) is left alone. The files
  are written into a temporary sibling directory that is renamed to `root` at the end, so
  an interrupted run never leaves something that looks complete. `root` may be missing or
  an empty directory; anything else there is an error.
  """
  if size % 8 or size <= 0:
    raise ValueError(f'size must be a positive multiple of 8, got {size}.')
  root = os.path.abspath(os.path.expanduser(root))
  marker = _read_marker(root)
  if marker is not None:
    expected = _spec(size, val_fraction, seed, marker.get('counts'))
    if marker != expected:
      raise ValueError(f'{root} holds digits prepared with {marker}, not {expected}; '
                       f'use another folder or delete it.')
    return root
  if os.path.isdir(root) and os.listdir(root):
    raise FileExistsError(f'{root} exists and is not a complete digits folder (no {MARKER}); '
                          f'delete it or choose another data.folder.')
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  # os.mkdir honours the umask (mkdtemp would make the folder readable by its owner only).
  tmp = os.path.join(parent, f'{os.path.basename(root)}.tmp-{uuid.uuid4().hex}')
  os.mkdir(tmp)
  try:
    counts = _write(tmp, size, val_fraction, seed)
    with open(os.path.join(tmp, MARKER), 'w') as f:
      json.dump(_spec(size, val_fraction, seed, counts), f)
    try:
      os.rename(tmp, root)  # Atomic; replaces `root` only if it is an empty directory.
    except OSError:
      if _read_marker(root) is None:  # Not another process finishing first.
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root

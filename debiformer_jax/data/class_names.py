"""Class names travel with the weights: index = label.

A training workdir holds `class_names.json` (a JSON list of strings) next to `config.json`;
converted weights keep theirs in `debiformer.json`. ImageNet-1k's human-readable names come
from the label list that tensorflow-datasets ships (no download), in label order (the sorted
WordNet ids of `imagenet2012`).
"""

from __future__ import annotations

import json
import os
from typing import Sequence, Tuple

FILE = 'class_names.json'
IMAGENET_NUM_CLASSES = 1000


def imagenet() -> Tuple[str, ...]:
  """ImageNet-1k's 1000 human-readable names ('tench, Tinca tinca', ...), label order."""
  from tensorflow_datasets.datasets.siscore import labels  # pylint: disable=g-import-not-at-top
  names = tuple(labels.IMAGENET_LABELS_LIST)
  if len(names) != IMAGENET_NUM_CLASSES:
    raise RuntimeError(f'tensorflow_datasets ships {len(names)} ImageNet names, not '
                       f'{IMAGENET_NUM_CLASSES}; this tensorflow_datasets version is not '
                       f'supported.')
  return names


def for_dataset(name: str, names: Sequence[str]) -> Tuple[str, ...]:
  """The names to store for dataset `name` whose label feature has `names` (imagenet2012's
  are WordNet ids: replaced by the human-readable ones)."""
  if name == 'imagenet2012' and len(names) == IMAGENET_NUM_CLASSES:
    return imagenet()
  return tuple(names)


def write(directory: str, names: Sequence[str]) -> str:
  """Writes `names` to `directory`/class_names.json; returns the path."""
  path = os.path.join(directory, FILE)
  with open(path, 'w') as f:
    json.dump(list(names), f, indent=1)
  return path


def read(directory: str) -> Tuple[str, ...] | None:
  """The names in `directory`/class_names.json, or None when there is no such file."""
  path = os.path.join(directory, FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    names = json.load(f)
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise ValueError(f'{path} must hold a JSON list of strings (class names, index = label).')
  return tuple(names)

r"""Classify image files with a trained DeBiFormer.

  python -m debiformer_jax.predict --weights /tmp/debiformer_demo photo.jpg more_photos/ \
      [--topk 5] [--format table|json|csv] [--batch 32] [--step S] [--model NAME]

--weights is a training workdir (its best checkpoint by eval top-1, else the latest; --step
chooses), converted weights (convert_torch_weights.py) or an exported artifact; the model, its
preprocessing (the eval pipeline's resize and centre crop) and the class names come with it.
Folders are walked (sorted) for image files by extension; files named on the command line are
read whatever their name. A file that cannot be read gets one line `error: FILE: why` on stderr
and the others are still classified. Exit status: 0 all classified, 1 some file failed, 2 the
weights or the command line are wrong.

Formats: `table` (per file, one line per class: probability, class id, name), `csv` (header
file,rank,class_id,class_name,probability) and `json` ({"weights", "model", "results": [{"file",
"predictions": [{"rank", "class_id", "class_name", "probability"}]}]}).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Iterator, Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from debiformer_jax import classifier  # noqa: E402

IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.tif', '.tiff', '.webp')


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m debiformer_jax.predict',
                              description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('inputs', nargs='+', metavar='IMAGE_OR_FOLDER',
                 help='image files, or folders to walk for them')
  p.add_argument('--weights', required=True, metavar='DIR',
                 help='a training workdir, converted weights or an exported artifact')
  p.add_argument('--topk', type=_positive, default=5, help='classes per image (default 5)')
  p.add_argument('--format', choices=('table', 'json', 'csv'), default='table')
  p.add_argument('--batch', type=_positive, default=32,
                 help='images per forward pass (default 32); the last batch is padded')
  p.add_argument('--step', type=int, help='checkpoint step of a training workdir')
  p.add_argument('--model', help='model name, replacing the one the weights name')
  return p


def _positive(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not a positive integer')
  return value


def image_files(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
  """(files to classify, one message per input that yields none). Folders are walked in
  sorted order for IMAGE_EXTENSIONS (any case); files are taken as given."""
  files, problems = [], []
  for path in inputs:
    if os.path.isdir(path):
      found = []
      for root, dirs, names in os.walk(path):
        dirs.sort()
        found += [os.path.join(root, n) for n in sorted(names)
                  if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith('.')]
      if not found:
        problems.append(f'{path}: a folder without image files '
                        f'({", ".join(IMAGE_EXTENSIONS)})')
      files += found
    elif os.path.exists(path):
      files.append(path)
    else:
      problems.append(f'{path}: no such file or folder')
  return files, problems


def classify(clf: classifier.Classifier, files: Sequence[str], *,
             batch: int) -> Iterator[tuple[str, np.ndarray | str]]:
  """(file, its class probabilities (classes,) float64, or why it failed), in file order.

  Images are read and batched; every batch is padded to min(batch, len(files)) so the
  forward is compiled once.
  """
  width = max(1, min(batch, len(files)))
  pending = []  # (file, uint8 image) of the batch being filled.

  def run():
    x = classifier.preprocess([image for _, image in pending], clf.preprocessing)
    padded = np.zeros((width,) + x.shape[1:], np.float32)
    padded[:len(x)] = x
    logits = clf.logits_fn(padded)[:len(x)].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    done = [(path, p) for (path, _), p in zip(pending, probs)]
    pending.clear()
    return done

  for path in files:
    try:
      pending.append((path, classifier.read_image(path)))
    except ValueError as e:
      yield path, str(e)
      continue
    if len(pending) == width:
      yield from run()
  if pending:
    yield from run()


def top_k(probs: np.ndarray, k: int) -> list[tuple[int, float]]:
  """The k most probable (class id, probability), descending; ties: the lower id first."""
  order = np.argsort(-probs, kind='stable')[:k]
  return [(int(i), float(probs[i])) for i in order]


class _Table:
  def __init__(self, out, clf):
    self.out, self.names = out, clf.class_names

  def write(self, path, predictions):
    print(path, file=self.out)
    for class_id, p in predictions:
      print(f'  {p:8.2%}  {class_id:5d}  {self.names[class_id]}', file=self.out)

  def close(self):
    pass


class _Csv:
  def __init__(self, out, clf):
    self.names = clf.class_names
    self.writer = csv.writer(out, lineterminator='\n')
    self.writer.writerow(['file', 'rank', 'class_id', 'class_name', 'probability'])

  def write(self, path, predictions):
    for rank, (class_id, p) in enumerate(predictions, 1):
      self.writer.writerow([path, rank, class_id, self.names[class_id], repr(p)])

  def close(self):
    pass


class _Json:
  def __init__(self, out, clf):
    self.out, self.names = out, clf.class_names
    self.doc = {'weights': clf.description, 'model': clf.model_name, 'results': []}

  def write(self, path, predictions):
    self.doc['results'].append({'file': path, 'predictions': [
        {'rank': rank, 'class_id': class_id, 'class_name': self.names[class_id],
         'probability': p} for rank, (class_id, p) in enumerate(predictions, 1)]})

  def close(self):
    json.dump(self.doc, self.out, indent=1)
    self.out.write('\n')


WRITERS = {'table': _Table, 'csv': _Csv, 'json': _Json}


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  logging.set_verbosity(logging.ERROR)  # Orbax's notes on read-only checkpoint directories.
  try:
    clf = classifier.load(args.weights, step=args.step, model_name=args.model)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  files, problems = image_files(args.inputs)
  for problem in problems:
    print(f'error: {problem}', file=sys.stderr)
  failed = len(problems)
  writer = WRITERS[args.format](sys.stdout, clf)
  k = min(args.topk, len(clf.class_names))
  for path, result in classify(clf, files, batch=args.batch):
    if isinstance(result, str):
      print(f'error: {result}', file=sys.stderr)
      failed += 1
    else:
      writer.write(path, top_k(result, k))
  writer.close()
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())

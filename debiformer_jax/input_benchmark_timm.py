"""timm's DeiT training transform in a PyTorch DataLoader, timed: the timm side of
`python -m debiformer_jax.benchmark --mode input --compare-timm`.

  PYTHON -m debiformer_jax.input_benchmark_timm --root DIR/train --workers C --batch B \
      --warmup W --steps S

Needs only torch, torchvision, timm and psutil (not JAX or TensorFlow), so PYTHON may be
another interpreter than the project's. The transform is `timm.data.create_transform(size,
is_training=True, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25,
interpolation='bicubic')` on torchvision's ImageFolder (PIL decoding), batches drawn at
random with replacement. CPU time counts this process and its DataLoader workers. Prints one
JSON object: images, wall_s, cpu_s and the versions, or {"error": ...} (exit status 3) when a
package is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _cpu_seconds(process) -> float:
  """User + system CPU seconds of `process` and its live children (the workers)."""
  total = 0.0
  for p in [process] + process.children(recursive=True):
    times = p.cpu_times()
    total += times.user + times.system
  return total


def run(root: str, workers: int, batch: int, warmup: int, steps: int, size: int) -> dict:
  """Times `steps` batches after `warmup` batches; returns the JSON fields."""
  import psutil  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from timm.data import create_transform  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(1)  # The main process only receives batches.
  transform = create_transform(size, is_training=True, auto_augment='rand-m9-mstd0.5-inc1',
                               re_prob=0.25, interpolation='bicubic')
  dataset = torchvision.datasets.ImageFolder(root, transform)
  sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                           num_samples=(warmup + steps + 4) * batch)
  loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler,
                                       num_workers=workers, drop_last=True)
  batches = iter(loader)
  for _ in range(warmup):
    next(batches)
  process = psutil.Process()
  cpu0, t0 = _cpu_seconds(process), time.perf_counter()
  for _ in range(steps):
    next(batches)
  wall, cpu = time.perf_counter() - t0, _cpu_seconds(process) - cpu0
  return {'images': steps * batch, 'wall_s': wall, 'cpu_s': cpu,
          'versions': {'torch': torch.__version__, 'torchvision': torchvision.__version__,
                       'timm': timm.__version__}}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--root', required=True, help='ImageFolder split: ROOT/<class>/<image>')
  p.add_argument('--workers', type=int, required=True)
  p.add_argument('--batch', type=int, required=True)
  p.add_argument('--warmup', type=int, required=True)
  p.add_argument('--steps', type=int, required=True)
  p.add_argument('--size', type=int, default=224)
  args = p.parse_args(argv)
  try:
    result = run(args.root, args.workers, args.batch, args.warmup, args.steps, args.size)
  except ImportError as e:
    print(json.dumps({'error': f'{sys.executable} cannot import {e.name} ({e})'}))
    return 3
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""`python -m debiformer_jax.benchmark --mode input`: the host input pipelines, images/s.

  python -m debiformer_jax.benchmark --mode input --images 256 --batch 32 --steps 16 \
      --cores 2 --source imagefolder --compare-timm --timm-python /tmp/venv_timm/bin/python

Writes ImageNet-like JPEGs (`debiformer_jax.data.synthetic`: --images train and as many
validation images, as an ImageFolder and as tfds TFRecords with the same bytes) into
--input-dir (reused when it holds them; default a temporary directory), then times our
training pipeline (`input_pipeline.create_train_iterator` with configs/small.py's recipe at
--resolution: decode and random-resized crop, flip, RandAugment rand-m9-mstd0.5-inc1, the
random-erasing box at 0.25, uint8 batching; normalising and filling the box happen in the
train step, on the device) and our eval pipeline (resize, centre crop), each for --steps batches
of --batch after --warmup batches, reading --source. The process is pinned to --cores CPUs.

The machine may be shared, so besides wall-clock images/s each pipeline is given in images
per CPU-second: images / CPU time of the process over the timed batches (all its threads;
for the DataLoader also its worker processes), the rate one fully used core sustains.
--compare-timm runs timm's DeiT training transform in a torch DataLoader with --cores
workers on the same ImageFolder files (`debiformer_jax.input_benchmark_timm`) in
--timm-python, a subprocess pinned to the same CPUs. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, Optional

NUM_CLASSES = 10
TFDS_NAME = 'synthetic_imagenet'
SPLITS = ('train', 'val')


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The --mode input options (batch, steps, warmup and resolution are the shared ones)."""
  g = parser.add_argument_group('input pipeline (--mode input)')
  g.add_argument('--images', type=int, default=64,
                 help='synthetic train images (and as many validation images) to write')
  g.add_argument('--cores', type=int, help='CPUs to pin to (default: all this process may use)')
  g.add_argument('--source', choices=('imagefolder', 'tfrecord'), default='imagefolder')
  g.add_argument('--input-dir', metavar='DIR',
                 help='where the synthetic images go (reused); default: a temporary directory')
  g.add_argument('--compare-timm', action='store_true',
                 help="time timm's DeiT train transform in a torch DataLoader on the same files")
  g.add_argument('--timm-python', metavar='PATH', default=sys.executable,
                 help='interpreter with torch, torchvision, timm and psutil for --compare-timm')


@dataclasses.dataclass(frozen=True)
class Rate:
  """Images produced over a timed window, its wall-clock and CPU seconds."""
  images: int
  wall_s: float
  cpu_s: float

  @property
  def per_s(self) -> float:
    return self.images / self.wall_s

  @property
  def per_cpu_s(self) -> float:
    return self.images / self.cpu_s


def pin_cores(cores: Optional[int]) -> int:
  """Restricts this process (and what it starts) to its first `cores` allowed CPUs."""
  allowed = sorted(os.sched_getaffinity(0))
  if cores is None:
    return len(allowed)
  if not 1 <= cores <= len(allowed):
    raise ValueError(f'--cores {cores}: this process may use {len(allowed)} CPUs; choose 1 to '
                     f'{len(allowed)}.')
  os.sched_setaffinity(0, allowed[:cores])
  return cores


def prepare(input_dir: str, images: int) -> Dict[str, str]:
  """Writes the synthetic dataset into input_dir unless it is there with `images` per split;
  returns {'folder': ImageFolder root, 'data_dir': tfds data dir}."""
  from debiformer_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  paths = {'folder': os.path.join(input_dir, 'imagefolder'),
           'data_dir': os.path.join(input_dir, 'tfds')}
  stamp = os.path.join(input_dir, f'synthetic-{images}.done')
  if not os.path.exists(stamp):
    dataset = synthetic.make_dataset({s: images for s in SPLITS}, NUM_CLASSES)
    synthetic.write_imagefolder(paths['folder'], dataset, NUM_CLASSES)
    synthetic.write_tfds(paths['data_dir'], TFDS_NAME, dataset, NUM_CLASSES)
    open(stamp, 'w').close()
  return paths


def data_config(source: str, paths: Dict[str, str]):
  """configs/small.py's data fields, reading the synthetic dataset from `source`."""
  from debiformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  d = config_lib.defaults().data
  if source == 'imagefolder':
    d.name, d.folder = 'imagefolder', paths['folder']
  else:
    d.name, d.data_dir = TFDS_NAME, paths['data_dir']
  d.train_split, d.eval_split = SPLITS
  return d


def measure(batches: Iterator, batch: int, warmup: int, steps: int) -> Rate:
  """Draws `warmup` batches, then times `steps` more (wall clock and process CPU time)."""
  for _ in range(warmup):
    next(batches)
  cpu0, t0 = time.process_time(), time.perf_counter()
  for _ in range(steps):
    next(batches)
  return Rate(steps * batch, time.perf_counter() - t0, time.process_time() - cpu0)


def ours(cfg, batch: int, size: int, warmup: int, steps: int) -> Dict[str, Rate]:
  """Our train and eval pipelines' rates."""
  from debiformer_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  train = input_pipeline.create_train_iterator(
      cfg, global_batch_size=batch, image_size=size, seed=0, process_index=0, process_count=1)
  rates = {'train': measure(train, batch, warmup, steps)}
  del train
  evals = input_pipeline.create_eval_iterator(
      cfg, global_batch_size=batch, image_size=size, process_index=0, process_count=1)
  passes = itertools.chain.from_iterable(itertools.repeat(evals))
  rates['eval'] = measure(passes, batch, warmup, steps)
  return rates


def timm(python: str, folder: str, cores: int, batch: int, size: int, warmup: int,
         steps: int) -> Dict:
  """Runs debiformer_jax.input_benchmark_timm in `python`; returns its JSON fields."""
  package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=package_root)
  cmd = [python, '-m', 'debiformer_jax.input_benchmark_timm',
         '--root', os.path.join(folder, 'train'), '--workers', str(cores),
         '--batch', str(batch), '--warmup', str(warmup), '--steps', str(steps),
         '--size', str(size)]
  try:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  except OSError as e:
    raise ValueError(f'--timm-python {python}: cannot run it ({e}).') from None
  lines = done.stdout.strip().splitlines()
  try:
    out = json.loads(lines[-1])
  except (IndexError, json.JSONDecodeError):
    raise ValueError(f'the timm DataLoader run in {python} failed (exit status '
                     f'{done.returncode}):\n{done.stderr.strip()[-2000:]}') from None
  if 'error' in out:
    raise ValueError(f"--compare-timm: {out['error']}. Give --timm-python an interpreter "
                     f'with torch, torchvision, timm and psutil (docs/performance.md says how '
                     f'to make one).')
  return out


def format_report(report: Dict) -> str:
  """The human-readable table of a report (see run)."""
  rows = [('pipeline', 'images/s', 'images/CPU-s', 'CPU-s', 'images')]
  for name, r in report['rates'].items():
    rows.append((name, f"{r['images'] / r['wall_s']:.1f}", f"{r['images'] / r['cpu_s']:.1f}",
                 f"{r['cpu_s']:.1f}", str(r['images'])))
  width = max(len(row[0]) for row in rows)
  lines = [f"input pipelines: {report['source']}, {report['cores']} cores, batch "
           f"{report['batch']}, {report['size']}x{report['size']}, {report['steps']} batches "
           f"after {report['warmup']} warm-up"]
  lines += [f'{row[0]:<{width}}  {row[1]:>9}  {row[2]:>12}  {row[3]:>7}  {row[4]:>6}'
            for row in rows]
  if 'timm train' in report['rates']:
    lines.append(f"ours / timm train, per CPU-second: {report['ours_over_timm_per_cpu_s']:.2f}x"
                 f"   (wall clock: {report['ours_over_timm_per_s']:.2f}x; timm "
                 f"{report['timm_versions']['timm']}, torch "
                 f"{report['timm_versions']['torch']})")
  return '\n'.join(lines)


def run(args) -> Dict:
  """Prepares the images, times the pipelines; returns the report (JSON-able)."""
  if args.images < 1 or args.batch < 1 or args.steps < 1 or args.warmup < 0:
    raise ValueError('--images, --batch and --steps must be positive and --warmup >= 0.')
  cores = pin_cores(args.cores)
  with tempfile.TemporaryDirectory() as tmp:
    input_dir = args.input_dir or tmp
    os.makedirs(input_dir, exist_ok=True)
    paths = prepare(input_dir, args.images)
    cfg = data_config(args.source, paths)
    rates = {f'ours {k}': v for k, v in
             ours(cfg, args.batch, args.resolution, args.warmup, args.steps).items()}
    report = {'source': args.source, 'cores': cores, 'batch': args.batch,
              'size': args.resolution, 'warmup': args.warmup, 'steps': args.steps}
    if args.compare_timm:
      out = timm(args.timm_python, paths['folder'], cores, args.batch, args.resolution,
                 args.warmup, args.steps)
      rates['timm train'] = Rate(out['images'], out['wall_s'], out['cpu_s'])
      report['timm_versions'] = out['versions']
      ours_train, theirs = rates['ours train'], rates['timm train']
      report['ours_over_timm_per_cpu_s'] = ours_train.per_cpu_s / theirs.per_cpu_s
      report['ours_over_timm_per_s'] = ours_train.per_s / theirs.per_s
  report['rates'] = {k: dataclasses.asdict(v) for k, v in rates.items()}
  return report


def main(args) -> int:
  """Entry point from benchmark.main for --mode input."""
  try:
    report = run(args)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_report(report))
  print(json.dumps(report, sort_keys=True))
  return 0

"""Shared pieces of the training tests (not a test module).

Every training test uses the demo model (configs/demo.py: 2 narrow stages, 32x32 input) with a
global batch of 8, so the few XLA programs involved are compiled once per session: a
persistent compilation cache (a fresh directory per pytest session, handed to subprocesses
through the environment) turns later compiles of the same program into a file read.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_ENV = 'DEBIFORMER_TEST_XLA_CACHE'


def use_compilation_cache() -> str:
  """Turns on the persistent compilation cache for this process (and its children)."""
  path = os.environ.get(CACHE_ENV)
  if not path:
    path = tempfile.mkdtemp(prefix='debiformer_xla_cache_')
    atexit.register(shutil.rmtree, path, ignore_errors=True)  # By the process that made it.
    os.environ[CACHE_ENV] = path
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  return path


def subprocess_env(**extra) -> dict:
  """Environment for a child Python: repo importable, the same compilation cache."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in [env.get('PYTHONPATH')] if p])
  env['JAX_COMPILATION_CACHE_DIR'] = os.environ.get(CACHE_ENV, '')
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  precision = jax.config.jax_default_matmul_precision  # conftest.py's choice, for children too.
  if precision:
    env['JAX_DEFAULT_MATMUL_PRECISION'] = str(precision)
  env.update(extra)
  return env


def load_config_file(name: str):
  """configs/<name>.py's get_config(), loaded by path as config_flags does."""
  path = os.path.join(REPO, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def data_config(name: str = 'imagenet2012', **overrides):
  """The recipe's data fields for dataset `name`, resolved as config.finalize does."""
  from debiformer_jax import config

  d = config.defaults().data
  d.name = name
  d.eval_split = config.EVAL_SPLITS[name]
  d.update(overrides)
  return d


def small_config(**overrides):
  """The demo config with test sizes: batch 8, log every step, few steps."""
  c = load_config_file('demo')
  c.global_batch_size = 8
  c.log_every_steps = 1
  c.data.shuffle_buffer = 64
  c.data.num_parallel_calls = 2
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def mock_imagenet_config(data_dir: str, **overrides):
  """The demo model on mock imagenet2012 with the ImageNet recipe's augmentation (RandAugment,
  random erasing, mixup/cutmix, label smoothing), EMA and stochastic depth on."""
  from debiformer_jax import config

  c = small_config(**overrides)
  c.model.drop_path_rate = 0.1
  c.ema_decay = 0.5
  recipe = config.defaults()
  c.data = recipe.data
  c.mixup = recipe.mixup
  c.data.data_dir = data_dir
  c.data.shuffle_buffer = 64
  c.data.num_parallel_calls = 2
  return c


def write_imagenet_metadata(root: str, num_train: int, num_eval: int) -> str:
  """tfds metadata for imagenet2012 with tiny splits, for tfds.testing.mock_data(data_dir=root)."""
  import tensorflow_datasets as tfds

  builder = tfds.builder('imagenet2012', data_dir=root)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name='train', shard_lengths=[num_train], num_bytes=0),
      tfds.core.SplitInfo(name='validation', shard_lengths=[num_eval], num_bytes=0)]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  return root


def write_jpeg_folder(root: str, *, classes=('cat', 'dog', 'fish'), train_per_class: int = 8,
                      val_per_class: int = 3, size: int = 40, seed: int = 0) -> str:
  """An ImageFolder root/{train,val}/<class>/*.jpg of coloured noise, one hue per class."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  for split, count in (('train', train_per_class), ('val', val_per_class)):
    for c, name in enumerate(classes):
      folder = os.path.join(root, split, name)
      os.makedirs(folder, exist_ok=True)
      for i in range(count):
        pixels = rng.integers(0, 80, (size, size + 4 * i, 3))
        pixels[..., c % 3] += 150
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f'{i}.jpg'))
  return root


def read_scalars(workdir: str) -> dict:
  """{tag: {step: value}} from the TensorBoard event files in `workdir`."""
  import tensorflow as tf

  out = {}
  for name in sorted(os.listdir(workdir)):
    if not name.startswith('events.out.tfevents'):
      continue
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
      for value in event.summary.value:
        if value.HasField('tensor'):
          number = float(tf.make_ndarray(value.tensor))
        else:
          number = value.simple_value
        out.setdefault(value.tag, {})[event.step] = number
  return out


def python() -> str:
  return sys.executable


def wait_all(procs, timeout: float):
  """Waits for every process. When one fails or the time runs out, gives its partners a moment
  to report and kills whatever still runs. Returns None if all exited 0, else what went wrong."""
  deadline = time.monotonic() + timeout
  failed = None
  try:
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline:
        failed = f'timed out after {timeout:.0f}s'
        break
      bad = [p for p in procs if p.poll() not in (None, 0)]
      if bad:
        failed = f'a process exited with {bad[0].returncode}'
        time.sleep(2.0)
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  if failed is None and any(p.returncode != 0 for p in procs):
    failed = 'a process failed'
  return failed


@contextlib.contextmanager
def launched(command: list[str], log_path: str):
  """`command` as a child process (repo root, unbuffered) writing to `log_path`; killed if it
  still runs at the end."""
  with open(log_path, 'w') as log:  # The child holds its own descriptor.
    proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(PYTHONUNBUFFERED='1'),
                            stdout=log, stderr=subprocess.STDOUT)
  try:
    yield proc
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(timeout=30)

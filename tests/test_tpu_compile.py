"""The demo configuration's train step compiled for a v5e:2x2 slice by libtpu (no TPU needed)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from debiformer_jax import tpu_compile
from tests._train_testlib import load_config_file

pytestmark = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                reason='libtpu is not installed (pip install "jax[tpu]")')


def demo(sharding):
  c = load_config_file('demo')
  c.sharding, c.fsdp_min_size = sharding, 2 ** 12  # Demo params are small: shard them anyway.
  return c


def test_dp_step_all_reduces_the_gradients():
  r = tpu_compile.compile_step(demo('dp'), 'v5e:2x2', 'train', 16, num_classes=10)
  assert r.num_chips == 4 and r.memory.temp > 0 and r.memory.argument > 0 and r.hbm > 0
  assert r.hlo['collectives']['all-reduce']['bytes'] >= r.memory.argument // 4
  assert 'all-gather' not in r.hlo['collectives']


def test_fsdp_step_gathers_and_reduce_scatters():
  r = tpu_compile.compile_step(demo('fsdp'), 'v5e:2x2', 'train', 16, num_classes=10)
  assert r.hlo['collectives']['all-gather']['count'] > 0
  assert r.hlo['collectives']['reduce-scatter']['count'] > 0


def test_impossible_batch_names_the_fixes():
  with pytest.raises(tpu_compile.DoesNotFit, match='--remat.*smaller batch'):
    tpu_compile.compile_step(demo('dp'), 'v5e:2x2', 'train', 2 ** 16, num_classes=10)


def test_a_second_process_is_told_the_lock_is_held():
  tpu_compile.topology_devices('v5e:2x2')  # This process now holds libtpu's lock.
  code = ('from debiformer_jax import tpu_compile\n'
          'try:\n'
          "  tpu_compile.topology_devices('v5e:2x2')\n"
          'except tpu_compile.LibtpuBusy as e:\n'
          '  print(e)\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}).stdout
  assert f'another process on this machine holds libtpu\'s lock {tpu_compile.LOCKFILE}' in out

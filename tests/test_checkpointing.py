"""Training checkpoints: keep the last N and the best, crash safety."""

import os
import subprocess
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from debiformer_jax import checkpointing
from tests import _train_testlib as lib


def _state(value):
  return {'params': {'w': jnp.full((3, 2), value, jnp.float32)}, 'step': jnp.int32(value),
          'ema_params': None}


def _abstract(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def test_keeps_the_last_n_and_the_best_across_restarts(tmp_path):
  directory = str(tmp_path / 'ckpt')
  manager = checkpointing.make_manager(directory, keep=2, keep_best=1)
  for step, top1 in [(1, 0.5), (2, 0.9), (3, 0.1)]:
    checkpointing.save(manager, step, _state(step), metrics={'eval/top1': top1})
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]
  assert not checkpointing.save(manager, 3, _state(3))  # An existing step is not re-saved.
  manager.close()

  # A resumed run still knows step 2 is the best; steps without eval metrics count as "last".
  manager = checkpointing.make_manager(directory, keep=2, keep_best=1)
  for step, top1 in [(4, 0.2), (5, None), (6, 0.3)]:
    checkpointing.save(manager, step, _state(step),
                       metrics=None if top1 is None else {'eval/top1': top1})
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 5, 6]
  assert manager.best_step() == 2
  state = checkpointing.restore(manager, _abstract(_state(0)), step=2)
  np.testing.assert_array_equal(state['params']['w'], np.full((3, 2), 2.0))
  assert int(state['step']) == 2
  manager.close()


def test_a_save_killed_half_way_never_replaces_the_last_good_one(tmp_path):
  """A process starts a large background save and dies at once (os._exit): the checkpoint
  directory is left as orbax's temporary one, and the previous step is what restores."""
  directory = str(tmp_path / 'ckpt')
  script = textwrap.dedent(f'''
      import os, jax.numpy as jnp
      from debiformer_jax import checkpointing
      manager = checkpointing.make_manager({directory!r})
      checkpointing.save(manager, 1, {{'params': {{'w': jnp.ones((4, 4))}}, 'step': jnp.int32(1)}})
      manager.wait_until_finished()
      big = {{'params': {{'w': jnp.ones((64, 1024, 1024))}}, 'step': jnp.int32(2)}}  # 256 MiB
      checkpointing.save(manager, 2, big)
      os._exit(1)  # Killed while step 2 is being written.
  ''')
  result = subprocess.run([lib.python(), '-c', script], env=lib.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  leftovers = sorted(os.listdir(directory))
  assert '1' in leftovers and '2' not in leftovers, leftovers
  assert any(name.startswith('2.orbax-checkpoint-tmp') for name in leftovers), leftovers

  manager = checkpointing.make_manager(directory)
  assert manager.latest_step() == 1
  state = checkpointing.restore(manager, _abstract({'params': {'w': jnp.zeros((4, 4))},
                                                    'step': jnp.int32(0)}))
  np.testing.assert_array_equal(state['params']['w'], np.ones((4, 4)))
  assert int(state['step']) == 1
  manager.close()
  # The manager of a resumed run removes the half-written directory.
  assert not any('tmp' in name for name in os.listdir(directory))

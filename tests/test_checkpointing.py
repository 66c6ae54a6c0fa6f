"""Training checkpoints (keep last N + best, crash safety) and the converted-weights format."""

import json
import os
import subprocess
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debiformer_jax import checkpointing
from debiformer_jax.models import create_model
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
  state, meta = checkpointing.restore(manager, _abstract(_state(0)), step=2)
  np.testing.assert_array_equal(state['params']['w'], np.full((3, 2), 2.0))
  assert meta['step'] == 2
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
  state, _ = checkpointing.restore(manager, _abstract({'params': {'w': jnp.zeros((4, 4))},
                                                       'step': jnp.int32(0)}))
  np.testing.assert_array_equal(state['params']['w'], np.ones((4, 4)))
  assert int(state['step']) == 1
  manager.close()
  # The manager of a resumed run removes the half-written directory.
  assert not any('tmp' in name for name in os.listdir(directory))


def test_load_training_variables_prefers_ema(tmp_path):
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(str(tmp_path)))
  state = {'params': {'w': jnp.ones(3)}, 'ema_params': {'w': jnp.full(3, 7.0)},
           'batch_stats': {'bn': {'mean': jnp.zeros(3)}}, 'step': jnp.int32(4)}
  checkpointing.save(manager, 4, state)
  manager.wait_until_finished()
  variables, meta = checkpointing.load_training_variables(str(tmp_path))
  np.testing.assert_array_equal(variables['params']['w'], np.full(3, 7.0))
  assert isinstance(variables['params']['w'], np.ndarray)
  assert set(variables) == {'params', 'batch_stats'} and meta['step'] == 4
  raw, _ = checkpointing.load_training_variables(str(tmp_path), use_ema=False)
  np.testing.assert_array_equal(raw['params']['w'], np.ones(3))
  with pytest.raises(FileNotFoundError, match='holds no training checkpoint'):
    checkpointing.load_training_variables(str(tmp_path / 'nothing'))


# ---------------------------------------------------------------------------------------------
# Converted weights.

SMALL = dict(depths=(1, 1), widths=(32, 64), mlp_ratios=(2, 2), dbra_mlp_ratios=(2, 2), n_win=4,
             attn1_deformable=(False, True), topk1=(4, -1), topk2=(4, -1), offset_groups=(1, 2),
             offset_kernels=(5, 3), offset_strides=(2, 1), rpe_sizes=(8, 4), num_classes=10)


def _abstract_variables(**overrides):
  model = create_model('debiformer_tiny', **{**SMALL, **overrides})
  return jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)},
                                           jnp.zeros((1, 32, 32, 3)), train=False))


def _random_variables(abstract):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)


def test_save_and_load_variables_round_trip(tmp_path):
  abstract = _abstract_variables()
  variables = _random_variables(abstract)
  out = checkpointing.save_variables(str(tmp_path / 'converted'), variables,
                                     model_name='debiformer_tiny', model_config=SMALL,
                                     extra_metadata={'source': 'test.pth'})
  assert sorted(os.listdir(out)) == ['debiformer.json', 'variables']
  loaded, meta = checkpointing.load_variables(out, abstract_variables=abstract)
  assert meta['model_name'] == 'debiformer_tiny' and meta['source'] == 'test.pth'
  assert meta['model_config']['widths'] == [32, 64]
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, want)


def test_load_variables_names_the_leaves_of_another_variant(tmp_path):
  out = checkpointing.save_variables(str(tmp_path / 'converted'),
                                     _random_variables(_abstract_variables()),
                                     model_name='debiformer_tiny', model_config=SMALL)
  with pytest.raises(ValueError) as error:
    checkpointing.load_variables(out, _abstract_variables(widths=(64, 128), num_classes=1000))
  text = str(error.value)
  assert 'debiformer_tiny' in text and 'another variant' in text
  assert 'params/head/kernel: shape (64, 10) in the checkpoint, (128, 1000) in the model' in text
  with pytest.raises(ValueError, match='leaves missing from the checkpoint: params/stage0_block1'):
    checkpointing.load_variables(out, _abstract_variables(depths=(2, 1)))


def test_load_variables_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpointing.load_variables(str(tmp_path / 'missing'))
  (tmp_path / 'half').mkdir()
  (tmp_path / 'half' / 'variables').mkdir()
  with pytest.raises(FileNotFoundError, match='debiformer.json is missing'):
    checkpointing.load_variables(str(tmp_path / 'half'))


def test_save_variables_refuses_to_overwrite(tmp_path):
  variables = {'params': {'w': np.ones((2, 2), np.float32)}, 'batch_stats': {}}
  target = tmp_path / 'out'
  target.mkdir()
  (target / 'something').write_text('precious')
  with pytest.raises(FileExistsError, match='exists and is not empty'):
    checkpointing.save_variables(str(target), variables, model_name='m', model_config={})
  assert (target / 'something').read_text() == 'precious'
  checkpointing.save_variables(str(target), variables, model_name='m', model_config={},
                               overwrite=True)
  assert not (target / 'something').exists()
  assert json.loads((target / 'debiformer.json').read_text())['model_name'] == 'm'
  loaded, _ = checkpointing.load_variables(str(target))
  np.testing.assert_array_equal(loaded['params']['w'], np.ones((2, 2)))

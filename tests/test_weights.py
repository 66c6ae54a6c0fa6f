"""Model weights: converted directories and training workdirs, read, checked and placed."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debiformer_jax import checkpointing, sharding, train, weights
from debiformer_jax.models import create_model

SMALL = dict(depths=(1, 1), widths=(32, 64), mlp_ratios=(2, 2), dbra_mlp_ratios=(2, 2), n_win=4,
             attn1_deformable=(False, True), topk1=(4, -1), topk2=(4, -1), offset_groups=(1, 2),
             offset_kernels=(5, 3), offset_strides=(2, 1), rpe_sizes=(8, 4), num_classes=10)


def _model(**overrides):
  return create_model('debiformer_tiny', **{**SMALL, **overrides})


def _random_variables(abstract):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)


def _placed(model):
  """abstract_variables(model) with (replicated) shardings: what `load` lays weights out as."""
  abstract = weights.abstract_variables(model)
  return train.with_shardings(abstract, sharding.state_shardings(abstract, sharding.make_mesh()))


def test_abstract_variables_are_the_shapes_of_init_variables():
  model = _model()
  real = jax.jit(weights.init_variables, static_argnums=0)(model, jax.random.PRNGKey(0))
  abstract = weights.abstract_variables(model)
  assert set(real) == {'params', 'batch_stats'}
  assert jax.tree.structure(real) == jax.tree.structure(abstract)
  for a, b in zip(jax.tree.leaves(real), jax.tree.leaves(abstract)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_save_read_and_load_round_trip(tmp_path):
  model = _model()
  variables = _random_variables(weights.abstract_variables(model))
  out = weights.save(str(tmp_path / 'converted'), variables, model_name='debiformer_tiny',
                     architecture=SMALL, metadata={'source': 'test.pth'})
  assert sorted(os.listdir(out)) == ['debiformer.json', 'variables']
  loaded, meta = weights.read(out)
  assert meta['model_name'] == 'debiformer_tiny' and meta['source'] == 'test.pth'
  assert meta['model_config']['widths'] == [32, 64]
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, want)
  placed = weights.load(out, _placed(model))
  for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(variables)):
    assert isinstance(got, jax.Array)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_load_names_the_leaves_of_another_variant(tmp_path):
  out = weights.save(str(tmp_path / 'converted'),
                     _random_variables(weights.abstract_variables(_model())),
                     model_name='debiformer_tiny', architecture=SMALL)
  with pytest.raises(ValueError) as error:
    weights.load(out, _placed(_model(widths=(64, 128), num_classes=1000)))
  text = str(error.value)
  assert 'debiformer_tiny' in text and 'another variant' in text
  assert 'params/head/kernel: shape (64, 10) in the checkpoint, (128, 1000) in the model' in text
  with pytest.raises(ValueError, match='leaves missing from the checkpoint: params/stage0_block1'):
    weights.load(out, _placed(_model(depths=(2, 1))))


def test_load_drops_a_head_of_another_class_count_only_when_asked(tmp_path):
  source = _random_variables(weights.abstract_variables(_model()))
  out = weights.save(str(tmp_path / 'converted'), source, model_name='debiformer_tiny',
                     architecture=SMALL)
  target_model = _model(num_classes=3)
  fresh = jax.jit(weights.init_variables, static_argnums=0)(target_model, jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match=r'head/kernel: shape \(64, 10\)'):
    weights.load(out, fresh)
  loaded = weights.load(out, fresh, drop_head=True)
  np.testing.assert_array_equal(np.asarray(loaded['params']['head']['kernel']),
                                np.asarray(fresh['params']['head']['kernel']))
  np.testing.assert_array_equal(np.asarray(loaded['params']['stem_conv1']['kernel']),
                                source['params']['stem_conv1']['kernel'])


def test_read_a_training_workdir_prefers_ema(tmp_path):
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(str(tmp_path)))
  state = {'params': {'w': jnp.ones(3)}, 'ema_params': {'w': jnp.full(3, 7.0)},
           'batch_stats': {'bn': {'mean': jnp.zeros(3)}}, 'step': jnp.int32(4)}
  checkpointing.save(manager, 4, state)
  manager.wait_until_finished()
  for where in (str(tmp_path), checkpointing.checkpoint_dir(str(tmp_path))):
    variables, meta = weights.read(where)
    np.testing.assert_array_equal(variables['params']['w'], np.full(3, 7.0))
    assert isinstance(variables['params']['w'], np.ndarray)
    assert set(variables) == {'params', 'batch_stats'} and meta['step'] == 4


def test_read_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    weights.read(str(tmp_path / 'missing'))
  (tmp_path / 'half').mkdir()
  (tmp_path / 'half' / 'variables').mkdir()
  with pytest.raises(FileNotFoundError, match='no debiformer.json of converted weights'):
    weights.read(str(tmp_path / 'half'))


def test_save_refuses_to_overwrite(tmp_path):
  variables = {'params': {'w': np.ones((2, 2), np.float32)}, 'batch_stats': {}}
  target = tmp_path / 'out'
  target.mkdir()
  (target / 'something').write_text('precious')
  with pytest.raises(FileExistsError, match='exists and is not empty'):
    weights.save(str(target), variables, model_name='m', architecture={})
  assert (target / 'something').read_text() == 'precious'
  with pytest.raises(FileExistsError, match='is not an earlier conversion'):
    weights.save(str(target), variables, model_name='m', architecture={}, overwrite=True)
  assert (target / 'something').read_text() == 'precious'
  (target / 'something').unlink()
  weights.save(str(target), variables, model_name='m', architecture={})
  weights.save(str(target), variables, model_name='m', architecture={}, overwrite=True)
  assert json.loads((target / 'debiformer.json').read_text())['model_name'] == 'm'
  loaded, _ = weights.read(str(target))
  np.testing.assert_array_equal(loaded['params']['w'], np.ones((2, 2)))

"""Mesh, batch and state shardings. (Real 8-device runs: test_train_devices.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from debiformer_jax import sharding


def test_mesh_axes():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data', 'model')
  assert mesh.shape == {'data': jax.device_count(), 'model': 1}
  one = sharding.make_mesh(devices=jax.devices()[:1])
  assert one.shape == {'data': 1, 'model': 1}
  with pytest.raises(ValueError, match='must be >= 1 and divide'):
    sharding.make_mesh(num_model=0)


@pytest.mark.parametrize('shape,expected', [
    ((3, 3, 64, 128), P(None, None, None, 'data')),  # Largest dimension that divides by 8.
    ((1000, 64), P('data', None)),
    ((1001, 64), P(None, 'data')),  # 1001 does not divide: the next largest does.
    ((7, 9, 5), P()),  # Nothing divides: replicated.
    ((16,), P()),  # Too small.
    ((), P()),
])
def test_fsdp_spec(shape, expected):
  assert sharding.fsdp_spec(shape, num_shards=8, min_size=1024) == expected


def test_fsdp_spec_on_one_shard_is_replicated():
  assert sharding.fsdp_spec((1024, 1024), num_shards=1, min_size=0) == P()


def test_state_shardings():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  state = {'w': jax.ShapeDtypeStruct((256, 64), jnp.float32), 'b': jnp.zeros(64),
           'ema': None, 'step': jnp.int32(0)}
  dp = sharding.state_shardings(state, mesh, 'dp')
  assert jax.tree.structure(dp) == jax.tree.structure(state)
  assert all(s.spec == P() for s in jax.tree.leaves(dp))
  fsdp = sharding.state_shardings(state, mesh, 'fsdp', fsdp_min_size=0)
  assert all(s.mesh == mesh for s in jax.tree.leaves(fsdp))
  with pytest.raises(ValueError, match="unknown sharding strategy 'zero3'"):
    sharding.state_shardings(state, mesh, 'zero3')


def test_host_to_global():
  mesh = sharding.make_mesh()
  n = 2 * jax.device_count()
  batch = {'image': np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3), 'label': np.arange(n)}
  out = sharding.host_to_global(batch, mesh)
  assert isinstance(out['image'], jax.Array)
  assert out['image'].shape == (n, 2, 3) and out['label'].shape == (n,)
  assert out['image'].sharding == sharding.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(out['image']), batch['image'])
  assert sharding.replicated(mesh).spec == P()

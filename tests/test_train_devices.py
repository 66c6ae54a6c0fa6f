"""The train step on 1 device and on 8 (data parallel and FSDP) computes the same thing.

The 1-device steps run here; the 8-device ones in a child process started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (XLA flags are read when JAX starts),
from the same initial state and batches. This file is also that child's script.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import optax

from debiformer_jax import sharding, train, weights
from tests import _train_testlib as lib

NUM_CLASSES, STEPS_PER_EPOCH, TOTAL_STEPS, NUM_STEPS = 1000, 3, 6, 2


def _config(strategy='dp'):
  # The training-loop test's config and schedule, so that the 1-device programs are shared.
  return lib.mock_imagenet_config('unused', num_epochs=2, sharding=strategy,
                                  fsdp_min_size=2 ** 10)


def _setup(config, mesh):
  """(init_fn, abstract state, state shardings, compile()) as train.py builds them."""
  model = train.build_model(config, NUM_CLASSES)
  schedule = train.make_schedule(config, STEPS_PER_EPOCH, TOTAL_STEPS)
  tx = train.make_optimizer(config, schedule)
  init_fn, abstract_state, state_sharding = train.abstract_train_state(config, model, tx, mesh)
  compile_step = lambda: train.compile_train_step(
      config, model=model, tx=tx, schedule=schedule, mesh=mesh,
      abstract_state=abstract_state, state_sharding=state_sharding)
  return init_fn, abstract_state, state_sharding, compile_step


def _run(step, state, mesh, batches):
  """NUM_STEPS steps from `state`; returns (losses, final state)."""
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.host_to_global(batch, mesh))
    losses.append(float(metrics['loss']))
  return np.array(losses), state


def _batches(config):
  rng = np.random.default_rng(0)
  size = (config.global_batch_size, config.image_size, config.image_size, 3)
  boxes = lambda: np.stack([rng.integers(0, 4, size[:1]), rng.integers(0, 4, size[:1]),
                            rng.integers(0, 5, size[:1]), rng.integers(0, 5, size[:1])], 1)
  return [{'image': rng.integers(0, 256, size).astype(np.uint8),
           'label': rng.integers(0, NUM_CLASSES, size[:1]).astype(np.int32),
           'erase': boxes().astype(np.int32)}
          for _ in range(NUM_STEPS)]


def _leaves(tree):
  return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]


def _fraction_on_one_device(x):
  return x.addressable_shards[0].data.size / x.size


def _worker(in_path, out_path):
  """Child: the same steps on an 8-device mesh, 'dp' then 'fsdp'."""
  assert jax.device_count() == 8, jax.devices()
  data = np.load(in_path)
  mesh = sharding.make_mesh()
  batches = [{'image': data[f'image_{i}'], 'label': data[f'label_{i}'],
              'erase': data[f'erase_{i}']} for i in range(NUM_STEPS)]
  out = {}
  for strategy in ('dp', 'fsdp'):
    _, abstract_state, state_sharding, compile_step = _setup(_config(strategy), mesh)
    step = compile_step()
    leaves = [data[f'state_{i}'] for i in range(len(jax.tree.leaves(abstract_state)))]
    state = jax.device_put(jax.tree.unflatten(jax.tree.structure(abstract_state), leaves),
                           state_sharding)
    losses, final = _run(step, state, mesh, batches)
    out[f'{strategy}_losses'] = losses
    for i, x in enumerate(_leaves(final.params)):
      out[f'{strategy}_param_{i}'] = x
    for i, x in enumerate(_leaves(optax.tree_utils.tree_get(final.opt_state, 'mu'))):
      out[f'{strategy}_mu_{i}'] = x
    out[f'{strategy}_param_fraction'] = _fraction_on_one_device(
        max(jax.tree.leaves(final.params), key=lambda x: x.size))
    out[f'{strategy}_opt_fraction'] = _fraction_on_one_device(
        max(jax.tree.leaves(final.opt_state), key=lambda x: x.size))
  global_batch = sharding.host_to_global(batches[0], mesh)
  out['batch_fraction'] = _fraction_on_one_device(global_batch['image'])
  np.savez(out_path, **out)


def _relative_difference(a, b):
  return np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30)


def test_one_device_equals_eight_devices_dp_and_fsdp(tmp_path):
  lib.use_compilation_cache()
  config = _config('dp')
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  init_fn, _, state_sharding, compile_step = _setup(config, mesh)
  state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
  initial_params = _leaves(state.params)
  batches = _batches(config)
  in_path, out_path = tmp_path / 'in.npz', tmp_path / 'out.npz'
  np.savez(in_path, **{f'state_{i}': x for i, x in enumerate(_leaves(state))},
           **{f'image_{i}': b['image'] for i, b in enumerate(batches)},
           **{f'erase_{i}': b['erase'] for i, b in enumerate(batches)},
           **{f'label_{i}': b['label'] for i, b in enumerate(batches)})

  child = subprocess.Popen(
      [lib.python(), os.path.abspath(__file__), '--worker', str(in_path), str(out_path)],
      # LLVM's optimisations off in the child: its two 8-device programs compile twice as fast.
      env=lib.subprocess_env(XLA_FLAGS='--xla_force_host_platform_device_count=8 '
                                       '--xla_backend_optimization_level=0',
                             JAX_PLATFORMS='cpu'),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  losses_1, final_1 = _run(compile_step(), state, mesh, batches)  # Meanwhile, 1 device here.
  log, _ = child.communicate(timeout=900)
  assert child.returncode == 0, log[-4000:]
  out = np.load(out_path)

  names = list(weights.flatten(final_1.params))
  params_1 = _leaves(final_1.params)
  mu_1 = _leaves(optax.tree_utils.tree_get(final_1.opt_state, 'mu'))
  mu_scale = np.sqrt(sum(np.sum(m ** 2) for m in mu_1))
  assert np.all(np.isfinite(losses_1)) and mu_scale > 0
  for strategy in ('dp', 'fsdp'):
    np.testing.assert_allclose(out[f'{strategy}_losses'], losses_1, rtol=2e-5)
    for i, name in enumerate(names):
      # Gradients: Adam's first moment is linear in them. Some are zero up to rounding noise
      # (a conv bias before BatchNorm, key biases under softmax), hence the absolute term.
      mu_8 = out[f'{strategy}_mu_{i}']
      assert np.linalg.norm(mu_8 - mu_1[i]) <= 1e-3 * np.linalg.norm(mu_1[i]) + 1e-6 * mu_scale, (
          strategy, name)
      # Updates (final - initial). Adam turns those zero-gradient noises into +-lr steps, so
      # those biases are compared through their gradients only.
      if not name.endswith('bias'):
        p0, p1, p8 = initial_params[i], params_1[i], out[f'{strategy}_param_{i}']
        assert _relative_difference(p8 - p0, p1 - p0) < 1e-3, (strategy, name)
  assert float(out['dp_param_fraction']) == 1.0  # Replicated.
  assert float(out['fsdp_param_fraction']) == 1 / 8  # Split over the 8 devices.
  assert float(out['fsdp_opt_fraction']) == 1 / 8
  assert float(out['batch_fraction']) == 1 / 8


if __name__ == '__main__':
  if sys.argv[1:2] == ['--worker']:
    _worker(sys.argv[2], sys.argv[3])

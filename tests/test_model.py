"""Flax model pieces against independent computations: sampling, routing, shapes, options."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from debiformer_jax.models import Implementation, create_model, get_architecture
from debiformer_jax.models import attention, routing
from debiformer_jax.models.layers import DepthwiseConv
from debiformer_jax.models.sampling import bilinear_sample, bilinear_sample_matmul

# A two-stage model small enough to compile in seconds; every block kind appears once.
SMALL_ARCH = dict(depths=(1, 1), widths=(32, 64), mlp_ratios=(2, 2),
                  attn1_deformable=(False, True), topk1=(2, -1), topk2=(3, -1),
                  offset_groups=(1, 2), offset_kernels=(5, 3), offset_strides=(2, 1),
                  dbra_mlp_ratios=(2, 1), rpe_sizes=(14, 7), num_classes=10)
SMALL_SIDE = 56  # stage maps 14 and 7, deformable grids 7 and 7.


def tol(ref):
  return 1e-4 * max(1.0, float(np.abs(ref).max()))


def torch_grid_sample(features_nhwc, coords_yx):
  """Reference: torch grid_sample(bilinear, zeros, align_corners=True) at (y, x) points."""
  inp = torch.from_numpy(np.asarray(features_nhwc)).permute(0, 3, 1, 2)
  grid = torch.from_numpy(np.asarray(coords_yx)[..., ::-1].copy())[:, :, None, :]  # (B,P,1,2) x,y
  out = F.grid_sample(inp, grid, mode='bilinear', padding_mode='zeros', align_corners=True)
  return out[:, :, :, 0].permute(0, 2, 1).numpy()  # (B, P, C)


@pytest.mark.parametrize('sampler', [bilinear_sample, bilinear_sample_matmul])
def test_bilinear_sampling_matches_torch_grid_sample(sampler):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  interior = rng.uniform(-0.9, 0.9, size=(2, 40, 2))
  edges = np.array([[-1, -1], [1, 1], [-1, 1], [1, -1], [0, 1], [1, 0], [-1, 0.3], [0.25, -1]])
  outside = np.array([[-1.2, 0], [0, 1.3], [1.05, 1.05], [-3, -3], [-1.1, 0.999], [1.0001, 0.5]])
  coords = np.concatenate([interior, np.broadcast_to(edges, (2,) + edges.shape),
                           np.broadcast_to(outside, (2,) + outside.shape)], 1).astype(np.float32)
  ref = torch_grid_sample(feats, coords)
  got = np.asarray(sampler(jnp.asarray(feats), jnp.asarray(coords)))
  np.testing.assert_allclose(got, ref, atol=1e-5)
  assert np.abs(ref[:, -3]).max() == 0.0  # a point far outside samples zeros


def test_region_partition_round_trip_and_order():
  x = jnp.arange(2 * 6 * 4 * 4, dtype=jnp.float32).reshape(2, 6, 4, 4)
  reg = routing.to_head_regions(x, 2, heads=2)  # regions of 3x2, two heads of 2 channels
  assert reg.shape == (2, 2, 4, 6, 2)
  # Region r = j*p + i covers rows 3j..3j+2 and columns 2i..2i+1, tokens row-major; head m
  # holds channels 2m..2m+1.
  np.testing.assert_array_equal(reg[0, 0, 1], np.asarray(x[0, 0:3, 2:4, 0:2]).reshape(6, 2))
  np.testing.assert_array_equal(reg[1, 1, 2], np.asarray(x[1, 3:6, 0:2, 2:4]).reshape(6, 2))
  np.testing.assert_array_equal(routing.from_head_regions(reg, 2, 6, 4), x)


@pytest.mark.parametrize('impl', ['take', 'onehot'])
def test_routing_and_gather_match_a_plain_loop(impl):
  rng = np.random.default_rng(1)
  n, m, r, t, c, k = 2, 2, 9, 4, 6, 3
  q = rng.normal(size=(n, r, c)).astype(np.float32)
  key = rng.normal(size=(n, r, c)).astype(np.float32)
  kv = rng.normal(size=(2, n, m, r, t, c)).astype(np.float32)
  scale = c ** -0.5
  idx = np.asarray(routing.route(jnp.asarray(q), jnp.asarray(key), k, scale))
  gathered = np.asarray(routing.gather_regions(jnp.asarray(kv), jnp.asarray(idx), impl))
  assert gathered.shape == (2, n, m, r, k * t, c)
  for b in range(n):
    for i in range(r):
      scores = [(q[b, i] * scale) @ key[b, j] for j in range(r)]
      best = sorted(range(r), key=lambda j: -scores[j])[:k]
      assert set(idx[b, i].tolist()) == set(best)
      expect = np.concatenate([kv[:, b, :, j] for j in idx[b, i]], 2)  # (2, m, k*T, c)
      np.testing.assert_allclose(gathered[:, b, :, i], expect, atol=1e-6)


def test_multihead_attention_matches_a_plain_computation():
  rng = np.random.default_rng(2)
  q = rng.normal(size=(3, 5, 8)).astype(np.float32)
  k = rng.normal(size=(3, 7, 8)).astype(np.float32)
  v = rng.normal(size=(3, 7, 8)).astype(np.float32)
  bias = rng.normal(size=(3, 2, 5, 7)).astype(np.float32)
  got = np.asarray(routing.multihead_attention(q, k, v, 2, 0.3, bias))
  for m in range(2):
    sl = slice(4 * m, 4 * m + 4)
    logits = np.einsum('bqc,bkc->bqk', q[..., sl] * 0.3, k[..., sl]) + bias[:, m]
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    np.testing.assert_allclose(got[..., sl], attn @ v[..., sl], atol=1e-5)


@pytest.mark.parametrize('stride', [1, 2, 4])
def test_depthwise_conv_formulations_agree(stride):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 9, 5))
  outs, grads = [], []
  for impl in ('grouped', 'shifted'):  # 'shifted' has a hand-written backward pass
    conv = DepthwiseConv(5, stride=stride, dwconv=impl)
    params = conv.init(jax.random.PRNGKey(1), x)
    outs.append(np.asarray(conv.apply(params, x)))
    weight = jax.random.normal(jax.random.PRNGKey(2), outs[-1].shape)
    grads.append(jax.grad(lambda p, x: (conv.apply(p, x) * weight).sum(), (0, 1))(params, x))
  assert outs[0].shape == (2, -(-11 // stride), -(-9 // stride), 5)
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    assert a.shape == b.shape and np.abs(a).max() > 0
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_parameter_counts_match_the_official_models():
  expected = {'debiformer_tiny': 21_495_598, 'debiformer_small': 44_008_028,
              'debiformer_base': 95_501_926}
  for name, count in expected.items():
    model = create_model(name)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params'])) == count, name
    assert set(shapes) == {'params', 'batch_stats'}


def test_official_names_are_aliases_and_unknown_names_are_listed():
  assert get_architecture('debi_small') == get_architecture('debiformer_small')
  with pytest.raises(ValueError, match='debiformer_tiny.*debi_base|known models'):
    create_model('debiformer_huge')
  with pytest.raises(ValueError, match='unknown model field'):
    create_model('debiformer_tiny', widht=(1,))


def test_bad_config_values_are_named():
  with pytest.raises(ValueError, match='head_dim'):
    get_architecture('debiformer_tiny', widths=(64, 128, 250, 512))
  with pytest.raises(ValueError, match='topk2'):
    get_architecture('debiformer_tiny', topk2=(4, 8, 50, -1))
  with pytest.raises(ValueError, match='one entry per stage'):
    get_architecture('debiformer_tiny', depths=(1, 1, 1))


@pytest.fixture(scope='module')
def small_model():
  model = create_model('debiformer_tiny', **SMALL_ARCH)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, SMALL_SIDE, SMALL_SIDE, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  return model, variables, x


def apply(model, variables, x, **kw):
  """Jitted inference (eager op-by-op dispatch is far slower than one compile)."""
  return jax.jit(lambda v, x: model.apply(v, x, **kw))(variables, x)


def test_input_sizes_that_do_not_split_into_regions_are_refused(small_model):
  model, variables, _ = small_model
  with pytest.raises(ValueError, match='not divisible by n_win.*include 56, 112'):
    apply(model, variables, jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match=r'NHWC'):
    apply(model, variables, jnp.zeros((1, 3, 56, 56)))


def test_twice_the_resolution_runs_with_the_same_weights(small_model):
  model, variables, _ = small_model
  logits = apply(model, variables, jnp.ones((1, 2 * SMALL_SIDE, 2 * SMALL_SIDE, 3)))
  assert logits.shape == (1, 10) and bool(jnp.all(jnp.isfinite(logits)))


# Every formulation at least once: dwconv, sampling (the rpe bias's window and separable
# forms included: SMALL_ARCH's tables are 2*side-1), region gather (dense_routing=0 forces the
# gathers; SMALL_ARCH's stage-0 routing is dense under the CPU default), all-dense routing,
# remat with each policy.
IMPLEMENTATIONS = (
    Implementation(dwconv='grouped'), Implementation(dwconv='shifted'),
    Implementation(sampling='matmul'), Implementation(sampling='gather'),
    Implementation(region_gather='take', dense_routing=0),
    Implementation(region_gather='onehot', dense_routing=0),
    Implementation(dense_routing=2 ** 40),
    Implementation(remat=True), Implementation(remat=True, remat_policy='nothing'),
    Implementation(dwconv='grouped', sampling='matmul', region_gather='onehot',
                   dense_routing=2 ** 18),  # the TPU choice
)


def test_implementation_choices_give_the_same_logits(small_model):
  model, variables, x = small_model
  ref = np.asarray(apply(model, variables, x))
  for impl in IMPLEMENTATIONS:
    other = dataclasses.replace(model, impl=impl)
    np.testing.assert_allclose(np.asarray(apply(other, variables, x)), ref, atol=tol(ref),
                               err_msg=str(impl))


def _train_grads(model, variables, x):
  def loss(params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            train=True, mutable=['batch_stats'])
    return jnp.sum(logits * jnp.linspace(-1.0, 1.0, logits.size).reshape(logits.shape))

  return jax.jit(jax.grad(loss))(variables['params'])


def test_implementation_choices_give_the_same_gradients(small_model):
  """Custom VJPs (shifted depthwise conv) and the gather/scatter vs matmul backward passes."""
  model, variables, x = small_model
  ref = _train_grads(model, variables, x)
  for impl in (Implementation(dwconv='grouped', sampling='matmul', region_gather='onehot',
                              dense_routing=0, remat=True),
               Implementation(dense_routing=2 ** 40, sampling='gather')):
    got = _train_grads(dataclasses.replace(model, impl=impl), variables, x)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got)):
      a, b = np.asarray(a), np.asarray(b)
      np.testing.assert_allclose(b, a, atol=1e-4 * max(1.0, np.abs(a).max()),
                                 err_msg=f'{impl} {jax.tree_util.keystr(path)}')


@pytest.mark.parametrize('side,rpe_size', [(14, 14), (7, 7), (10, 14), (14, 9)])
def test_rpe_bias_forms_match_torch_grid_sample(side, rpe_size):
  """The relative-position bias as the reference computes it (grid_sample of the table at
  (query - point) / 2), for tables that align with the query grid (window gather) and not."""
  rng = np.random.default_rng(side + rpe_size)
  heads, groups, points = 4, 2, 9
  n = 2
  table = rng.normal(size=(heads, 2 * rpe_size - 1, 2 * rpe_size - 1)).astype(np.float32)
  pos = rng.uniform(-1.2, 1.2, size=(n, groups, points, 2)).clip(-1, 1).astype(np.float32)
  ys = np.linspace(-1, 1, side, dtype=np.float32)
  queries = np.stack(np.meshgrid(ys, ys, indexing='ij'), -1).reshape(1, -1, 1, 2)
  disp = (queries - pos.reshape(n * groups, 1, points, 2)) * 0.5
  tables = np.broadcast_to(table, (n,) + table.shape).reshape(n * groups, heads // groups,
                                                             *table.shape[1:])
  ref = F.grid_sample(torch.from_numpy(np.ascontiguousarray(tables)),
                      torch.from_numpy(np.ascontiguousarray(disp[..., ::-1])),
                      mode='bilinear', padding_mode='zeros', align_corners=True)
  ref = ref.numpy().reshape(n, heads, side * side, points)
  for impl in ('gather', 'matmul'):
    got = np.asarray(jax.jit(lambda t, p: attention.rpe_bias(t, p, side, side, impl))(table, pos))
    np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=impl)


def test_unknown_implementation_values_are_named():
  with pytest.raises(ValueError, match="dwconv='winograd'"):
    Implementation(dwconv='winograd').resolve('cpu')
  with pytest.raises(ValueError, match='dense_routing'):
    Implementation(dense_routing=-1).resolve('cpu')
  for backend in ('cpu', 'tpu', 'gpu'):
    impl = Implementation().resolve(backend)
    assert impl.resolve(backend) == impl and 'auto' not in dataclasses.astuple(impl)


def test_train_mode_updates_batch_stats_and_uses_drop_path(small_model):
  model, variables, x = small_model
  model = dataclasses.replace(model, config=dataclasses.replace(model.config,
                                                                drop_path_rate=0.5))
  run = jax.jit(lambda seed: model.apply(variables, x, train=True, mutable=['batch_stats'],
                                         rngs={'dropout': jax.random.PRNGKey(seed)}))
  (a, state_a), (b, _) = run(0), run(1)
  assert not np.allclose(np.asarray(a), np.asarray(b))  # different drop-path masks
  changed = jax.tree.map(lambda u, v: bool(jnp.any(u != v)), state_a['batch_stats'],
                         variables['batch_stats'])
  assert all(jax.tree.leaves(changed))

  def loss(params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            train=True, mutable=['batch_stats'],
                            rngs={'dropout': jax.random.PRNGKey(0)})
    return logits.sum()

  grads = jax.jit(jax.grad(loss))(variables['params'])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_bfloat16_compute_keeps_float32_params_and_top1(small_model):
  model, variables, x = small_model
  ref = np.asarray(apply(model, variables, x))
  out = np.asarray(apply(dataclasses.replace(model, dtype=jnp.bfloat16), variables, x))
  assert out.dtype == np.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  assert np.abs(out - ref).max() < 0.1 * max(1.0, np.abs(ref).max())
  np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))


def _primitive_dtypes(jaxpr, names):
  """{(primitive, first operand dtype): count} over a jaxpr and every jaxpr nested in it."""
  found = {}

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name in names:
        key = (eqn.primitive.name, str(eqn.invars[0].aval.dtype))
        found[key] = found.get(key, 0) + 1
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (list, tuple)) else (param,)):
          if hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
            walk(sub.jaxpr)
          elif hasattr(sub, 'eqns'):
            walk(sub)

  walk(jaxpr.jaxpr)
  return found


@pytest.mark.parametrize('impl', [Implementation(), IMPLEMENTATIONS[-1]], ids=['cpu', 'tpu'])
def test_bfloat16_keeps_softmax_norms_routing_and_positions_in_float32(small_model, impl):
  model, variables, x = small_model
  model = dataclasses.replace(model, dtype=jnp.bfloat16, impl=impl)
  found = _primitive_dtypes(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x),
                            {'exp', 'top_k', 'rsqrt', 'floor', 'dot_general'})
  # Softmax (exp), routing (top_k), LayerNorm/BatchNorm (rsqrt), sampling positions (floor).
  for name in ('exp', 'top_k', 'rsqrt', 'floor'):
    assert found.get((name, 'float32')), (name, found)
    assert not found.get((name, 'bfloat16')), (name, found)
  # The matmuls are bfloat16 but for the float32 ones: routing logits, interpolation weights.
  assert found[('dot_general', 'bfloat16')] > found.get(('dot_general', 'float32'), 0)


def test_bfloat16_full_size_tiny_tracks_the_float32_reference():
  """Converted random full-size DeBiFormer-T weights: bf16 compute against our PyTorch
  reference of the official model in float32 (measured: 1.2% of max |logit|, top-1 equal)."""
  from debiformer_jax.convert import convert_state_dict
  from debiformer_jax.models import DeBiFormer
  from debiformer_jax.reference.torch_debiformer import (build_torch_model, clear_routing_input,
                                                         randomize_)
  cfg = get_architecture('debiformer_tiny')
  torch_model = randomize_(build_torch_model(cfg), 5).eval()
  variables = convert_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()},
                                 cfg)
  x = clear_routing_input(torch_model, (2, 3, 224, 224), 5)
  with torch.no_grad():
    ref = torch_model(x).numpy()
  model = DeBiFormer(cfg, dtype=jnp.bfloat16)
  out = np.asarray(apply(model, variables, x.numpy().transpose(0, 2, 3, 1)))
  assert out.dtype == np.float32
  scale = max(1.0, float(np.abs(ref).max()))
  assert np.abs(out - ref).max() < 0.05 * scale, np.abs(out - ref).max()
  np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))

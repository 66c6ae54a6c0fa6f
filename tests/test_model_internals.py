"""The model's captured internals (Flax 'intermediates'): routing indices and deformable points
against the PyTorch reference, and a forward that captures nothing compiles unchanged."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import torch

from debiformer_jax.convert import convert_state_dict
from debiformer_jax.models import DeBiFormer
from debiformer_jax.models.architecture import TINY
from debiformer_jax.models.attention import RoutedAttention
from debiformer_jax.reference import build_torch_model, clear_routing_input, randomize_
from debiformer_jax.reference.torch_debiformer import routing_internals

# Every block kind (BRA and DBRA attn1, routed and unrouted DBRA), small widths, 224 input.
MINI = dataclasses.replace(TINY, depths=(1, 1, 1, 1), widths=(32, 64, 64, 64),
                           offset_groups=(1, 1, 2, 2), num_classes=10)

torch.set_num_threads(2)


def _official_name(path) -> str:
  """('stage2_block0', 'attn1', 'pos') -> 'stages.2.0.attn1/pos'."""
  stage, block = path[0][len('stage'):].split('_block')
  return f'stages.{stage}.{block}.{path[1]}/{path[2]}'


def test_routing_indices_and_points_match_the_reference():
  torch_model = randomize_(build_torch_model(MINI), seed=3).eval()
  x = clear_routing_input(torch_model, (2, 3, 224, 224), seed=0)
  expected = routing_internals(torch_model, x)
  variables = convert_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()},
                                 MINI)
  _, state = DeBiFormer(MINI).apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                                    mutable=['intermediates'])
  got = {_official_name(tuple(k.key for k in path[:3])): np.asarray(leaf)
         for path, leaf in jax.tree_util.tree_flatten_with_path(state['intermediates'])[0]
         if path[2].key in ('r_idx', 'pos')}
  assert set(got) == set(expected)
  assert any(k.endswith('/r_idx') for k in got) and any(k.endswith('/pos') for k in got)
  for key, want in expected.items():
    assert got[key].shape == want.shape, key
    if key.endswith('/r_idx'):
      np.testing.assert_array_equal(got[key], want, err_msg=key)
    else:
      np.testing.assert_allclose(got[key], want, atol=1e-5, rtol=0, err_msg=key)


def test_a_forward_that_captures_nothing_compiles_unchanged(monkeypatch):
  cfg = dataclasses.replace(MINI, depths=(1, 1), widths=(32, 64), mlp_ratios=(2, 2),
                            n_win=4, attn1_deformable=(False, True), topk1=(4, -1),
                            topk2=(4, -1), offset_groups=(1, 2), offset_kernels=(5, 3),
                            offset_strides=(2, 1), dbra_mlp_ratios=(2, 2), rpe_sizes=(8, 4))
  model = DeBiFormer(cfg)
  x = jnp.zeros((2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  def compiled():  # The optimized HLO without source locations (the test's lambda moves them).
    text = jax.jit(model.apply).lower(variables, x).compile().as_text()
    text = re.sub(r', metadata=\{[^}]*\}', '', text.split('\nFileNames')[0])
    return text
  with_capture = compiled()
  _, state = model.apply(variables, x, mutable=['intermediates'])
  assert len(jax.tree.leaves(state['intermediates'])) == 8  # 3 r_idx, 3 pos, 3 attn minus 1.
  monkeypatch.setattr(RoutedAttention, 'capture', lambda self, name, value_fn: None)
  assert compiled() == with_capture

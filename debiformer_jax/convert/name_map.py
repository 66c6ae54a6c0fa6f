"""The explicit name map from the official PyTorch state dict to our Flax variables.

`name_map(cfg)` lists one `Entry` per tensor of the official model built from `cfg`: its
state-dict key, the Flax collection and path it fills, and how its layout changes:

  'conv'    OIHW full conv weight        -> HWIO kernel          (transpose 2, 3, 1, 0)
  'dw'      (C, 1, k, k) depthwise weight -> (k, k, C)
  'linear'  (out, in) Linear weight       -> (in, out)
  'conv1x1' (out, in, 1, 1) 1x1 conv      -> (in, out)
  'copy'    same layout (biases, norm scales, BatchNorm statistics, rpe tables)

No suffix guessing: the map is written out per module, and the converter checks that every
checkpoint tensor is used exactly once and every Flax leaf is filled exactly once.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import numpy as np

from debiformer_jax.models.architecture import Architecture


@dataclasses.dataclass(frozen=True)
class Entry:
  torch_key: str
  collection: str  # 'params' or 'batch_stats'
  path: Tuple[str, ...]
  layout: str


TRANSFORMS = {
    'conv': lambda w: np.transpose(w, (2, 3, 1, 0)),
    'dw': lambda w: np.transpose(w[:, 0], (1, 2, 0)),
    'linear': lambda w: np.transpose(w),
    'conv1x1': lambda w: np.transpose(w[:, :, 0, 0]),
    'copy': lambda w: w,
}


def _weight_bias(torch_prefix, path, layout, bias=True):
  out = [Entry(f'{torch_prefix}.weight', 'params', path + ('kernel',), layout)]
  if bias:
    out.append(Entry(f'{torch_prefix}.bias', 'params', path + ('bias',), 'copy'))
  return out


def _layer_norm(torch_prefix, path):
  return [Entry(f'{torch_prefix}.weight', 'params', path + ('scale',), 'copy'),
          Entry(f'{torch_prefix}.bias', 'params', path + ('bias',), 'copy')]


def _batch_norm(torch_prefix, path):
  return _layer_norm(torch_prefix, path) + [
      Entry(f'{torch_prefix}.running_mean', 'batch_stats', path + ('mean',), 'copy'),
      Entry(f'{torch_prefix}.running_var', 'batch_stats', path + ('var',), 'copy')]


def _conv_mlp(t, path):
  return (_weight_bias(f'{t}.linear1.0', path + ('fc1',), 'conv1x1')
          + _weight_bias(f'{t}.dwc', path + ('dwconv',), 'dw')
          + _weight_bias(f'{t}.linear2.0', path + ('fc2',), 'conv1x1'))


def _bra(t, path):
  return (_weight_bias(f'{t}.qkv.qkv', path + ('qkv',), 'linear')
          + _weight_bias(f'{t}.lepe', path + ('lepe',), 'dw')
          + _weight_bias(f'{t}.wo', path + ('wo',), 'linear'))


def _dbra(t, path):
  entries = _weight_bias(f'{t}.qkv_conv.qkv', path + ('qkv',), 'conv1x1')
  entries += _weight_bias(f'{t}.conv_offset_q.0', path + ('offset_dwconv',), 'dw', bias=False)
  entries += _layer_norm(f'{t}.conv_offset_q.1.norm', path + ('offset_norm',))
  entries += _weight_bias(f'{t}.conv_offset_q.3', path + ('offset_proj',), 'conv1x1', bias=False)
  entries += _weight_bias(f'{t}.lepe1', path + ('lepe',), 'dw')
  for name in ('proj_q', 'proj_k', 'proj_v', 'proj_out'):
    entries += _weight_bias(f'{t}.{name}', path + (name,), 'conv1x1')
  entries += _weight_bias(f'{t}.unifyheads1', path + ('unifyheads',), 'conv1x1')
  entries += _layer_norm(f'{t}.norm2', path + ('mlp_norm',))
  entries += _conv_mlp(f'{t}.mlp', path + ('mlp',))
  entries += _layer_norm(f'{t}.norm', path + ('out_norm',))
  entries.append(Entry(f'{t}.rpe_table', 'params', path + ('rpe_table',), 'copy'))
  return entries


def _block(cfg, s, t, path):
  entries = _weight_bias(f'{t}.pos_embed1', path + ('pos_embed1',), 'dw')
  entries += _weight_bias(f'{t}.pos_embed2', path + ('pos_embed2',), 'dw')
  for i in range(1, 5):
    entries += _layer_norm(f'{t}.norm{i}', path + (f'norm{i}',))
  attn1 = _dbra if cfg.attn1_deformable[s] else _bra
  entries += attn1(f'{t}.attn1', path + ('attn1',))
  entries += _dbra(f'{t}.attn2', path + ('attn2',))
  entries += _conv_mlp(f'{t}.mlp1', path + ('mlp1',))
  entries += _conv_mlp(f'{t}.mlp2', path + ('mlp2',))
  return entries


def name_map(cfg: Architecture, features_only: bool = False) -> List[Entry]:
  """Every tensor of the official model for `cfg` (except num_batches_tracked): the classifier,
  or with `features_only` the dense backbone (no final norm, no head). With norm_outputs, the
  per-stage LayerNorms `extra_norms.{s}.ln` of the dense backbone."""
  entries = _weight_bias('downsample_layers.0.0', ('stem_conv1',), 'conv')
  entries += _batch_norm('downsample_layers.0.1', ('stem_bn1',))
  entries += _weight_bias('downsample_layers.0.3', ('stem_conv2',), 'conv')
  entries += _batch_norm('downsample_layers.0.4', ('stem_bn2',))
  for s in range(1, cfg.num_stages):
    entries += _weight_bias(f'downsample_layers.{s}.0', (f'downsample{s}_conv',), 'conv')
    entries += _batch_norm(f'downsample_layers.{s}.1', (f'downsample{s}_bn',))
  for s in range(cfg.num_stages):
    for b in range(cfg.depths[s]):
      entries += _block(cfg, s, f'stages.{s}.{b}', (f'stage{s}_block{b}',))
  if cfg.norm_outputs:
    for s in range(cfg.num_stages):
      entries += _layer_norm(f'extra_norms.{s}.ln', (f'extra_norm{s}',))
  if not features_only:
    entries += _batch_norm('norm', ('norm',))
    entries += _weight_bias('head', ('head',), 'linear')
  return entries

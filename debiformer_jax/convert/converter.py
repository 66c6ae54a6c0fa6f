"""Official PyTorch state dict -> Flax variables, through the explicit name map.

Every checkpoint tensor must be used exactly once, every Flax leaf filled exactly once, and
every shape must match; anything else is a ValueError that names the offending keys.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

import flax
import numpy as np
from absl import logging

from debiformer_jax import weights
from debiformer_jax.convert.backbone import backbone_state_dict
from debiformer_jax.convert.name_map import TRANSFORMS, name_map
from debiformer_jax.convert.reader import read_torch_state_dict
from debiformer_jax.models import PRESETS, Architecture, DeBiFormer, get_architecture

_SHOW = 12


def _listing(items) -> str:
  items = sorted(items)
  shown = ', '.join(items[:_SHOW])
  return shown + (f', ... ({len(items)} in all)' if len(items) > _SHOW else '')


def checkpoint_architecture(state_dict: Mapping[str, np.ndarray]) -> Optional[str]:
  """A short description (depths, widths, matching preset) of an official checkpoint."""
  depths: Dict[int, int] = {}
  for key in state_dict:
    m = re.match(r'stages\.(\d+)\.(\d+)\.', key)
    if m:
      s, b = int(m.group(1)), int(m.group(2))
      depths[s] = max(depths.get(s, 0), b + 1)
  widths = []
  for s in range(len(depths)):
    key = f'downsample_layers.{s}.{3 if s == 0 else 0}.weight'
    if key in state_dict:
      widths.append(int(state_dict[key].shape[0]))
  if not depths:
    return None
  d = tuple(depths[s] for s in sorted(depths))
  desc = f'depths={d}, widths={tuple(widths)}'
  same = [n for n, c in PRESETS.items() if c.depths == d and c.widths == tuple(widths)]
  return desc + (f' (that is {same[0]})' if same else '')


def convert_state_dict(state_dict: Mapping[str, np.ndarray], cfg: Architecture,
                       features_only: bool = False):
  """Flax variables {'params', 'batch_stats'} for `cfg` from an official state dict (numpy):
  the classifier's, or with `features_only` the dense backbone's (`name_map`)."""
  model = DeBiFormer(cfg, features_only=features_only)
  expected = flax.traverse_util.flatten_dict(weights.abstract_variables(model))
  entries = name_map(cfg, features_only)
  mapped_keys = [e.torch_key for e in entries]
  mapped_leaves = [(e.collection,) + e.path for e in entries]
  # The map itself must be one-to-one and cover the model exactly (a programming error if not).
  assert len(set(mapped_keys)) == len(mapped_keys), 'name map uses a checkpoint key twice'
  assert len(set(mapped_leaves)) == len(mapped_leaves), 'name map fills a Flax leaf twice'
  unfilled = set(expected) - set(mapped_leaves)
  unknown = set(mapped_leaves) - set(expected)
  assert not unfilled and not unknown, (f'name map out of step with the model: unfilled '
                                        f'{sorted(unfilled)[:5]}, unknown {sorted(unknown)[:5]}')

  keys = {k for k in state_dict if not k.endswith('num_batches_tracked')}
  missing = set(mapped_keys) - keys
  extra = keys - set(mapped_keys)
  problems = []
  if missing:
    problems.append(f'{len(missing)} tensor(s) the model needs are missing: {_listing(missing)}')
  if extra:
    problems.append(f'{len(extra)} tensor(s) in the checkpoint are not used: {_listing(extra)}')
  flat = {}
  bad_shapes = []
  for e in entries:
    if e.torch_key not in keys:
      continue
    value = TRANSFORMS[e.layout](np.asarray(state_dict[e.torch_key], dtype=np.float32))
    want = expected[(e.collection,) + e.path].shape
    if value.shape != tuple(want):
      bad_shapes.append(f'{e.torch_key} {tuple(state_dict[e.torch_key].shape)} -> '
                        f'{"/".join(e.path)} needs {tuple(want)}')
      continue
    flat[(e.collection,) + e.path] = value
  if bad_shapes:
    problems.append(f'{len(bad_shapes)} shape mismatch(es): ' + '; '.join(bad_shapes[:_SHOW])
                    + (f'; ... ({len(bad_shapes)} in all)' if len(bad_shapes) > _SHOW else ''))
  if problems:
    arch = checkpoint_architecture(state_dict)
    ours = f'depths={cfg.depths}, widths={cfg.widths}'
    hint = (f' The checkpoint has {arch}; the requested model has {ours}: pick the matching '
            f'--model (or model overrides).' if arch else '')
    raise ValueError('checkpoint does not match the model. ' + ' '.join(problems) + '.' + hint)
  return flax.traverse_util.unflatten_dict(flat)


def load_torch_checkpoint(path: str, model_name: str, *, ema: bool = False,
                          features_only: bool = False, **overrides):
  """Reads an official (or our reference's) PyTorch checkpoint as Flax variables.

  `model_name` is a preset name (`debiformer_tiny`, `debi_small`, ...); `overrides` replace
  config fields (e.g. depths for a reduced model). `ema=True` takes `model_ema`.
  `features_only`: variables of `create_model(model_name, features_only=True, **overrides)`
  from an official dense backbone, an mmsegmentation / mmdetection checkpoint or an ImageNet
  classifier (`backbone.backbone_state_dict`); what was ignored, left unused or initialised
  is logged as a warning.
  Returns {'params': ..., 'batch_stats': ...} of float32 numpy arrays.
  """
  cfg = get_architecture(model_name, backbone=features_only, **overrides)
  state_dict = read_torch_state_dict(path, ema=ema)
  if not features_only:
    return convert_state_dict(state_dict, cfg)
  backbone = backbone_state_dict(state_dict, cfg)
  if backbone.ignored or backbone.unused or backbone.initialised:
    logging.warning('%s %s', path, backbone.summary())
  return convert_state_dict(backbone.state_dict, cfg, features_only=True)

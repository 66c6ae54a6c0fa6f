"""The official dense backbone's state dict, from the checkpoints a backbone user has.

`backbone_state_dict(state_dict, cfg)` recognises three kinds by their tensor names:
  - the official dense backbone's own (segmentation/ or detection/debiformer.py, bare or in
    the training format): used as it is;
  - mmsegmentation / mmdetection (a `state_dict` whose backbone tensors are `backbone.*`): the
    prefix is dropped, and every other tensor (decode and auxiliary heads, necks, ...) is
    listed as ignored;
  - an ImageNet classifier: its final BatchNorm and head are listed as unused, and the
    per-stage LayerNorms it has no values for (`extra_norms.{i}.ln`) get PyTorch's LayerNorm
    initialisation (scale 1, bias 0), which is what the official backbone's
    `init_weights` (`load_state_dict(strict=False)`) silently leaves them at; they are listed.
What remains must then fit the backbone's name map exactly: `converter.convert_state_dict`
names every missing, unused or mis-shaped tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Tuple

import numpy as np

from debiformer_jax.convert.name_map import name_map
from debiformer_jax.models.architecture import Architecture

MMLAB_PREFIX = 'backbone.'
_SHOW = 12


def _listing(keys) -> str:
  keys = sorted(keys)
  return ', '.join(keys[:_SHOW]) + (f', ... ({len(keys)} in all)' if len(keys) > _SHOW else '')


@dataclasses.dataclass(frozen=True)
class BackboneStateDict:
  """A dense-backbone state dict (official names, numpy) and what was done to get it."""
  state_dict: Dict[str, np.ndarray]
  source: str  # What kind of checkpoint it came from.
  ignored: Tuple[str, ...] = ()  # Tensors of other model parts (mmseg / mmdet heads, necks).
  unused: Tuple[str, ...] = ()  # Classifier tensors a backbone has no place for.
  initialised: Tuple[str, ...] = ()  # Backbone tensors the checkpoint lacks, set to defaults.

  def summary(self) -> str:
    """One line per fact: the source, then what was ignored, unused and initialised."""
    lines = [f'read as {self.source}']
    if self.ignored:
      lines.append(f'ignored {len(self.ignored)} tensor(s) that are not part of the backbone: '
                   f'{_listing(self.ignored)}')
    if self.unused:
      lines.append(f'unused {len(self.unused)} classifier tensor(s) (final norm and head): '
                   f'{_listing(self.unused)}')
    if self.initialised:
      lines.append(f'initialised {len(self.initialised)} tensor(s) the checkpoint lacks, as '
                   f'PyTorch initialises a LayerNorm (scale 1, bias 0): '
                   f'{_listing(self.initialised)}')
    return '\n'.join(lines)


def backbone_state_dict(state_dict: Mapping[str, np.ndarray],
                        cfg: Architecture) -> BackboneStateDict:
  """The dense backbone's state dict for `cfg` out of any of the three kinds (module doc)."""
  state = dict(state_dict)
  source, ignored = 'an official dense-backbone state dict', ()
  if any(k.startswith(MMLAB_PREFIX) for k in state):
    source = f'an mmsegmentation / mmdetection checkpoint ({MMLAB_PREFIX}* tensors)'
    ignored = tuple(sorted(k for k in state if not k.startswith(MMLAB_PREFIX)))
    state = {k[len(MMLAB_PREFIX):]: v for k, v in state.items() if k.startswith(MMLAB_PREFIX)}
  classifier_only = {e.torch_key for e in name_map(cfg) if e.path[0] in ('norm', 'head')}
  norms = [e for e in name_map(cfg, features_only=True) if e.path[0].startswith('extra_norm')]
  if classifier_only & set(state) and not {e.torch_key for e in norms} & set(state):
    source = 'an ImageNet classifier checkpoint'
    unused = tuple(sorted(classifier_only & set(state)))
    width = {f'extra_norm{s}': w for s, w in enumerate(cfg.widths)}
    for e in norms:
      fill = np.ones if e.path[-1] == 'scale' else np.zeros
      state[e.torch_key] = fill((width[e.path[0]],), np.float32)
    state = {k: v for k, v in state.items() if k not in classifier_only}
    return BackboneStateDict(state, source, ignored, unused,
                             tuple(sorted(e.torch_key for e in norms)))
  return BackboneStateDict(state, source, ignored)

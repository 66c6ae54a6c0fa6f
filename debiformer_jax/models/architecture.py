"""The DeBiFormer architecture (`Architecture`) and the official presets.

Everything the official PyTorch code hard-codes is a field here. An architecture is a frozen
dataclass; `dataclasses.replace(arch, field=value)` makes a variant, and `validate()` says
what is wrong with one in words a user can act on.

Per-stage attention: each block holds two attentions. `attn1` is BRA or DBRA (per stage,
`attn1_deformable`), `attn2` is always DBRA. `topk1` / `topk2` are the number of routed
regions for them; -1 means "every region" (n_win**2), which is what the official stage
top-k entry -2 builds in the classifier (k=49 at n_win=7).

Input sizes: without `auto_pad` every stage map and deformable grid must split into
n_win x n_win regions (224, 448, ... for the classifiers). With `auto_pad` (the official dense
backbones, and the classifier at other resolutions) each attention pads its input at the
bottom/right to a multiple of n_win and crops its output, so any size works; where nothing
needs padding the computation is exactly the unpadded one.

`BACKBONE` holds what the official dense backbones (segmentation/ and detection/debiformer.py)
change: `get_architecture(name, backbone=True)`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from typing import Any, Tuple

IntTuple = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Architecture of one DeBiFormer. All tuples have one entry per stage."""

  depths: IntTuple = (1, 1, 4, 1)
  widths: IntTuple = (64, 128, 256, 512)
  mlp_ratios: IntTuple = (3, 3, 3, 3)
  head_dim: int = 32
  n_win: int = 7
  attn1_deformable: Tuple[bool, ...] = (False, False, False, True)
  topk1: IntTuple = (1, 4, 16, -1)
  topk2: IntTuple = (4, 8, 16, -1)
  offset_groups: IntTuple = (1, 2, 4, 8)
  offset_kernels: IntTuple = (9, 7, 5, 3)
  offset_strides: IntTuple = (8, 4, 2, 1)
  dbra_mlp_ratios: IntTuple = (3, 3, 3, 3)
  rpe_sizes: IntTuple = (56, 28, 14, 7)
  side_dwconv: int = 5
  pos_dwconv: int = 3
  in_chans: int = 3
  num_classes: int = 1000
  drop_path_rate: float = 0.0
  # Pad every attention's input to a multiple of n_win (bottom/right, zeros) and crop its
  # output, as the official `auto_pad=True`: any input size works.
  auto_pad: bool = False
  # A LayerNorm over channels (eps 1e-5) on every stage's output, as the official dense
  # backbones' `extra_norms`: the maps a backbone returns, and what the head reads.
  norm_outputs: bool = False

  @property
  def num_stages(self) -> int:
    return len(self.depths)

  @property
  def num_heads(self) -> IntTuple:
    return tuple(w // self.head_dim for w in self.widths)

  def stage_topk(self, k: int) -> int:
    """Resolves -1 ("all regions") to n_win**2."""
    return self.n_win ** 2 if k == -1 else k

  def drop_path_rates(self) -> Tuple[float, ...]:
    """Per-block stochastic-depth rates, linspace(0, rate, sum(depths)) as the official code."""
    n = sum(self.depths)
    if n == 1:
      return (0.0,)
    return tuple(self.drop_path_rate * i / (n - 1) for i in range(n))

  def validate(self) -> "Architecture":
    """Raises ValueError naming the offending field; returns self when fine."""
    n = self.num_stages
    per_stage = ('widths', 'mlp_ratios', 'attn1_deformable', 'topk1', 'topk2', 'offset_groups',
                 'offset_kernels', 'offset_strides', 'dbra_mlp_ratios', 'rpe_sizes')
    for f in per_stage:
      if len(getattr(self, f)) != n:
        raise ValueError(f'Architecture.{f} has {len(getattr(self, f))} entries but depths '
                         f'has {n}: give one entry per stage.')
    if any(d < 1 for d in self.depths):
      raise ValueError(f'Architecture.depths={self.depths}: every stage needs at least one block.')
    if self.n_win < 1:
      raise ValueError(f'Architecture.n_win={self.n_win} must be >= 1.')
    for s in range(n):
      w, g = self.widths[s], self.offset_groups[s]
      if w % self.head_dim:
        raise ValueError(f'stage {s}: width {w} is not a multiple of head_dim {self.head_dim}.')
      heads = w // self.head_dim
      if w % g or heads % g:
        raise ValueError(f'stage {s}: offset_groups {g} must divide both the width {w} and the '
                         f'number of heads {heads}.')
      if self.offset_kernels[s] % 2 != 1:
        raise ValueError(f'stage {s}: offset_kernels must be odd, got {self.offset_kernels[s]}.')
      for name in ('topk1', 'topk2'):
        k = getattr(self, name)[s]
        if k != -1 and not 1 <= k <= self.n_win ** 2:
          raise ValueError(f'stage {s}: {name}={k} must be -1 (all regions) or in '
                           f'[1, n_win**2={self.n_win ** 2}].')
    if self.widths[0] % 2:
      raise ValueError(f'widths[0]={self.widths[0]} must be even (the stem halves it).')
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f'drop_path_rate={self.drop_path_rate} must be in [0, 1).')
    for name in ('auto_pad', 'norm_outputs'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'Architecture.{name}={getattr(self, name)!r} must be True or False.')
    return self

  def stage_sizes(self, height: int, width: int) -> Tuple[Tuple[int, int], ...]:
    """Feature-map size of each stage for an input image (stem /4, then /2 per stage).

    Every conv here is 3x3, stride 2, padding 1, so a side of n becomes ceil(n / 2).
    """
    sizes = []
    h, w = -(-height // 4), -(-width // 4)
    for s in range(self.num_stages):
      if s > 0:
        h, w = -(-h // 2), -(-w // 2)
      sizes.append((h, w))
    return tuple(sizes)

  def padded(self, side: int) -> int:
    """`side` rounded up to a multiple of n_win (what auto_pad pads a map to)."""
    return side + (-side) % self.n_win

  def input_size_problems(self, height: int, width: int) -> Tuple[str, ...]:
    """Which stage maps or deformable grids of this input do not split into n_win regions
    (with auto_pad they are padded; the list says where padding happens).

    The deformable grid of a stage is ceil(side / offset_stride) per side (of the padded map
    with auto_pad).
    """
    problems = []
    pad = self.padded if self.auto_pad else (lambda side: side)
    for s, (h, w) in enumerate(self.stage_sizes(height, width)):
      r = self.offset_strides[s]
      grid = (-(-pad(h) // r), -(-pad(w) // r))
      for what, (a, b) in (('feature map', (h, w)), ('deformable grid', grid)):
        if a % self.n_win or b % self.n_win:
          problems.append(f'stage {s} {what} {a}x{b}')
    return tuple(problems)

  def valid_input_sizes(self, limit: int = 3) -> Tuple[int, ...]:
    """The smallest square input sides that split into regions at every stage (no padding)."""
    step = 2 ** (self.num_stages + 1)
    found, side = [], step
    while len(found) < limit and side < 100_000:
      if not self.input_size_problems(side, side):
        found.append(side)
      side += step
    return tuple(found)

  def smallest_input_size(self) -> int:
    """The smallest square side this model takes: with auto_pad the one that makes the last
    stage map 1x1 (2**(stages + 1)), else the smallest that splits into regions."""
    return 2 ** (self.num_stages + 1) if self.auto_pad else self.valid_input_sizes(1)[0]

  def check_input_size(self, height: int, width: int) -> None:
    """Raises ValueError, saying what to do, unless the model takes a height x width input."""
    if height < 1 or width < 1:
      raise ValueError(f'input {height}x{width} is empty: give images of at least 1x1 pixels.')
    if self.auto_pad:
      return
    problems = self.input_size_problems(height, width)
    if not problems:
      return
    ok = self.valid_input_sizes()
    fix = (f'Square sizes that work with this model include {", ".join(map(str, ok))}; resize '
           f'or crop the input to one of them, or set auto_pad=True (--config.model.auto_pad='
           f'True) to pad every attention\'s input as the official code does, so that any size '
           f'works.')
    if height < ok[0] or width < ok[0]:
      raise ValueError(f'input {height}x{width} is smaller than this model takes without '
                       f'padding: its stage maps must split into {self.n_win}x{self.n_win} '
                       f'regions, which needs at least {ok[0]}x{ok[0]}. {fix}')
    raise ValueError(
        f'input {height}x{width} does not split into {self.n_win}x{self.n_win} regions: '
        f'{", ".join(problems)} not divisible by n_win={self.n_win}. {fix}')


TINY = Architecture()
SMALL = Architecture(depths=(2, 2, 9, 3), mlp_ratios=(3, 3, 3, 2),
                         dbra_mlp_ratios=(3, 3, 3, 1), drop_path_rate=0.3)
BASE = Architecture(depths=(2, 2, 9, 2), widths=(96, 192, 384, 768),
                        offset_groups=(1, 2, 3, 6), drop_path_rate=0.4)

PRESETS = {
    'debiformer_tiny': TINY,
    'debiformer_small': SMALL,
    'debiformer_base': BASE,
}
# What the official dense backbones (segmentation/debiformer.py, class BiFormer and its
# debi_tiny|small|base) build differently from the classifier: n_win 8, auto_pad, a LayerNorm
# on every stage output; their stage top-k entry -2 builds k=49 as in the classifier, which at
# n_win 8 routes 49 of the 64 regions. Drop-path as their segmentation builders (tiny 0.1,
# small the default 0, base 0.4). (The detection builders use n_win 8, 16, 32 for tiny, small,
# base: override n_win.)
BACKBONE = dict(n_win=8, auto_pad=True, norm_outputs=True, topk1=(1, 4, 16, 49),
                topk2=(4, 8, 16, 49))
BACKBONE_DROP_PATH = {'debiformer_tiny': 0.1, 'debiformer_small': 0.0, 'debiformer_base': 0.4}

# The names the official code registers with timm.
ALIASES = {'debi_tiny': 'debiformer_tiny', 'debi_small': 'debiformer_small',
           'debi_base': 'debiformer_base'}


def get_architecture(name: str, backbone: bool = False, **overrides) -> Architecture:
  """The preset called `name` (ours or the official alias) with fields replaced by `overrides`;
  with `backbone`, the official dense backbone of that variant (`BACKBONE`)."""
  canonical = ALIASES.get(name, name)
  if canonical not in PRESETS:
    known = sorted(PRESETS) + sorted(ALIASES)
    raise ValueError(f'unknown model name {name!r}; known models: {", ".join(known)}.')
  fields = {f.name for f in dataclasses.fields(Architecture)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'unknown model field(s) {unknown}; Architecture fields are: '
                     f'{", ".join(sorted(fields))}.')
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  if backbone:
    overrides = {**BACKBONE, 'drop_path_rate': BACKBONE_DROP_PATH[canonical], **overrides}
  return dataclasses.replace(PRESETS[canonical], **overrides).validate()


def parse_override(text: str) -> Tuple[str, Any]:
  """'depths=(1,1,1,1)' -> ('depths', (1, 1, 1, 1)): a command-line config-field override
  (argparse `type=`; errors are ArgumentTypeErrors, which argparse prints with the flag)."""
  name, sep, value = text.partition('=')
  if not sep:
    raise argparse.ArgumentTypeError(f'expected FIELD=VALUE, got {text!r}')
  try:
    return name.strip(), ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    raise argparse.ArgumentTypeError(f'{text!r}: {value!r} is not a Python literal '
                                     f'(e.g. depths=(1,1,1,1) or num_classes=10)')


def parse_size(text: str) -> Tuple[int, int]:
  """'512x683' -> (512, 683) and '512' -> (512, 512): an input height x width on a command
  line (argparse `type=`)."""
  parts = text.lower().split('x')
  if len(parts) > 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
    raise argparse.ArgumentTypeError(f'{text!r} is not a size: give HEIGHTxWIDTH (e.g. 512x683) '
                                     f'or one side (e.g. 512) in pixels')
  return int(parts[0]), int(parts[-1])

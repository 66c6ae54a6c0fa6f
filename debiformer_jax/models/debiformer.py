"""DeBiFormer: stem, four stages of blocks, then BatchNorm, mean pool and a linear head (the
classifier), or the stage maps (a backbone, `features_only`).

Input (N, H, W, 3) NHWC float images; output (N, num_classes) logits, or a tuple of NHWC maps.
Variables are `{'params', 'batch_stats'}`; `train=True` uses batch statistics and stochastic
depth (rng stream 'dropout').
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from debiformer_jax.models.architecture import Architecture, get_architecture
from debiformer_jax.models.attention import BRA, DBRA
from debiformer_jax.models.implementation import REMAT_POLICIES, Implementation
from debiformer_jax.models.layers import (Conv, ConvMLP, Dense, DepthwiseConv, DropPath,
                                          batch_norm, gelu, layer_norm)

Dtype = Any


class Block(nn.Module):
  """x += dw(x); x += attn1(LN1 x); x += mlp1(LN2 x);
  x += dw'(x); x += attn2(LN3 x); x += mlp2(LN4 x)."""
  config: Architecture
  stage: int
  drop_path: float
  impl: Implementation  # Resolved (no 'auto').
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg, s, impl = self.config, self.stage, self.impl
    common = dict(num_heads=cfg.num_heads[s], n_win=cfg.n_win, side_dwconv=cfg.side_dwconv,
                  auto_pad=cfg.auto_pad, impl=impl, dtype=self.dtype)

    def dbra(topk, name):
      return DBRA(topk=cfg.stage_topk(topk), groups=cfg.offset_groups[s],
                  offset_kernel=cfg.offset_kernels[s], stride=cfg.offset_strides[s],
                  mlp_ratio=cfg.dbra_mlp_ratios[s], rpe_size=cfg.rpe_sizes[s], name=name,
                  **common)

    if cfg.attn1_deformable[s]:
      attn1 = dbra(cfg.topk1[s], 'attn1')
    else:
      attn1 = BRA(topk=cfg.stage_topk(cfg.topk1[s]), name='attn1', **common)
    attn2 = dbra(cfg.topk2[s], 'attn2')
    drop = DropPath(self.drop_path)

    def dwconv(name):
      return DepthwiseConv(cfg.pos_dwconv, dwconv=impl.dwconv, dtype=self.dtype, name=name)

    def mlp(name):
      return ConvMLP(cfg.mlp_ratios[s], impl.dwconv, self.dtype, name=name)

    x = x + dwconv('pos_embed1')(x)
    x = x + drop(attn1(layer_norm(1e-6, self.dtype, 'norm1')(x)), train)
    x = x + drop(mlp('mlp1')(layer_norm(1e-6, self.dtype, 'norm2')(x)), train)
    x = x + dwconv('pos_embed2')(x)
    x = x + drop(attn2(layer_norm(1e-6, self.dtype, 'norm3')(x)), train)
    x = x + drop(mlp('mlp2')(layer_norm(1e-6, self.dtype, 'norm4')(x)), train)
    return x


class FeatureInfo(tuple):
  """What a backbone returns, in output order, in the style of timm's `feature_info`: one dict
  per map with 'num_chs' (channels), 'reduction' (4, 8, 16, 32: the map of an H x W input is
  ceil(H / reduction) x ceil(W / reduction)) and 'stage' (its stage index)."""

  def channels(self) -> list:
    return [f['num_chs'] for f in self]

  def reduction(self) -> list:
    return [f['reduction'] for f in self]


class DeBiFormer(nn.Module):
  """DeBiFormer: the classifier, or with `features_only` a backbone. Parameters in float32;
  activations in `dtype`.

  `impl` says how it is computed (`Implementation`; 'auto' fields are resolved per backend
  when the model is called), never what. `features_only`: no final BatchNorm and no head;
  `__call__` returns the stage maps of `out_indices` (None: every stage), described by
  `feature_info`. `forward_features` gives every stage map of either kind.

  Parameter tree: `stem_conv1`, `stem_bn1`, `stem_conv2`, `stem_bn2`, then
  `downsample{s}_conv`, `downsample{s}_bn` for s >= 1, `stage{s}_block{b}` (Block),
  `extra_norm{s}` (LayerNorm, with norm_outputs), and unless features_only `norm` (BatchNorm)
  and `head` (Dense).
  """
  config: Architecture
  impl: Implementation = Implementation()
  dtype: Dtype = jnp.float32
  features_only: bool = False
  out_indices: Optional[Tuple[int, ...]] = None

  def __post_init__(self):
    if self.out_indices is not None:
      _check_out_indices(self.out_indices, self.config.num_stages, self.features_only)
    super().__post_init__()

  @property
  def feature_info(self) -> FeatureInfo:
    """The maps `__call__` returns with features_only (channels, reduction, stage)."""
    stages = self.out_indices if self.out_indices is not None else range(self.config.num_stages)
    return FeatureInfo({'num_chs': self.config.widths[s], 'reduction': 2 ** (s + 2), 'stage': s}
                       for s in stages)

  def __call__(self, x, train: bool = False):
    """x: (N, H, W, in_chans) float images, normalised as in training. Returns float32 logits
    (N, num_classes); with features_only a tuple of the `feature_info` maps, NHWC."""
    if not self.features_only:
      return self._forward(x, train, head=True)
    maps = self._forward(x, train, head=False)
    return tuple(maps[f['stage']] for f in self.feature_info)

  def forward_features(self, x, train: bool = False):
    """Every stage's output map (a tuple, NHWC, in stage order; LayerNorm'ed with
    norm_outputs), without the head: `model.apply(variables, x, method='forward_features')`.
    The classifier's head reads the last one."""
    return self._forward(x, train, head=False)

  @nn.compact
  def _forward(self, x, train: bool, head: bool):
    """Stem, stages (and per-stage norms); then the head's logits, or the stage maps."""
    cfg = self.config
    check_images(x, cfg)
    x = x.astype(self.dtype)
    rates = cfg.drop_path_rates()
    impl = self.impl.resolve()
    block_cls = Block
    if impl.remat:
      block_cls = nn.remat(Block, static_argnums=(2,), policy=REMAT_POLICIES[impl.remat_policy])
    maps, index = [], 0
    for s in range(cfg.num_stages):
      x = self._downsample(x, s, train)
      for b in range(cfg.depths[s]):
        x = block_cls(cfg, s, rates[index], impl, self.dtype,
                      name=f'stage{s}_block{b}')(x, train)
        index += 1
      maps.append(layer_norm(1e-5, self.dtype, f'extra_norm{s}')(x) if cfg.norm_outputs else x)
    if not head:
      return tuple(maps)
    x = batch_norm(train, self.dtype, 'norm')(maps[-1])
    logits = Dense(cfg.num_classes, dtype=self.dtype, name='head')(x.mean(axis=(1, 2)))
    return logits.astype(jnp.float32)

  def _downsample(self, x, s, train):
    """Stage 0: the stem (conv s2, BN, GELU, conv s2, BN); later stages: conv s2 + BN."""
    width = self.config.widths[s]
    if s == 0:
      x = Conv(width // 2, 3, 2, self.dtype, name='stem_conv1')(x)
      x = gelu(batch_norm(train, self.dtype, 'stem_bn1')(x))
      x = Conv(width, 3, 2, self.dtype, name='stem_conv2')(x)
      return batch_norm(train, self.dtype, 'stem_bn2')(x)
    x = Conv(width, 3, 2, self.dtype, name=f'downsample{s}_conv')(x)
    return batch_norm(train, self.dtype, f'downsample{s}_bn')(x)


def check_images(x, cfg: Architecture) -> None:
  """Raises, saying what to do, unless x is a batch of NHWC float images the model takes."""
  shape, c = tuple(x.shape), cfg.in_chans
  want = f'expected NHWC images (N, H, W, {c})'
  if len(shape) != 4:
    hint = (': one image? add a batch axis (x[None])' if len(shape) == 3 and shape[-1] == c
            else '')
    raise ValueError(f'{want}, got an array of shape {shape}{hint}.')
  if shape[-1] != c:
    if shape[1] == c:
      raise ValueError(f'{want}, got shape {shape}, which looks like NCHW (N, C, H, W): '
                       f'transpose it with x.transpose(0, 2, 3, 1).')
    raise ValueError(f'{want}, got shape {shape}: the last axis must hold the {c} channels.')
  if shape[0] == 0:
    raise ValueError(f'got a batch of 0 images (shape {shape}): give at least one image.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'expected float images normalised as in training ((pixels / 255 - mean) / '
                    f'std with the ImageNet mean and std), got {x.dtype}: raw 0-255 pixels give '
                    f'confident nonsense. Normalise them first, e.g. (x / 255 - mean) / std in '
                    f'float32.')
  cfg.check_input_size(shape[1], shape[2])


def _check_out_indices(out_indices, num_stages: int, features_only: bool) -> None:
  """Raises ValueError, saying what to do, unless out_indices are stages a backbone returns."""
  if not features_only:
    raise ValueError(f'out_indices={out_indices} selects the maps a backbone returns: use it with '
                     f'features_only=True (a classifier returns logits; its stage maps come '
                     f'from forward_features).')
  stages = tuple(range(num_stages))
  if not out_indices or any(not isinstance(i, int) or i not in stages for i in out_indices):
    raise ValueError(f'out_indices={out_indices}: give one or more stage indices out of '
                     f'{stages} (this model has {num_stages} stages).')
  if list(out_indices) != sorted(set(out_indices)):
    raise ValueError(f'out_indices={out_indices} must be increasing, without repeats: the maps '
                     f'come back in stage order.')


def create_model(name: str, *, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None, dtype: Dtype = jnp.float32,
                 impl: Implementation | None = None, **overrides) -> DeBiFormer:
  """The named DeBiFormer (`debiformer_tiny|small|base` or the official `debi_*`).

  `overrides` replace Architecture fields (widths, depths, n_win, auto_pad, num_classes, ...);
  `dtype` is the compute dtype (parameters stay float32). `features_only`: the official dense
  backbone of that variant (`architecture.BACKBONE`: n_win 8, auto_pad, a LayerNorm on every
  stage output, no final BatchNorm or head; each of these can be overridden too), returning
  the maps of `out_indices` (stage indices, default all).
  """
  cfg = get_architecture(name, backbone=features_only, **overrides)
  indices = None if out_indices is None else tuple(out_indices)
  return DeBiFormer(cfg, impl or Implementation(), dtype, features_only, indices)

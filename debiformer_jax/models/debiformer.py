"""The DeBiFormer classifier: stem, four stages of blocks, BatchNorm, mean pool, linear head.

Input (N, H, W, 3) NHWC images; output (N, num_classes) logits. Variables are
`{'params', 'batch_stats'}`; `train=True` uses batch statistics and stochastic depth (rng
stream 'dropout').
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from debiformer_jax.models.architecture import Architecture, get_architecture
from debiformer_jax.models.attention import BRA, DBRA
from debiformer_jax.models.implementation import REMAT_POLICIES, Implementation
from debiformer_jax.models.layers import (Conv, ConvMLP, Dense, DepthwiseConv, DropPath,
                                          batch_norm, gelu, layer_norm)

Dtype = Any


class Block(nn.Module):
  """x += dw(x); x += attn1(LN1 x); x += mlp1(LN2 x); x += dw'(x); x += attn2(LN3 x); x += mlp2(LN4 x)."""
  config: Architecture
  stage: int
  drop_path: float
  impl: Implementation  # Resolved (no 'auto').
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg, s, impl = self.config, self.stage, self.impl
    common = dict(num_heads=cfg.num_heads[s], n_win=cfg.n_win, side_dwconv=cfg.side_dwconv,
                  impl=impl, dtype=self.dtype)

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


class DeBiFormer(nn.Module):
  """DeBiFormer classifier. Parameters in float32; activations in `dtype`.

  `impl` says how it is computed (`Implementation`; 'auto' fields are resolved per backend
  when the model is called), never what.

  Parameter tree: `stem_conv1`, `stem_bn1`, `stem_conv2`, `stem_bn2`, then
  `downsample{s}_conv`, `downsample{s}_bn` for s >= 1, `stage{s}_block{b}` (Block), `norm`
  (BatchNorm), `head` (Dense).
  """
  config: Architecture
  impl: Implementation = Implementation()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_stages: bool = False):
    """x: (N, H, W, in_chans). Returns logits, or (logits, [stage outputs NHWC]) if asked."""
    cfg = self.config
    if x.ndim != 4 or x.shape[-1] != cfg.in_chans:
      raise ValueError(f'expected NHWC images (N, H, W, {cfg.in_chans}), got shape {x.shape}.')
    cfg.check_input_size(x.shape[1], x.shape[2])
    x = x.astype(self.dtype)
    rates = cfg.drop_path_rates()
    impl = self.impl.resolve()
    block_cls = Block
    if impl.remat:
      block_cls = nn.remat(Block, static_argnums=(2,), policy=REMAT_POLICIES[impl.remat_policy])
    stages, index = [], 0
    for s in range(cfg.num_stages):
      x = self._downsample(x, s, train)
      for b in range(cfg.depths[s]):
        x = block_cls(cfg, s, rates[index], impl, self.dtype,
                      name=f'stage{s}_block{b}')(x, train)
        index += 1
      stages.append(x)
    x = batch_norm(train, self.dtype, 'norm')(x)
    logits = Dense(cfg.num_classes, dtype=self.dtype, name='head')(x.mean(axis=(1, 2)))
    logits = logits.astype(jnp.float32)
    return (logits, stages) if return_stages else logits

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


def create_model(name: str, *, dtype: Dtype = jnp.float32,
                 impl: Implementation | None = None, **overrides) -> DeBiFormer:
  """The named DeBiFormer (`debiformer_tiny|small|base` or the official `debi_*`).

  `overrides` replace Architecture fields (widths, depths, n_win, num_classes, ...);
  `dtype` is the compute dtype (parameters stay float32).
  """
  return DeBiFormer(get_architecture(name, **overrides), impl or Implementation(), dtype)

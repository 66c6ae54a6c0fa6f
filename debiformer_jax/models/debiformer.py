"""The DeBiFormer classifier: stem, four stages of blocks, BatchNorm, mean pool, linear head.

Input (N, H, W, 3) NHWC images; output (N, num_classes) logits. Variables are
`{'params', 'batch_stats'}`; `train=True` uses batch statistics and stochastic depth (rng
stream 'dropout').
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from debiformer_jax.models.attention import BRA, DBRA
from debiformer_jax.models.config import DeBiFormerConfig, get_config
from debiformer_jax.models.layers import (Conv, ConvMLP, Dense, DepthwiseConv, DropPath,
                                          batch_norm, gelu, layer_norm)

Dtype = Any


_DENSE = jax.checkpoint_policies.save_only_these_names('dense')  # Dense outputs (custom VJP)
REMAT_POLICIES = {
    # Keep the outputs of matmuls without batch dimensions (every Dense / 1x1 conv, the
    # convs) and recompute the rest (norms, GELU, depthwise convs, attention logits/softmax).
    'dots_no_batch': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _DENSE),
    # Keep every matmul output, the attention logits included.
    'dots': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, _DENSE),
    # Keep nothing: recompute the whole block.
    'nothing': jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class Implementation:
  """How the model is computed; every choice gives the same numbers (tested).

  dwconv: 'shifted' (sum of shifted multiplies) or 'grouped' (XLA feature-grouped conv).
  sampling: 'gather' (corner gathers) or 'matmul' (separable interpolation matrices), for
    the deformable features and the relative-position bias.
  region_gather: 'take' (indexing) or 'onehot' (one-hot matmul): how routed key regions are
    gathered where they are gathered.
  dense_routing: routed attention whose dense form has at most this many logits per image and
    head is computed densely with the top-k regions as a mask (no gather at all); 0 = never.
    (At 224: DBRA's routed attention has 49 deformable queries, i.e. 154k logits at stage 0,
    38k at stage 1; BRA has 615k at stage 1 and 38k at stage 2.)
  remat: recompute each block in the backward pass (saves activation memory), keeping what
    `remat_policy` (a key of REMAT_POLICIES) says.
  'auto' (the default) picks per backend, see `for_backend`; `resolve` fills them in.
  """
  dwconv: str = 'auto'
  sampling: str = 'auto'
  region_gather: str = 'auto'
  dense_routing: Union[int, str] = 'auto'
  remat: bool = False
  remat_policy: str = 'dots_no_batch'

  @classmethod
  def for_backend(cls, backend: str | None = None) -> 'Implementation':
    """The measured (CPU) or reasoned (TPU, GPU) best choice for a backend; see BACKEND_DEFAULTS.

    The same in training and inference: no measurement favoured another choice in either.
    """
    backend = backend or jax.default_backend()
    return cls(**BACKEND_DEFAULTS.get(backend, BACKEND_DEFAULTS['cpu']))

  def resolve(self, backend: str | None = None) -> 'Implementation':
    """This implementation with every 'auto' replaced by the backend's default; checked."""
    best = Implementation.for_backend(backend)
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    fields = {k: getattr(best, k) if v == 'auto' else v for k, v in fields.items()}
    out = Implementation(**fields)
    for name, ok in (('dwconv', ('shifted', 'grouped')), ('sampling', ('gather', 'matmul')),
                     ('region_gather', ('take', 'onehot')), ('remat_policy', tuple(REMAT_POLICIES))):
      if getattr(out, name) not in ok:
        raise ValueError(f'Implementation.{name}={getattr(out, name)!r}; choose one of {ok} or '
                         f"'auto'.")
    if not isinstance(out.dense_routing, int) or out.dense_routing < 0:
      raise ValueError(f'Implementation.dense_routing={out.dense_routing!r} must be an int >= 0 '
                       f"or 'auto'.")
    return out


# Per backend. CPU numbers: DeBiFormer-T, batch 8, 224, float32, 2-core AMD EPYC
# (Zen 4) with XLA:CPU, medians measured side by side in one process (docs/performance.md).
#  - dwconv 'shifted': XLA:CPU runs feature-grouped convs as slow generic loops (stage-0 MLP
#    3x3 dwconv on 8x56x56x192: grouped 125 ms fwd / 430 ms fwd+bwd, shifted 6 ms / 20 ms
#    with its custom VJP). TPU and GPU have native depthwise convolutions: 'grouped'.
#  - sampling: on CPU the gathers are cheap forward (stage-0 rpe bias 12 ms vs 66 ms for the
#    separable matmuls), and with the rpe bias read as one table window per point their
#    backward (a window scatter-add) no longer loses: whole train step 1.99 s 'gather' vs
#    2.23 s 'matmul'. 'gather' in both modes. TPUs run gathers and scatters poorly and matmuls
#    well; GPUs would serialise the scatter-add on atomics into a 111x111 table: 'matmul'
#    there (not measured: no accelerator was lent to this project).
#  - dense_routing: dense masked routing removes the gather of duplicated key regions and
#    its transposes; on CPU it wins wherever the dense logits are few (DBRA everywhere, BRA at
#    stage 2): limit 2**18 (train step 1.99 s; never dense 2.67 s; 2**20 2.08 s). On TPU the
#    MXU makes the extra dense work cheap and gathers are expensive: 2**20 also takes stage-1
#    BRA; stage-0 BRA (9.8M logits) keeps a one-hot gather.
#  - region_gather: 'take' on CPU/GPU (a real gather is cheap there: train step 1.99 s vs
#    2.04 s one-hot); 'onehot' on TPU.
_CPU = dict(dwconv='shifted', sampling='gather', region_gather='take', dense_routing=2 ** 18)
_TPU = dict(dwconv='grouped', sampling='matmul', region_gather='onehot', dense_routing=2 ** 20)
_GPU = dict(dwconv='grouped', sampling='matmul', region_gather='take', dense_routing=2 ** 18)
BACKEND_DEFAULTS = {'cpu': _CPU, 'tpu': _TPU, 'gpu': _GPU, 'cuda': _GPU, 'rocm': _GPU}


class Block(nn.Module):
  """x += dw(x); x += attn1(LN1 x); x += mlp1(LN2 x); x += dw'(x); x += attn2(LN3 x); x += mlp2(LN4 x)."""
  config: DeBiFormerConfig
  stage: int
  drop_path: float
  impl: Implementation
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg, s, impl = self.config, self.stage, self.impl.resolve()
    common = dict(num_heads=cfg.num_heads[s], n_win=cfg.n_win, side_dwconv=cfg.side_dwconv,
                  dwconv_impl=impl.dwconv, gather_impl=impl.region_gather,
                  dense_routing=impl.dense_routing, dtype=self.dtype)

    def dbra(topk, name):
      return DBRA(topk=cfg.stage_topk(topk), groups=cfg.offset_groups[s],
                  offset_kernel=cfg.offset_kernels[s], stride=cfg.offset_strides[s],
                  mlp_ratio=cfg.dbra_mlp_ratios[s], rpe_size=cfg.rpe_sizes[s],
                  sample_impl=impl.sampling, name=name, **common)

    if cfg.attn1_deformable[s]:
      attn1 = dbra(cfg.topk1[s], 'attn1')
    else:
      attn1 = BRA(topk=cfg.stage_topk(cfg.topk1[s]), name='attn1', **common)
    attn2 = dbra(cfg.topk2[s], 'attn2')
    drop = DropPath(self.drop_path)

    def dwconv(name):
      return DepthwiseConv(cfg.pos_dwconv, impl=impl.dwconv, dtype=self.dtype, name=name)

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
  config: DeBiFormerConfig
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

  `overrides` replace DeBiFormerConfig fields (widths, depths, n_win, num_classes, ...);
  `dtype` is the compute dtype (parameters stay float32).
  """
  return DeBiFormer(get_config(name, **overrides), impl or Implementation(), dtype)

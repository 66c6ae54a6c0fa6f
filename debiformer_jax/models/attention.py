"""BRA (bi-level routing attention) and DBRA (deformable bi-level routing attention).

Both take and return NHWC maps whose sides divide into `n_win` regions. The attention scale
is qk_dim**-0.5 with qk_dim = C, the full width, as the official code (not the head width).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from debiformer_jax.models import routing
from debiformer_jax.models.layers import ConvMLP, Dense, DepthwiseConv, gelu, layer_norm
from debiformer_jax.models.sampling import get_sampler

Dtype = Any


class BRA(nn.Module):
  """Bi-level routing attention on (N, H, W, C).

  One linear gives q, k, v; region means of q and k route each query region to its `topk`
  key regions; tokens attend to the gathered tokens; a depthwise conv of v (LCE) is added
  before the output linear.
  """
  num_heads: int
  n_win: int
  topk: int
  side_dwconv: int = 5
  dwconv_impl: str = 'shifted'
  gather_impl: str = 'take'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    p, scale = self.n_win, c ** -0.5
    qkv = Dense(3 * c, dtype=self.dtype, name='qkv')(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    lepe = DepthwiseConv(self.side_dwconv, impl=self.dwconv_impl, dtype=self.dtype,
                         name='lepe')(v)
    q_reg, kv_reg = routing.to_regions(q, p), routing.to_regions(jnp.concatenate([k, v], -1), p)
    keys, values = _routed_kv(q_reg.mean(2), kv_reg, self.topk, scale, self.gather_impl)
    out = routing.multihead_attention(q_reg, keys, values, self.num_heads, scale)
    out = routing.from_regions(out, p, h, w) + lepe
    return Dense(c, dtype=self.dtype, name='wo')(out)


def _routed_kv(q_region_means, kv_reg, topk, scale, gather_impl):
  """Keys and values each query region attends to: (N, R or 1, L, C) each.

  With topk equal to the number of regions every region sees every token: no routing or
  gather at all, one shared key set (attention does not depend on key order).
  """
  n, r, t, c2 = kv_reg.shape
  c = c2 // 2
  if topk == r:
    kv = kv_reg.reshape(n, 1, r * t, c2)
  else:
    idx = routing.route(q_region_means, kv_reg[..., :c].mean(2), topk, scale)
    kv = routing.gather_regions(kv_reg, idx, gather_impl)
  return kv[..., :c], kv[..., c:]


class DBRA(nn.Module):
  """Deformable bi-level routing attention on (N, H, W, C).

  Shapes: Hk = ceil(H / stride) × Wk deformable points, G offset groups, m heads.
  1. q, k, v = 1x1 conv of x.
  2. Per group g (channels (g c), g major): offset = 1x1(GELU(LN(dwconv_kk_stride(q_g)))) with
     ONE output channel, added to both y and x of the reference grid ((i+0.5)/Hk*2-1);
     positions clamped to [-1, 1].
  3. x̃ = bilinear sample of x per group at the positions (align_corners=True, zero padding).
  4. Deformable queries proj_q(x̃) route (region means) to full-resolution k regions and attend
     to the gathered k, v; plus LCE (depthwise conv of v with the same stride).
  5. o = x̃ + unifyheads(...); o = o + mlp(mlp_norm(o)); o = out_norm(o).
  6. Every full-resolution query attends to all Hk*Wk tokens proj_k(o), proj_v(o) with a
     relative-position bias sampled from `rpe_table` (per head, at (q_pos - pos) / 2 with the
     positions of the head's group), then proj_out.
  """
  num_heads: int
  n_win: int
  topk: int
  groups: int
  offset_kernel: int
  stride: int
  mlp_ratio: int
  rpe_size: int
  side_dwconv: int = 5
  dwconv_impl: str = 'shifted'
  gather_impl: str = 'take'
  sample_impl: str = 'gather'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    p, g, scale = self.n_win, self.groups, c ** -0.5
    cg, heads = c // self.groups, self.num_heads
    sample = get_sampler(self.sample_impl)

    qkv = Dense(3 * c, dtype=self.dtype, name='qkv')(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)

    # Offsets per group, shared weights across groups.
    q_groups = _split_groups(q, g)  # (N*G, H, W, Cg)
    off = DepthwiseConv(self.offset_kernel, stride=self.stride, use_bias=False,
                        impl=self.dwconv_impl, dtype=self.dtype, name='offset_dwconv')(q_groups)
    off = gelu(layer_norm(1e-5, self.dtype, 'offset_norm')(off))
    off = Dense(1, use_bias=False, dtype=self.dtype, name='offset_proj')(off)  # (N*G, Hk, Wk, 1)
    hk, wk = off.shape[1], off.shape[2]
    pos = jnp.clip(_reference_points(hk, wk) + off.astype(jnp.float32), -1.0, 1.0)
    pos = pos.reshape(n * g, hk * wk, 2)  # (y, x) per group

    x_tilde = sample(_split_groups(x, g).astype(jnp.float32), pos).astype(self.dtype)
    x_tilde = _merge_groups(x_tilde.reshape(n * g, hk, wk, cg), g)  # (N, Hk, Wk, C)

    # Bi-level routing attention of the deformable queries over the full-resolution k, v.
    q_def = routing.to_regions(Dense(c, dtype=self.dtype, name='proj_q')(x_tilde), p)
    kv_reg = routing.to_regions(jnp.concatenate([k, v], -1), p)
    keys, values = _routed_kv(q_def.mean(2), kv_reg, self.topk, scale, self.gather_impl)
    out = routing.multihead_attention(q_def, keys, values, heads, scale)
    lepe = DepthwiseConv(self.side_dwconv, stride=self.stride, impl=self.dwconv_impl,
                         dtype=self.dtype, name='lepe')(v)
    out = routing.from_regions(out, p, hk, wk) + lepe
    o = x_tilde + Dense(c, dtype=self.dtype, name='unifyheads')(out)
    o = o + ConvMLP(self.mlp_ratio, self.dwconv_impl, self.dtype, name='mlp')(
        layer_norm(1e-6, self.dtype, 'mlp_norm')(o))
    o = layer_norm(1e-6, self.dtype, 'out_norm')(o)

    # Every full-resolution query attends to all deformable tokens, with relative-position bias.
    k2 = Dense(c, dtype=self.dtype, name='proj_k')(o).reshape(n, hk * wk, c)
    v2 = Dense(c, dtype=self.dtype, name='proj_v')(o).reshape(n, hk * wk, c)
    rpe_table = self.param('rpe_table', nn.initializers.truncated_normal(0.01),
                           (heads, 2 * self.rpe_size - 1, 2 * self.rpe_size - 1))
    bias = _rpe_bias(rpe_table, pos.reshape(n, g, hk * wk, 2), h, w, sample)
    out = routing.multihead_attention(q.reshape(n, h * w, c), k2, v2, heads, scale, bias)
    return Dense(c, dtype=self.dtype, name='proj_out')(out.reshape(n, h, w, c))


def _split_groups(x, g):
  """(N, H, W, G*Cg) -> (N*G, H, W, Cg), channel groups g-major as the official '(g c)'."""
  n, h, w, c = x.shape
  return x.reshape(n, h, w, g, c // g).transpose(0, 3, 1, 2, 4).reshape(n * g, h, w, c // g)


def _merge_groups(x, g):
  """(N*G, H, W, Cg) -> (N, H, W, G*Cg); the inverse of `_split_groups`."""
  ng, h, w, cg = x.shape
  return x.reshape(ng // g, g, h, w, cg).transpose(0, 2, 3, 1, 4).reshape(ng // g, h, w, g * cg)


def _reference_points(hk, wk):
  """(Hk, Wk, 2) pixel-centre reference grid (y, x) in [-1, 1]: ((i + 0.5) / Hk) * 2 - 1."""
  ys = (jnp.arange(hk, dtype=jnp.float32) + 0.5) / hk * 2.0 - 1.0
  xs = (jnp.arange(wk, dtype=jnp.float32) + 0.5) / wk * 2.0 - 1.0
  return jnp.stack(jnp.meshgrid(ys, xs, indexing='ij'), axis=-1)


def _query_grid(h, w):
  """(H*W, 2) align-corners grid (y, x) of the full-resolution queries: i / (H - 1) * 2 - 1."""
  ys = jnp.arange(h, dtype=jnp.float32) / max(h - 1, 1) * 2.0 - 1.0
  xs = jnp.arange(w, dtype=jnp.float32) / max(w - 1, 1) * 2.0 - 1.0
  return jnp.stack(jnp.meshgrid(ys, xs, indexing='ij'), axis=-1).reshape(h * w, 2)


def _rpe_bias(table, pos, h, w, sample):
  """Relative-position bias (N, heads, H*W, Ns) from the table (heads, 2q-1, 2q-1).

  pos: (N, G, Ns, 2) deformable positions per group; head m belongs to group m // (heads/G).
  The table is sampled (align_corners=True) at (query_grid - pos) * 0.5.
  """
  n, g, ns, _ = pos.shape
  heads, th, tw = table.shape
  disp = (_query_grid(h, w)[None, None, :, None, :] - pos[:, :, None, :, :]) * 0.5
  disp = disp.transpose(1, 0, 2, 3, 4).reshape(g, n * h * w * ns, 2)  # (G, P, 2)
  tables = table.reshape(g, heads // g, th, tw).transpose(0, 2, 3, 1)  # (G, th, tw, heads/G)
  bias = sample(tables, disp)  # (G, P, heads/G)
  bias = bias.reshape(g, n, h * w, ns, heads // g).transpose(1, 0, 4, 2, 3)
  return bias.reshape(n, heads, h * w, ns)

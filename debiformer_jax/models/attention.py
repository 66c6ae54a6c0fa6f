"""BRA (bi-level routing attention) and DBRA (deformable bi-level routing attention).

Both take and return NHWC maps. Without `auto_pad` the sides must divide into `n_win`
regions; with it each module pads its input as the official `auto_pad=True` does (zeros at the
bottom/right up to multiples of n_win, `pad_to_regions`), computes on the padded map and crops
its output (`crop_to`); nothing is padded or cropped where the sides already divide. The
attention scale is qk_dim**-0.5 with qk_dim = C, the full width, as the official code (not the
head width).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax

from debiformer_jax.models import routing
from debiformer_jax.models.implementation import Implementation
from debiformer_jax.models.layers import ConvMLP, Dense, DepthwiseConv, gelu, layer_norm
from debiformer_jax.models.sampling import bilinear_sample, get_sampler, interpolation_matrix

Dtype = Any


class RoutedAttention(nn.Module):
  """What BRA and DBRA share: heads, an n_win x n_win region split, `topk` routed regions,
  the LCE depthwise-conv size, auto_pad, the (resolved) Implementation and the compute dtype."""
  num_heads: int
  n_win: int
  topk: int
  side_dwconv: int
  auto_pad: bool
  impl: Implementation
  dtype: Dtype

  def capture(self, name: str, value_fn) -> None:
    """Sows value_fn() into 'intermediates' only when the caller asked for that collection
    (`mutable=['intermediates']`); otherwise nothing is computed, so the forward is unchanged.

    Names: 'r_idx' (N, n_win**2, topk) routed key regions in descending score order; DBRA's
    'pos' (N, G, Hk, Wk, 2) clamped deformable positions (y, x), align_corners=True, and
    'attn' (N, heads, H, W, Hg, Wg) the last attention of every (padded) query pixel over the
    (padded) deformable grid.
    """
    if self.is_mutable_collection('intermediates'):
      value = value_fn()
      if value is not None:
        self.sow('intermediates', name, value)


def pad_to_regions(x, p: int):
  """(N, H, W, C) zero-padded at the bottom/right to sides that are multiples of p; x itself
  when they already are (no pad op)."""
  ph, pw = (-x.shape[1]) % p, (-x.shape[2]) % p
  if not ph and not pw:
    return x
  return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))


def crop_to(x, h: int, w: int):
  """x[:, :h, :w] of an (N, H', W', C) map; x itself when that is all of it (no slice op)."""
  return x if x.shape[1:3] == (h, w) else x[:, :h, :w]


class BRA(RoutedAttention):
  """Bi-level routing attention on (N, H, W, C).

  One linear gives q, k, v; region means of q and k route each query region to its `topk`
  key regions; tokens attend to the gathered tokens; a depthwise conv of v (LCE) is added
  before the output linear. auto_pad: all of it runs on the padded map (padded tokens are
  zeros before the linear, so their q, k, v are its bias), the output is cropped.
  """

  @nn.compact
  def __call__(self, x):
    _, h, w, c = x.shape
    if self.auto_pad:
      x = pad_to_regions(x, self.n_win)
    qkv = Dense(3 * c, dtype=self.dtype, name='qkv')(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    lepe = DepthwiseConv(self.side_dwconv, dwconv=self.impl.dwconv, dtype=self.dtype,
                         name='lepe')(v)
    out, r_idx = routing.bilevel_attention(q, k, v, n_win=self.n_win, heads=self.num_heads,
                                           topk=self.topk, scale=c ** -0.5,
                                           region_gather=self.impl.region_gather,
                                           dense_routing=self.impl.dense_routing)
    self.capture('r_idx', lambda: r_idx)
    return crop_to(Dense(c, dtype=self.dtype, name='wo')(out + lepe), h, w)


class DBRA(RoutedAttention):
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
  auto_pad, as the official code: x is padded first (H, W above are the padded sides); the
  deformable grid x̃, its LCE term and the positions are padded again to multiples of n_win
  (zeros; padded positions are (0, 0), the map centre), steps 4-5 run on that grid, and in
  step 6 every query attends to all of its tokens, padded ones included. The output is cropped.
  """
  groups: int
  offset_kernel: int
  stride: int
  mlp_ratio: int
  rpe_size: int

  @nn.compact
  def __call__(self, x):
    _, h_in, w_in, c = x.shape
    p, g, scale, heads, impl = self.n_win, self.groups, c ** -0.5, self.num_heads, self.impl
    sample = get_sampler(impl.sampling)
    if self.auto_pad:
      x = pad_to_regions(x, p)
    h, w = x.shape[1], x.shape[2]

    qkv = Dense(3 * c, dtype=self.dtype, name='qkv')(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)

    # Offsets per group, shared weights across groups.
    q_groups = rearrange(q, 'n h w (g c) -> (n g) h w c', g=g)
    off = DepthwiseConv(self.offset_kernel, stride=self.stride, use_bias=False,
                        dwconv=impl.dwconv, dtype=self.dtype, name='offset_dwconv')(q_groups)
    off = gelu(layer_norm(1e-5, self.dtype, 'offset_norm')(off))
    off = Dense(1, use_bias=False, dtype=self.dtype, name='offset_proj')(off)  # (N*G, Hk, Wk, 1)
    hk = off.shape[1]
    pos = jnp.clip(_reference_points(hk, off.shape[2]) + off.astype(jnp.float32), -1.0, 1.0)
    self.capture('pos', lambda: rearrange(pos, '(n g) h w yx -> n g h w yx', g=g))

    x_groups = rearrange(x, 'n h w (g c) -> (n g) h w c', g=g).astype(jnp.float32)
    x_tilde = sample(x_groups, rearrange(pos, 'ng h w yx -> ng (h w) yx'))  # (N*G, Hk*Wk, Cg)
    x_tilde = rearrange(x_tilde.astype(self.dtype), '(n g) (h w) c -> n h w (g c)', g=g, h=hk)
    lepe = DepthwiseConv(self.side_dwconv, stride=self.stride, dwconv=impl.dwconv,
                         dtype=self.dtype, name='lepe')(v)  # (N, Hk, Wk, C)
    if self.auto_pad:  # The deformable grid is padded again: Hk x Wk -> Hg x Wg.
      x_tilde, lepe, pos = (pad_to_regions(a, p) for a in (x_tilde, lepe, pos))

    # Bi-level routing attention of the deformable queries over the full-resolution k, v.
    q_def = Dense(c, dtype=self.dtype, name='proj_q')(x_tilde)  # (N, Hg, Wg, C)
    out, r_idx = routing.bilevel_attention(q_def, k, v, n_win=p, heads=heads, topk=self.topk,
                                           scale=scale, region_gather=impl.region_gather,
                                           dense_routing=impl.dense_routing)
    self.capture('r_idx', lambda: r_idx)
    o = x_tilde + Dense(c, dtype=self.dtype, name='unifyheads')(out + lepe)
    o = o + ConvMLP(self.mlp_ratio, impl.dwconv, self.dtype, name='mlp')(
        layer_norm(1e-6, self.dtype, 'mlp_norm')(o))
    o = layer_norm(1e-6, self.dtype, 'out_norm')(o)

    # Every full-resolution query attends to all deformable tokens, with relative-position bias.
    tokens = lambda a: rearrange(a, 'n h w c -> n (h w) c')
    k2 = tokens(Dense(c, dtype=self.dtype, name='proj_k')(o))
    v2 = tokens(Dense(c, dtype=self.dtype, name='proj_v')(o))
    rpe_table = self.param('rpe_table', nn.initializers.truncated_normal(0.01),
                           (heads, 2 * self.rpe_size - 1, 2 * self.rpe_size - 1))
    bias = rpe_bias(rpe_table, rearrange(pos, '(n g) h w yx -> n g (h w) yx', g=g), h, w,
                    impl.sampling)
    out = routing.multihead_attention(tokens(q), k2, v2, heads, scale, bias)
    self.capture('attn', lambda: rearrange(
        routing.attention_weights(tokens(q), k2, heads, scale, bias),
        'n m (h w) (i j) -> n m h w i j', h=h, i=o.shape[1]))
    out = rearrange(out, 'n (h w) c -> n h w c', h=h)
    return crop_to(Dense(c, dtype=self.dtype, name='proj_out')(out), h_in, w_in)


def _reference_points(hk, wk):
  """(Hk, Wk, 2) pixel-centre reference grid (y, x) in [-1, 1]: ((i + 0.5) / Hk) * 2 - 1."""
  ys = (jnp.arange(hk, dtype=jnp.float32) + 0.5) / hk * 2.0 - 1.0
  xs = (jnp.arange(wk, dtype=jnp.float32) + 0.5) / wk * 2.0 - 1.0
  return jnp.stack(jnp.meshgrid(ys, xs, indexing='ij'), axis=-1)


def _axis_grid(size):
  """(size,) align-corners coordinates of the full-resolution queries: i / (size - 1) * 2 - 1."""
  return jnp.arange(size, dtype=jnp.float32) / max(size - 1, 1) * 2.0 - 1.0


def _query_grid(h, w):
  """(H*W, 2) align-corners grid (y, x) of the full-resolution queries."""
  grid = jnp.stack(jnp.meshgrid(_axis_grid(h), _axis_grid(w), indexing='ij'), axis=-1)
  return rearrange(grid, 'h w yx -> (h w) yx')


def rpe_bias(table, pos, h, w, sampling: str = 'gather'):
  """Relative-position bias (N, heads, H*W, Ns) from the table (heads, 2q-1, 2q-1).

  pos: (N, G, Ns, 2) deformable positions (y, x) per group; head m belongs to group
  m // (heads/G). The table is sampled (bilinear, align_corners=True, zero padding) at
  (query - pos) * 0.5 for every full-resolution query and every point. `sampling`
  (`Implementation.sampling`):
    'gather': gathers. When one query step is exactly one table cell (the table side is
      2*side - 1, true at every stage of the official models at 224), the bias of one point
      is a bilinear blend of an (H+1)x(W+1) window of the table: `_rpe_bias_window`, one
      window gather per point (its gradient a window scatter-add). Otherwise four corner
      gathers per (query, point, head).
    'matmul': separable. The queries lie on a regular grid, so the displacement's y depends
      only on (query row, point) and its x only on (query column, point):
        rows[i, k, h, x] = sum_y Wy[i, k, y] T[h, y, x]
        bias[i, j, k, h] = sum_x rows[i, k, h, x] Wx[j, k, x]
      with Wy, Wx the 1-D interpolation weights: two small matmuls instead of H*W*Ns*heads
      gathers (no gather/scatter in either pass; suits the MXU / tensor cores).
  """
  n, g, ns, _ = pos.shape
  heads, th, tw = table.shape
  if sampling == 'gather':
    if th - 1 == 2 * (h - 1) and tw - 1 == 2 * (w - 1) and h > 1 and w > 1:
      return _rpe_bias_window(table, pos, h, w)
    disp = (_query_grid(h, w)[None, None, :, None, :] - pos[:, :, None, :, :]) * 0.5
    disp = rearrange(disp, 'n g q s yx -> g (n q s) yx')  # (G, P, 2)
    tables = rearrange(table, '(g m) y x -> g y x m', g=g)  # (G, th, tw, heads/G)
    bias = bilinear_sample(tables, disp)  # (G, P, heads/G)
    return rearrange(bias, 'g (n q s) m -> n (g m) q s', n=n, s=ns)
  if sampling == 'matmul':
    # Same displacement arithmetic as the gather form, per axis.
    wy = interpolation_matrix((_axis_grid(h)[:, None] - pos[:, :, None, :, 0]) * 0.5, th)
    wx = interpolation_matrix((_axis_grid(w)[:, None] - pos[:, :, None, :, 1]) * 0.5, tw)
    tables = rearrange(table, '(g m) y x -> g m y x', g=g)  # (G, heads/G, th, tw)
    hi = lax.Precision.HIGHEST  # exact f32 interpolation on TPU too (these matmuls are small)
    rows = jnp.einsum('ngiky,ghyx->nghikx', wy, tables, precision=hi)  # (N, G, hpg, H, Ns, tw)
    bias = jnp.einsum('nghikx,ngjkx->nghijk', rows, wx, precision=hi)  # (N, G, hpg, H, W, Ns)
    return rearrange(bias, 'n g m i j s -> n (g m) (i j) s')
  raise ValueError(f"unknown sampling {sampling!r}; choose 'gather' or 'matmul'.")


def _rpe_bias_window(table, pos, h, w):
  """`rpe_bias` when the table side is 2*side - 1: query (i, j) of point k samples the table
  at pixel (i + cy_k, j + cx_k), so the bias of point k is a bilinear blend (weights from the
  fractional parts of cy_k, cx_k) of the window of rows floor(cy_k) .. + H and columns
  floor(cx_k) .. + W. The table is zero-padded by one cell, which is the zero padding of
  grid_sample (a corner just outside gets weight times zero). Equal to the per-query form up
  to the rounding of the pixel coordinate (~1e-5 of a cell).
  """
  n, g, ns, _ = pos.shape
  heads, th, tw = table.shape
  hpg = heads // g
  # Pixel coordinate of query row 0 / column 0 (grid coordinate -1): ((q - p)/2 + 1)/2 * (size-1).
  py = ((-1.0 - pos[..., 0]) * 0.5 + 1.0) * 0.5 * (th - 1)  # (N, G, Ns), in [0, th - 1]
  px = ((-1.0 - pos[..., 1]) * 0.5 + 1.0) * 0.5 * (tw - 1)
  y0, x0 = jnp.floor(py), jnp.floor(px)
  fy, fx = (py - y0)[..., None, None, None], (px - x0)[..., None, None, None]
  padded = jnp.pad(rearrange(table, '(g m) y x -> g m y x', g=g),
                   ((0, 0), (0, 0), (1, 1), (1, 1)))
  ys = jnp.clip(y0.astype(jnp.int32) + 1, 0, th + 1 - h)  # window start in the padded table
  xs = jnp.clip(x0.astype(jnp.int32) + 1, 0, tw + 1 - w)
  window = lambda t, y, x: lax.dynamic_slice(t, (0, y, x), (hpg, h + 1, w + 1))
  per_point = jax.vmap(window, (None, 0, 0))  # over points
  # (N, G, Ns, hpg, H+1, W+1)
  win = jax.vmap(jax.vmap(per_point, (0, 0, 0)), (None, 0, 0))(padded, ys, xs)
  bias = ((1.0 - fy) * ((1.0 - fx) * win[..., :h, :w] + fx * win[..., :h, 1:])
          + fy * ((1.0 - fx) * win[..., 1:, :w] + fx * win[..., 1:, 1:]))  # (N, G, Ns, hpg, H, W)
  return rearrange(bias, 'n g s m h w -> n (g m) (h w) s')

"""Region partition, top-k region routing and region gather (shared by BRA and DBRA).

A map (N, H, W, C) is split into p×p regions of (H/p)×(W/p) tokens; region r = j*p + i,
j over rows and i over columns (row-major), tokens inside a region row-major too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange, reduce
from jax import lax


def route(q_regions, k_regions, topk: int, scale: float):
  """Indices (N, R, topk) of the `topk` key regions with the largest routing logits.

  q_regions, k_regions: (N, R, C) region-mean queries and keys. Logits are
  (q * scale) @ k^T computed in float32; routing is not differentiable (inputs detached), and
  only the selected set matters to the output; the indices come in descending score order.
  """
  q = lax.stop_gradient(q_regions).astype(jnp.float32)
  k = lax.stop_gradient(k_regions).astype(jnp.float32)
  logits = jnp.einsum('nrc,nsc->nrs', q * scale, k)
  return lax.top_k(logits, topk)[1]


def multihead_attention(q, k, v, heads: int, scale: float, bias=None):
  """Softmax attention over the second-to-last axis of k/v, heads split channels as (m c).

  q: (..., Lq, C); k, v: (..., Lk, C) with the same leading axes as q;
  bias: optional (..., m, Lq, Lk). Logits and softmax in float32. Returns (..., Lq, C).
  """
  to_heads = lambda a: _split_heads(a, heads)
  out = attend(to_heads(q * scale), to_heads(k), to_heads(v), bias=bias)  # (..., m, Lq, c/m)
  return rearrange(out, '... m t c -> ... t (m c)')


def _split_heads(a, heads: int):
  """(..., T, m*c) -> (..., m, T, c)."""
  return rearrange(a, '... t (m c) -> ... m t c', m=heads)


def attend(q, k, v, bias=None, mask=None):
  """softmax(q k^T + bias, masked) v over the last two axes; q already scaled.

  q: (..., Lq, c); k, v: (..., Lk, c) with the same leading (batch) axes, which come first so
  that both contractions are plain batched matmuls (no transposes of k or v). bias: f32
  broadcastable to (..., Lq, Lk); mask: bool, False entries get no weight. Logits and softmax
  are float32 whatever the compute dtype.
  """
  logits = jnp.einsum('...qc,...kc->...qk', q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('...qk,...kc->...qc', attn, v)


def attention_weights(q, k, heads: int, scale: float, bias=None):
  """The softmax weights (..., m, Lq, Lk), float32, that `multihead_attention` applies to v
  (same arguments, without v)."""
  logits = jnp.einsum('...qc,...kc->...qk', _split_heads(q * scale, heads),
                      _split_heads(k, heads), preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits if bias is None else logits + bias, axis=-1)


def region_means(x, p: int):
  """(N, H, W, C) -> (N, p*p, C): the mean of every region (routing descriptors)."""
  return reduce(x, 'n (j h) (i w) c -> n (j i) c', 'mean', j=p, i=p)


def to_head_regions(x, p: int, heads: int):
  """(N, H, W, m*c) -> (N, m, p*p, T, c): heads first, then regions, then tokens."""
  return rearrange(x, 'n (j h) (i w) (m c) -> n m (j i) (h w) c', j=p, i=p, m=heads)


def from_head_regions(x, p: int, h: int, w: int):
  """(N, m, p*p, T, c) -> (N, H, W, m*c); the inverse of `to_head_regions`."""
  return rearrange(x, 'n m (j i) (h w) c -> n (j h) (i w) (m c)', j=p, i=p, h=h // p, w=w // p)


def gather_regions(kv, idx, region_gather: str = 'take'):
  """Selects, for each query region, the tokens of its routed key regions.

  kv: (2, N, m, R, T, c) keys and values per head and region; idx: (N, R, k) routed region
  indices. Returns (2, N, m, R, k*T, c). `region_gather` (`Implementation.region_gather`):
    'take':   integer indexing (a gather);
    'onehot': a one-hot (R×k, R) matrix times the region axis (a matmul; suits the MXU).
  """
  r = kv.shape[3]
  if region_gather == 'take':
    out = jax.vmap(lambda kv_n, idx_n: kv_n[:, :, idx_n], in_axes=(1, 0), out_axes=1)(kv, idx)
  elif region_gather == 'onehot':
    sel = jax.nn.one_hot(idx, r, dtype=kv.dtype)  # (N, R, k, R)
    out = jnp.einsum('nqks,xnmstc->xnmqktc', sel, kv)
  else:
    raise ValueError(f"unknown region_gather {region_gather!r}; choose 'take' or 'onehot'.")
  return rearrange(out, 'x n m r k t c -> x n m r (k t) c')


def routing_is_dense(p: int, tq: int, t: int, topk: int, dense_routing: int) -> bool:
  """Whether routed attention is computed densely with a top-k mask instead of a gather.

  Dense means every query of a region scores every key of the map: (p²·Tq)·(p²·T) logits per
  image and head. That is cheaper than gathering copies of the routed key regions when it is
  small (few queries, as DBRA's one deformable query per region, or small maps): at most
  `dense_routing` logits (`Implementation.dense_routing`).
  """
  r = p * p
  return topk < r and (r * tq) * (r * t) <= dense_routing


def bilevel_attention(q, k, v, *, n_win: int, heads: int, topk: int, scale: float,
                      region_gather: str = 'take', dense_routing: int = 0):
  """Bi-level routing attention: each query region attends to the tokens of its `topk` routed
  key regions (region means of q and k, `route`).

  q: (N, Hq, Wq, C) queries; k, v: (N, H, W, C); both maps split into n_win x n_win regions.
  Returns ((N, Hq, Wq, C), the routed region indices (N, p*p, topk) in descending score order,
  or None where topk covers every region). Three formulations, the same numbers:
    topk == regions: plain attention over every token (no routing);
    dense (`routing_is_dense`): all logits, non-routed regions masked out of the softmax;
    otherwise the routed regions' keys and values are gathered (`region_gather`).
  Heads lead the region axes so every matmul is a plain batched one.
  """
  p, r = n_win, n_win * n_win
  n, hq, wq, _ = q.shape
  qh = to_head_regions(q * scale, p, heads)  # (N, m, R, Tq, c)
  kh, vh = to_head_regions(k, p, heads), to_head_regions(v, p, heads)  # (N, m, R, T, c)
  tq, t = qh.shape[3], kh.shape[3]
  flat = lambda a: rearrange(a, 'n m r t c -> n m (r t) c')
  unflat = lambda a: rearrange(a, 'n m (r t) c -> n m r t c', r=r)
  idx = None
  if topk >= r:
    out = unflat(attend(flat(qh), flat(kh), flat(vh)))
  else:
    idx = route(region_means(q, p), region_means(k, p), topk, scale)  # (N, R, k)
    if routing_is_dense(p, tq, t, topk, dense_routing):
      routed = jnp.any(idx[..., None] == jnp.arange(r), axis=-2)  # (N, R, R) query->key regions
      mask = jnp.broadcast_to(routed[:, None, :, None, :, None], (n, 1, r, tq, r, t))
      mask = rearrange(mask, 'n m r q s t -> n m (r q) (s t)')
      out = unflat(attend(flat(qh), flat(kh), flat(vh), mask=mask))
    else:
      kv = gather_regions(jnp.stack([kh, vh]), idx, region_gather)
      out = attend(qh, kv[0], kv[1])
  return from_head_regions(out, p, hq, wq), idx

"""Region partition, top-k region routing and region gather (shared by BRA and DBRA).

A map (N, H, W, C) is split into p×p regions of (H/p)×(W/p) tokens; region r = j*p + i,
j over rows and i over columns (row-major), tokens inside a region row-major too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def to_regions(x, p: int):
  """(N, H, W, C) -> (N, p*p, (H/p)*(W/p), C)."""
  n, h, w, c = x.shape
  x = x.reshape(n, p, h // p, p, w // p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, p * p, (h // p) * (w // p), c)


def from_regions(x, p: int, h: int, w: int):
  """(N, p*p, (H/p)*(W/p), C) -> (N, H, W, C); the inverse of `to_regions`."""
  n, _, _, c = x.shape
  x = x.reshape(n, p, p, h // p, w // p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h, w, c)


def route(q_regions, k_regions, topk: int, scale: float):
  """Indices (N, R, topk) of the `topk` key regions with the largest routing logits.

  q_regions, k_regions: (N, R, C) region-mean queries and keys. Logits are
  (q * scale) @ k^T computed in float32; routing is not differentiable (inputs detached), and
  only the selected set matters, so the order of the indices is irrelevant.
  """
  q = lax.stop_gradient(q_regions).astype(jnp.float32)
  k = lax.stop_gradient(k_regions).astype(jnp.float32)
  logits = jnp.einsum('nrc,nsc->nrs', q * scale, k)
  return lax.top_k(logits, topk)[1]


def gather_regions(kv, idx, impl: str = 'take'):
  """Selects, for each query region, its routed key/value regions.

  kv: (N, R, T, C) tokens of every region; idx: (N, R, k) routed region indices.
  Returns (N, R, k*T, C).
    'take':   integer indexing (a gather);
    'onehot': a one-hot (R×k, R) matrix times the region axis (a matmul; suits the MXU).
  """
  n, r, t, c = kv.shape
  k = idx.shape[-1]
  if impl == 'take':
    out = jax.vmap(lambda kv_n, idx_n: kv_n[idx_n])(kv, idx)  # (N, R, k, T, C)
  elif impl == 'onehot':
    sel = jax.nn.one_hot(idx, r, dtype=kv.dtype)  # (N, R, k, R)
    out = jnp.einsum('nqks,nstc->nqktc', sel, kv)
  else:
    raise ValueError(f"unknown region gather implementation {impl!r}; choose 'take' or 'onehot'.")
  return out.reshape(n, r, k * t, c)


def multihead_attention(q, k, v, heads: int, scale: float, bias=None):
  """Softmax attention over the second-to-last axis of k/v, heads split channels as (m c).

  q: (..., Lq, C); k, v: (..., Lk, C) with leading axes broadcastable to q's;
  bias: optional (..., m, Lq, Lk). Logits and softmax in float32. Returns (..., Lq, C).
  """
  c = q.shape[-1]
  split = lambda a: a.reshape(a.shape[:-1] + (heads, c // heads))
  logits = jnp.einsum('...qmc,...kmc->...mqk', split(q * scale), split(k),
                      preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('...mqk,...kmc->...qmc', attn, split(v))
  return out.reshape(out.shape[:-2] + (c,))

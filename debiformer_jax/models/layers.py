"""Building blocks shared by the DeBiFormer modules. All activations are NHWC.

Initialisation follows PyTorch's defaults, which is what the official model trains from
(its own init function never touches a module): weights and biases of convs and linears
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), norms ones/zeros.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

# U(-b, b) with b = 1/sqrt(fan_in): variance_scaling(1/3, fan_in, uniform) has
# b = sqrt(3 * (1/3) / fan_in).
torch_weight_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init for a layer with `fan_in` inputs."""
  bound = 1.0 / (fan_in ** 0.5)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def gelu(x):
  """Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), as PyTorch's nn.GELU computes it.

  Same values as `nn.gelu(approximate=False)` (within 1e-6), which goes through erfc: XLA:CPU
  expands erfc into a select-heavy polynomial ~6x slower than erf (8x56x56x192: 12.9 vs 2.1 ms).
  """
  return 0.5 * x * (1.0 + lax.erf(x * np.asarray(0.5 ** 0.5, x.dtype)))


class Dense(nn.Module):
  """Linear layer / 1x1 conv over the last axis; kernel (in, out) = PyTorch weight transposed.

  The output is named 'dense' for rematerialisation policies (`checkpoint_name`).
  """
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param('kernel', torch_weight_init, (fan_in, self.features))
    y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param('bias', torch_bias_init(fan_in), (self.features,)).astype(self.dtype)
    return checkpoint_name(y, 'dense')


@jax.custom_vjp
def matmul(x, w):
  """x (..., K) @ w (K, N), with a backward pass in plain (untransposed) matmuls.

  Autodiff gives dx = g @ w^T with the transpose folded into the dot; XLA:CPU then leaves its
  fast (YNNPACK) matmul path for a generic one. Materialising w^T (a small copy) keeps every
  matmul on the fast path: 3-5% of a DeBiFormer-T train step on CPU. Same numbers.
  """
  return jnp.dot(x, w)


def _matmul_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _matmul_bwd(res, g):
  x, w = res
  w_t = lax.optimization_barrier(w.T)  # keep the transpose out of the dot
  dx = jnp.dot(g, w_t)
  dw = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))
  return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Conv(nn.Module):
  """Full k×k conv with PyTorch's symmetric padding k//2 (not Flax 'SAME' at stride 2).

  Kernel HWIO (k, k, in, out) = PyTorch OIHW weight transposed (2, 3, 1, 0).
  """
  features: int
  kernel_size: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, p, cin = self.kernel_size, self.kernel_size // 2, x.shape[-1]
    kernel = self.param('kernel', torch_weight_init, (k, k, cin, self.features))
    y = lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
        ((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + self.param('bias', torch_bias_init(cin * k * k), (self.features,)).astype(self.dtype)


class DepthwiseConv(nn.Module):
  """Depthwise k×k conv, padding k//2, optional stride; kernel (k, k, C), bias (C,).

  `dwconv` picks the formulation (`Implementation.dwconv`), numerically the same:
    'grouped': XLA convolution with feature_group_count=C;
    'shifted': a sum of k*k shifted multiplies (elementwise only; fast where grouped
               convolutions are slow, e.g. XLA:CPU).
  """
  kernel_size: int
  stride: int = 1
  use_bias: bool = True
  dwconv: str = 'shifted'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s, c = self.kernel_size, self.stride, x.shape[-1]
    kernel = self.param('kernel', _depthwise_init, (k, k, c))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.dwconv == 'grouped':
      y = lax.conv_general_dilated(
          x, kernel[:, :, None, :], window_strides=(s, s), padding=((k // 2, k // 2),) * 2,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)
    elif self.dwconv == 'shifted':
      y = _depthwise_shifted(x, kernel, s)
    else:
      raise ValueError(f"DepthwiseConv.dwconv must be 'grouped' or 'shifted', got {self.dwconv!r}")
    if self.use_bias:
      y = y + self.param('bias', torch_bias_init(k * k), (c,)).astype(self.dtype)
    return y


def _depthwise_init(key, shape, dtype=jnp.float32):
  k1, k2, _ = shape
  return torch_bias_init(k1 * k2)(key, shape, dtype)  # same bound as a weight with fan_in k*k


def _taps(xp, k, stride, ho, wo):
  """The k*k shifted (and strided) views of the padded map xp, row-major over taps."""
  n, _, _, c = xp.shape
  for dy in range(k):
    for dx in range(k):
      yield dy, dx, lax.slice(xp, (0, dy, dx, 0),
                              (n, dy + (ho - 1) * stride + 1, dx + (wo - 1) * stride + 1, c),
                              (1, stride, stride, 1))


def _shifted_sum(xp, kernel, stride, ho, wo):
  """sum over taps of view(dy, dx) * kernel[dy, dx]: one elementwise fusion."""
  out = None
  for dy, dx, tap in _taps(xp, kernel.shape[0], stride, ho, wo):
    term = tap * kernel[dy, dx]
    out = term if out is None else out + term
  return out


def _out_size(size, k, stride):
  return (size + 2 * (k // 2) - k) // stride + 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shifted(x, kernel, stride):
  """Depthwise conv (padding k//2) as a sum of shifted, strided slices times per-channel taps.

  The backward pass is written out (custom VJP) in the same shifted-sum form: autodiff of
  the slices would give k*k full-size pads, which XLA:CPU runs ~10x slower than this.
  """
  k, p = kernel.shape[0], kernel.shape[0] // 2
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return _shifted_sum(xp, kernel, stride, _out_size(h, k, stride), _out_size(w, k, stride))


def _depthwise_shifted_fwd(x, kernel, stride):
  return _depthwise_shifted(x, kernel, stride), (x, kernel)


def _depthwise_shifted_bwd(stride, res, g):
  x, kernel = res
  k, p = kernel.shape[0], kernel.shape[0] // 2
  _, h, w, _ = x.shape
  ho, wo = g.shape[1], g.shape[2]
  # d/dx, whole batch: a stride-1 correlation of the cotangent (dilated by the stride, padded)
  # with the flipped kernel; one elementwise fusion like the forward pass.
  zero = jnp.zeros((), g.dtype)
  gp = lax.pad(g, zero, ((0, 0, 0), (p, h + p - ((ho - 1) * stride + 1), stride - 1),
                         (p, w + p - ((wo - 1) * stride + 1), stride - 1), (0, 0, 0)))
  dx = _shifted_sum(gp, kernel[::-1, ::-1], 1, h, w)
  # d/dkernel, one image at a time: the k*k reductions of an image's views stay in cache
  # (XLA:CPU, 8x56x56x192, k=3: 12-15 ms against 59 ms for whole-batch reductions). Computing
  # dx inside the same loop costs a full-size dynamic-update-slice per image: 11% of a
  # DeBiFormer-T train step.
  dk = lax.map(lambda a: _depthwise_kernel_grad(stride, a[0][None], a[1][None], k), (x, g))
  return dx, dk.sum(0).reshape(kernel.shape).astype(kernel.dtype)


def _depthwise_kernel_grad(stride, x, g, k):
  """(k*k, C): per tap, the channel-wise sum of view * cotangent (accumulated in float32)."""
  p = k // 2
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  g32 = g.astype(jnp.float32)
  return jnp.stack([(tap.astype(jnp.float32) * g32).sum((0, 1, 2))
                    for _, _, tap in _taps(xp, k, stride, g.shape[1], g.shape[2])])


_depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def layer_norm(epsilon: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm over channels; Flax reduces in float32 whatever the compute dtype."""
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name)


def batch_norm(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
  """BatchNorm over channels: PyTorch momentum 0.1 is Flax momentum 0.9; eps 1e-5."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      name=name)


class ConvMLP(nn.Module):
  """1x1 conv (C→eC) → h + dw3x3(h) → GELU → 1x1 conv (eC→C), as the official MLP."""
  ratio: int
  dwconv: str = 'shifted'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = Dense(c * self.ratio, dtype=self.dtype, name='fc1')(x)
    h = h + DepthwiseConv(3, dwconv=self.dwconv, dtype=self.dtype, name='dwconv')(h)
    return Dense(c, dtype=self.dtype, name='fc2')(gelu(h))


class DropPath(nn.Module):
  """Stochastic depth: drops whole samples of a residual branch, scaling kept ones by 1/keep."""
  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))

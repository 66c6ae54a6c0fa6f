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
from jax import lax

Dtype = Any

# U(-b, b) with b = 1/sqrt(fan_in): variance_scaling(1/3, fan_in, uniform) has b = sqrt(3 * (1/3) / fan_in).
torch_weight_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init for a layer with `fan_in` inputs."""
  bound = 1.0 / (fan_in ** 0.5)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


gelu = functools.partial(nn.gelu, approximate=False)  # PyTorch nn.GELU is the exact (erf) form.


class Dense(nn.Module):
  """Linear layer / 1x1 conv over the last axis; kernel (in, out) = PyTorch weight transposed."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param('kernel', torch_weight_init, (fan_in, self.features))
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param('bias', torch_bias_init(fan_in), (self.features,)).astype(self.dtype)
    return y


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

  `impl` picks the formulation, numerically the same:
    'grouped': XLA convolution with feature_group_count=C;
    'shifted': a sum of k*k shifted multiplies (elementwise only; fast where grouped
               convolutions are slow, e.g. XLA:CPU).
  """
  kernel_size: int
  stride: int = 1
  use_bias: bool = True
  impl: str = 'shifted'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s, c = self.kernel_size, self.stride, x.shape[-1]
    kernel = self.param('kernel', _depthwise_init, (k, k, c))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.impl == 'grouped':
      y = lax.conv_general_dilated(
          x, kernel[:, :, None, :], window_strides=(s, s), padding=((k // 2, k // 2),) * 2,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)
    elif self.impl == 'shifted':
      y = _depthwise_shifted(x, kernel, s)
    else:
      raise ValueError(f"DepthwiseConv.impl must be 'grouped' or 'shifted', got {self.impl!r}")
    if self.use_bias:
      y = y + self.param('bias', torch_bias_init(k * k), (c,)).astype(self.dtype)
    return y


def _depthwise_init(key, shape, dtype=jnp.float32):
  k1, k2, _ = shape
  return torch_bias_init(k1 * k2)(key, shape, dtype)  # same bound as a weight with fan_in k*k


def _depthwise_shifted(x, kernel, stride):
  """Depthwise conv as a sum of shifted, strided slices times per-channel taps."""
  k = kernel.shape[0]
  p = k // 2
  _, h, w, _ = x.shape
  ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = None
  for dy in range(k):
    for dx in range(k):
      tap = lax.slice(xp, (0, dy, dx, 0),
                      (xp.shape[0], dy + (ho - 1) * stride + 1, dx + (wo - 1) * stride + 1,
                       xp.shape[3]), (1, stride, stride, 1))
      term = tap * kernel[dy, dx]
      out = term if out is None else out + term
  return out


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
  dwconv_impl: str = 'shifted'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = Dense(c * self.ratio, dtype=self.dtype, name='fc1')(x)
    h = h + DepthwiseConv(3, impl=self.dwconv_impl, dtype=self.dtype, name='dwconv')(h)
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

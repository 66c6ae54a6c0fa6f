"""A PyTorch DeBiFormer that computes what the official classification and dense-backbone code
computes.

It is the reference the JAX port is checked against, and it reads official checkpoints:
`build_torch_model(cfg).state_dict()` has exactly the official classifier's names and shapes,
`build_torch_model(cfg, features_only=True)` those of the official dense backbone
(segmentation/ and detection/debiformer.py: `extra_norms.{i}.ln`, no final norm or head) for
an architecture with norm_outputs. `cfg.auto_pad` pads every attention's input as the official
`auto_pad=True` branches do. Unlike the published code it runs as is, at every input size
`cfg.check_input_size` accepts.

Conventions: the model takes and returns NCHW float32. Inside a block, attention and the
LayerNorms work on NHWC (as the official code does), convolutions on NCHW. An n_win x n_win
split of a map is indexed row-major, region r = j * n_win + i, and inside a region tokens are
row-major too. Multi-head channels are split as (head, channel), head major; DBRA offset groups
split channels and heads the same way, group major.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from debiformer_jax.models.architecture import Architecture

__all__ = ['DeBiFormerTorch', 'build_torch_model', 'min_routing_margin', 'clear_routing_input',
           'randomize_', 'routing_internals']


def _to_regions(x: torch.Tensor, n_win: int) -> torch.Tensor:
  """(N, H, W, C) -> (N, n_win**2, (H/n_win)*(W/n_win), C)."""
  return rearrange(x, 'n (j h) (i w) c -> n (j i) (h w) c', j=n_win, i=n_win)


def _from_regions(x: torch.Tensor, n_win: int, height: int, width: int) -> torch.Tensor:
  """Inverse of `_to_regions` for an (height, width) map: -> (N, height, width, C)."""
  return rearrange(x, 'n (j i) (h w) c -> n (j h) (i w) c', j=n_win, i=n_win,
                   h=height // n_win, w=width // n_win)


def _multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                         scale: float, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
  """softmax(scale * q k^T + bias) v per head.

  q: (B, Tq, Cqk), k: (B, Tk, Cqk), v: (B, Tk, Cv), bias: (B, heads, Tq, Tk) or None.
  Returns (B, Tq, Cv) with heads concatenated head major.
  """
  q, k, v = (rearrange(t, 'b t (m c) -> b m t c', m=num_heads) for t in (q, k, v))
  logits = (q * scale) @ k.transpose(-2, -1)
  if bias is not None:
    logits = logits + bias
  out = logits.softmax(dim=-1) @ v
  return rearrange(out, 'b m t c -> b t (m c)')


def _gather_regions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
  """Tokens of the routed regions.

  x: (N, P, T, C) region tokens; index: (N, P, k) region ids per query region.
  Returns (N, P, k*T, C): for each query region, the tokens of its k regions in index order.
  """
  batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
  return x[batch, index].flatten(2, 3)


def _pad_to_regions(x: torch.Tensor, n_win: int) -> torch.Tensor:
  """(N, H, W, C) zero-padded at the bottom/right to multiples of n_win, as the official
  auto_pad: F.pad(x, (0, 0, 0, pad_w, 0, pad_h))."""
  pad_h, pad_w = (-x.shape[1]) % n_win, (-x.shape[2]) % n_win
  return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))


def _align_corners_grid(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
  """Normalised coordinates (i / (size - 1)) * 2 - 1 of the `size` pixel centres."""
  if size == 1:
    return torch.zeros(1, dtype=dtype, device=device)
  return torch.arange(size, dtype=dtype, device=device).div(size - 1.0).mul(2.0).sub(1.0)


def _cell_centre_grid(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
  """Normalised coordinates ((i + 0.5) / size) * 2 - 1 of `size` equal cells."""
  return torch.arange(size, dtype=dtype, device=device).add(0.5).div(size).mul(2.0).sub(1.0)


class DropPath(nn.Module):
  """Stochastic depth: in training, zeroes a sample's branch with probability `rate` and
  scales kept ones by 1/(1 - rate). Identity in eval mode or at rate 0."""

  def __init__(self, rate: float = 0.0):
    super().__init__()
    self.rate = rate

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep

  def extra_repr(self) -> str:
    return f'rate={self.rate}'


class ChannelLayerNorm(nn.Module):
  """LayerNorm over the channels of an NCHW map, held as attribute `attr` (the official names:
  `norm` in DBRA's offset net, `ln` in the dense backbone's `extra_norms`)."""

  def __init__(self, channels: int, eps: float = 1e-5, attr: str = 'norm'):
    super().__init__()
    self.attr = attr
    setattr(self, attr, nn.LayerNorm(channels, eps=eps))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return getattr(self, self.attr)(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
  """1x1 conv (C -> eC), h + depthwise 3x3(h), exact GELU, 1x1 conv (eC -> C). NCHW."""

  def __init__(self, channels: int, expansion: int):
    super().__init__()
    hidden = channels * expansion
    self.linear1 = nn.Sequential(nn.Conv2d(channels, hidden, 1))
    self.act = nn.GELU()
    self.linear2 = nn.Sequential(nn.Conv2d(hidden, channels, 1))
    self.dwc = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.linear1(x)
    return self.linear2(self.act(h + self.dwc(h)))


class QKVProjection(nn.Module):
  """One projection to (q, k, v) with qk_dim, qk_dim and dim channels, in that order.

  `conv=False`: a Linear on NHWC input, split on the last axis.
  `conv=True`: a 1x1 conv on NCHW input, split on axis 1.
  """

  def __init__(self, dim: int, qk_dim: int, conv: bool):
    super().__init__()
    self.splits = [qk_dim, qk_dim, dim]
    self.axis = 1 if conv else -1
    out = 2 * qk_dim + dim
    self.qkv = nn.Conv2d(dim, out, 1) if conv else nn.Linear(dim, out)

  def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return self.qkv(x).split(self.splits, dim=self.axis)


class TopkRouter(nn.Module):
  """Picks, for each query region, the `topk` key regions with the largest routing logits.

  Logits are (q_r * qk_dim**-0.5) @ k_r^T of detached region descriptors; only the selected
  set is used downstream. While `margins` is a list, every call that has a (k+1)-th region
  appends its smallest (score_k - next) / max|score|, `next` being the largest score strictly
  below score_k (see `min_routing_margin`): exact ties are only those of regions made entirely
  of auto_pad padding, which hold identical tokens, so which of them is picked cannot matter.
  While `recorded` is a list, every call appends its indices (`routing_internals`).
  """

  def __init__(self, qk_dim: int, topk: int):
    super().__init__()
    self.topk = topk
    self.scale = qk_dim ** -0.5
    self.margins: Optional[List[float]] = None
    self.recorded: Optional[List[torch.Tensor]] = None

  def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """query, key: (N, P, C) region descriptors -> (N, P, topk) key-region indices."""
    logits = (query.detach() * self.scale) @ key.detach().transpose(-2, -1)
    if self.margins is not None and self.topk < logits.shape[-1]:
      kth = torch.topk(logits, self.topk, dim=-1).values[..., -1:]
      below = torch.where(logits < kth, logits, torch.full_like(logits, -math.inf))
      gap = (kth[..., 0] - below.max(dim=-1).values).min()
      self.margins.append(float(gap / logits.abs().max()))
    indices = torch.topk(logits, self.topk, dim=-1).indices
    if self.recorded is not None:
      self.recorded.append(indices)
    return indices


class BiLevelRoutingAttention(nn.Module):
  """BRA on NHWC input: region routing, then token attention within the routed regions.

  q, k, v come from one Linear; each query region attends to the tokens of its `topk` routed
  regions; a depthwise conv of v (LCE, `lepe`) is added before the output Linear `wo`.
  auto_pad (official): x is zero-padded to multiples of n_win first, the output cropped.
  """

  def __init__(self, dim: int, num_heads: int, n_win: int, topk: int, side_dwconv: int,
               auto_pad: bool):
    super().__init__()
    self.dim, self.num_heads, self.n_win, self.auto_pad = dim, num_heads, n_win, auto_pad
    self.scale = dim ** -0.5
    self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
    self.router = TopkRouter(dim, topk)
    self.qkv = QKVProjection(dim, dim, conv=False)
    self.wo = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h_in, w_in = x.shape[1:3]
    if self.auto_pad:
      x = _pad_to_regions(x, self.n_win)
    n, h, w, c = x.shape
    q, k, v = self.qkv(x)
    q_r, k_r, v_r = (_to_regions(t, self.n_win) for t in (q, k, v))
    index = self.router(q_r.mean(dim=2), k_r.mean(dim=2))
    k_sel, v_sel = _gather_regions(k_r, index), _gather_regions(v_r, index)
    out = _multihead_attention(q_r.flatten(0, 1), k_sel.flatten(0, 1), v_sel.flatten(0, 1),
                               self.num_heads, self.scale)
    out = _from_regions(out.reshape(n, self.n_win ** 2, -1, c), self.n_win, h, w)
    lepe = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return self.wo(out + lepe)[:, :h_in, :w_in]


class DeformableBiLevelRoutingAttention(nn.Module):
  """DBRA on NHWC input (computed in NCHW).

  1. q, k, v from one 1x1 conv. Per offset group, a small conv net on q gives one offset per
     point of a stride-`stride` grid (Hk x Wk); it moves that grid's reference points along both
     axes. x is sampled there (bilinear, align_corners=True): the deformable tokens x~.
  2. Bi-level routing attention of proj_q(x~) over the full-resolution k, v, plus a strided
     depthwise conv of v; unifyheads1, residual on x~, a ConvMlp residual, LayerNorm.
  3. Every full-resolution q attends to all deformable tokens (proj_k, proj_v of step 2's
     output) with a bias sampled from `rpe_table` at the query-to-token displacement; proj_out.
  auto_pad (official): x is zero-padded to multiples of n_win first; the sampled tokens, their
  strided LCE term and the points are padded again (zeros) to multiples of n_win before step 2,
  which runs on that grid; step 3 attends to all of it; the output is cropped.
  While `recorded` is a list, every call appends its clamped points before any padding
  (`routing_internals`).
  """

  def __init__(self, dim: int, num_heads: int, n_win: int, topk: int, side_dwconv: int,
               groups: int, offset_kernel: int, stride: int, mlp_ratio: int, rpe_size: int,
               auto_pad: bool):
    super().__init__()
    self.dim, self.num_heads, self.n_win, self.auto_pad = dim, num_heads, n_win, auto_pad
    self.groups, self.stride = groups, stride
    self.scale = dim ** -0.5
    group_channels = dim // groups
    side = 2 * rpe_size - 1
    self.rpe_table = nn.Parameter(torch.zeros(num_heads, side, side))
    self.lepe1 = nn.Conv2d(dim, dim, side_dwconv, stride=stride, padding=side_dwconv // 2,
                           groups=dim)
    self.router = TopkRouter(dim, topk)
    self.qkv_conv = QKVProjection(dim, dim, conv=True)
    self.proj_q = nn.Conv2d(dim, dim, 1)
    self.proj_k = nn.Conv2d(dim, dim, 1)
    self.proj_v = nn.Conv2d(dim, dim, 1)
    self.proj_out = nn.Conv2d(dim, dim, 1)
    self.unifyheads1 = nn.Conv2d(dim, dim, 1)
    self.conv_offset_q = nn.Sequential(
        nn.Conv2d(group_channels, group_channels, offset_kernel, stride=stride,
                  padding=offset_kernel // 2, groups=group_channels, bias=False),
        ChannelLayerNorm(group_channels, eps=1e-5),
        nn.GELU(),
        nn.Conv2d(group_channels, 1, 1, bias=False),
    )
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = ConvMlp(dim, mlp_ratio)
    self.recorded: Optional[List[torch.Tensor]] = None

  def sample_points(self, q: torch.Tensor) -> torch.Tensor:
    """Deformable positions from q (N, C, H, W): (N*groups, Hk, Wk, 2) as (y, x) in [-1, 1]."""
    n, c, h, w = q.shape
    offset = self.conv_offset_q(q.reshape(n * self.groups, c // self.groups, h, w))
    hk, wk = offset.shape[-2:]
    ref_y = _cell_centre_grid(hk, q.dtype, q.device)
    ref_x = _cell_centre_grid(wk, q.dtype, q.device)
    reference = torch.stack(torch.meshgrid(ref_y, ref_x, indexing='ij'), dim=-1)
    return (reference + offset.permute(0, 2, 3, 1)).clamp(-1.0, 1.0)

  def position_bias(self, height: int, width: int, points: torch.Tensor) -> torch.Tensor:
    """Bias (N, heads, height*width, Hk*Wk) read from `rpe_table` at (query - point) / 2."""
    ng, hk, wk, _ = points.shape
    n = ng // self.groups
    q_y = _align_corners_grid(height, points.dtype, points.device)
    q_x = _align_corners_grid(width, points.dtype, points.device)
    queries = torch.stack(torch.meshgrid(q_y, q_x, indexing='ij'), dim=-1).reshape(1, -1, 1, 2)
    displacement = (queries - points.reshape(ng, 1, hk * wk, 2)) * 0.5
    table = self.rpe_table.expand(n, -1, -1, -1)
    table = table.reshape(ng, self.num_heads // self.groups, *self.rpe_table.shape[1:])
    bias = F.grid_sample(table, displacement.flip(-1), mode='bilinear', padding_mode='zeros',
                         align_corners=True)
    return bias.reshape(n, self.num_heads, height * width, hk * wk)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h_in, w_in = x.shape[1:3]
    if self.auto_pad:
      x = _pad_to_regions(x, self.n_win)
    n, h, w, c = x.shape
    x = x.permute(0, 3, 1, 2)
    q, k, v = self.qkv_conv(x)

    points = self.sample_points(q)
    if self.recorded is not None:
      self.recorded.append(points)
    hk, wk = points.shape[1:3]
    sampled = F.grid_sample(x.reshape(n * self.groups, c // self.groups, h, w), points.flip(-1),
                            mode='bilinear', padding_mode='zeros', align_corners=True)
    sampled = sampled.reshape(n, c, hk, wk)
    lepe = self.lepe1(v)
    if self.auto_pad:  # the deformable grid is padded again (zeros; points (0, 0))
      nhwc = lambda t: _pad_to_regions(t.permute(0, 2, 3, 1), self.n_win).permute(0, 3, 1, 2)
      sampled, lepe = nhwc(sampled), nhwc(lepe)
      points = _pad_to_regions(points, self.n_win)
      hk, wk = points.shape[1:3]

    q_def = _to_regions(self.proj_q(sampled).permute(0, 2, 3, 1), self.n_win)
    k_r, v_r = (_to_regions(t.permute(0, 2, 3, 1), self.n_win) for t in (k, v))
    index = self.router(q_def.mean(dim=2), k_r.mean(dim=2))
    k_sel, v_sel = _gather_regions(k_r, index), _gather_regions(v_r, index)
    out = _multihead_attention(q_def.flatten(0, 1), k_sel.flatten(0, 1), v_sel.flatten(0, 1),
                               self.num_heads, self.scale)
    out = _from_regions(out.reshape(n, self.n_win ** 2, -1, c), self.n_win, hk, wk)
    out = out.permute(0, 3, 1, 2) + lepe
    tokens = sampled + self.unifyheads1(out)
    tokens = tokens + self.mlp(self.norm2(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    tokens = self.norm(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    keys = self.proj_k(tokens).flatten(2).transpose(1, 2)
    values = self.proj_v(tokens).flatten(2).transpose(1, 2)
    bias = self.position_bias(h, w, points)
    out = _multihead_attention(q.flatten(2).transpose(1, 2), keys, values, self.num_heads,
                               self.scale, bias)
    out = out.transpose(1, 2).reshape(n, c, h, w)
    return self.proj_out(out).permute(0, 2, 3, 1)[:, :h_in, :w_in]


class Block(nn.Module):
  """Two pre-norm attention + ConvMlp pairs, each after a depthwise-conv position embedding.

  NCHW in and out: x += pos_embed1(x); x += attn1(norm1(x)); x += mlp1(norm2(x));
  x += pos_embed2(x); x += attn2(norm3(x)); x += mlp2(norm4(x)); every branch under DropPath.
  """

  def __init__(self, cfg: Architecture, stage: int, drop_path: float):
    super().__init__()
    dim, heads = cfg.widths[stage], cfg.num_heads[stage]
    k = cfg.pos_dwconv
    dbra = dict(dim=dim, num_heads=heads, n_win=cfg.n_win, side_dwconv=cfg.side_dwconv,
                groups=cfg.offset_groups[stage], offset_kernel=cfg.offset_kernels[stage],
                stride=cfg.offset_strides[stage], mlp_ratio=cfg.dbra_mlp_ratios[stage],
                rpe_size=cfg.rpe_sizes[stage], auto_pad=cfg.auto_pad)
    topk1, topk2 = cfg.stage_topk(cfg.topk1[stage]), cfg.stage_topk(cfg.topk2[stage])

    self.pos_embed1 = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
    self.pos_embed2 = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    if cfg.attn1_deformable[stage]:
      self.attn1 = DeformableBiLevelRoutingAttention(topk=topk1, **dbra)
    else:
      self.attn1 = BiLevelRoutingAttention(dim, heads, cfg.n_win, topk1, cfg.side_dwconv,
                                           cfg.auto_pad)
    self.attn2 = DeformableBiLevelRoutingAttention(topk=topk2, **dbra)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp1 = ConvMlp(dim, cfg.mlp_ratios[stage])
    self.drop_path = DropPath(drop_path)
    self.norm3 = nn.LayerNorm(dim, eps=1e-6)
    self.norm4 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp2 = ConvMlp(dim, cfg.mlp_ratios[stage])

  def _mlp(self, mlp: ConvMlp, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """mlp(norm(x)) for NHWC x, the ConvMlp running on NCHW."""
    return mlp(norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.pos_embed1(x)
    x = x.permute(0, 2, 3, 1)
    x = x + self.drop_path(self.attn1(self.norm1(x)))
    x = x + self.drop_path(self._mlp(self.mlp1, self.norm2, x))
    x = x + self.pos_embed2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    x = x + self.drop_path(self.attn2(self.norm3(x)))
    x = x + self.drop_path(self._mlp(self.mlp2, self.norm4, x))
    return x.permute(0, 3, 1, 2)


class DeBiFormerTorch(nn.Module):
  """DeBiFormer: conv stem and downsamplings, four stages of Blocks (with norm_outputs each
  followed by `extra_norms[i]`, a LayerNorm over channels, eps 1e-5); then BatchNorm, global
  average pool and a Linear head (the classifier), or with `features_only` the stage maps (the
  official dense backbone). Input (N, in_chans, H, W) float32; output (N, classes) or a tuple
  of NCHW maps."""

  def __init__(self, cfg: Architecture, features_only: bool = False):
    super().__init__()
    cfg.validate()
    self.cfg, self.features_only = cfg, features_only
    widths = cfg.widths
    stem = nn.Sequential(
        nn.Conv2d(cfg.in_chans, widths[0] // 2, 3, stride=2, padding=1),
        nn.BatchNorm2d(widths[0] // 2),
        nn.GELU(),
        nn.Conv2d(widths[0] // 2, widths[0], 3, stride=2, padding=1),
        nn.BatchNorm2d(widths[0]),
    )
    self.downsample_layers = nn.ModuleList([stem])
    for s in range(1, cfg.num_stages):
      self.downsample_layers.append(nn.Sequential(
          nn.Conv2d(widths[s - 1], widths[s], 3, stride=2, padding=1),
          nn.BatchNorm2d(widths[s]),
      ))
    rates = iter(cfg.drop_path_rates())
    self.stages = nn.ModuleList(
        nn.Sequential(*(Block(cfg, s, next(rates)) for _ in range(cfg.depths[s])))
        for s in range(cfg.num_stages))
    if cfg.norm_outputs:
      self.extra_norms = nn.ModuleList(ChannelLayerNorm(w, eps=1e-5, attr='ln') for w in widths)
    if not features_only:
      self.norm = nn.BatchNorm2d(widths[-1])
      self.head = nn.Linear(widths[-1], cfg.num_classes)

  def _check_input(self, x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
      raise ValueError(f'expected an NCHW input with {self.cfg.in_chans} channels, '
                       f'got shape {tuple(x.shape)}.')
    self.cfg.check_input_size(x.shape[2], x.shape[3])

  def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """NCHW outputs of downsample_layers[i] followed by stages[i] (and extra_norms[i]), for
    every stage i: the official dense backbone's forward_features."""
    self._check_input(x)
    outputs = []
    for s, (downsample, stage) in enumerate(zip(self.downsample_layers, self.stages)):
      x = stage(downsample(x))
      outputs.append(self.extra_norms[s](x) if self.cfg.norm_outputs else x)
    return tuple(outputs)

  def forward(self, x: torch.Tensor):
    features = self.forward_features(x)
    if self.features_only:
      return features
    return self.head(self.norm(features[-1]).mean(dim=(2, 3)))


def build_torch_model(cfg: Architecture, features_only: bool = False) -> DeBiFormerTorch:
  """A PyTorch DeBiFormer for `cfg` (the classifier, or the dense backbone with
  `features_only`) with PyTorch default initialisation, in train mode."""
  return DeBiFormerTorch(cfg, features_only)


def _routers(model: nn.Module) -> List[TopkRouter]:
  return [m for m in model.modules() if isinstance(m, TopkRouter)]


def min_routing_margin(model: nn.Module, x: torch.Tensor) -> float:
  """Smallest relative top-k gap of any routing decision in an eval-mode forward pass of x.

  For every router call the gap is min over batch elements and query regions of
  (score_k - next) / max|score|, scores being that call's routing logits and `next` the largest
  score strictly below score_k (exact ties are regions of pure padding, see `TopkRouter`).
  Calls that keep every region have no gap and are skipped; `inf` if no call has one.
  """
  routers = _routers(model)
  was_training = model.training
  model.eval()
  for router in routers:
    router.margins = []
  try:
    with torch.no_grad():
      model(x)
    margins = [m for router in routers for m in router.margins]
  finally:
    for router in routers:
      router.margins = None
    model.train(was_training)
  return min(margins, default=math.inf)


def routing_internals(model: DeBiFormerTorch, x: torch.Tensor) -> dict:
  """The routing indices and deformable points of an eval-mode forward pass of x, as numpy,
  named after the official modules: 'stages.{s}.{b}.attn{1,2}/r_idx' (N, n_win**2, topk),
  in descending score order as torch.topk gives them, for every attention that routes
  (top-k below the region count), and 'stages.{s}.{b}.attn{1,2}/pos' (N, G, Hk, Wk, 2), the
  clamped points (y, x) before any auto_pad padding, for every DBRA."""
  recorders = {}
  for name, module in model.named_modules():
    if isinstance(module, TopkRouter) and module.topk < model.cfg.n_win ** 2:
      recorders[name[:-len('.router')] + '/r_idx'] = module
    elif isinstance(module, DeformableBiLevelRoutingAttention):
      recorders[name + '/pos'] = module
  was_training = model.training
  model.eval()
  for module in recorders.values():
    module.recorded = []
  try:
    with torch.no_grad():
      model(x)
    out = {}
    for key, module in recorders.items():
      value = module.recorded[0]
      if key.endswith('/pos'):
        value = value.reshape(x.shape[0], module.groups, *value.shape[1:])
      out[key] = value.numpy()
  finally:
    for module in recorders.values():
      module.recorded = None
    model.train(was_training)
  return out


def clear_routing_input(model: nn.Module, shape: Sequence[int], seed: int,
                        margin: float = 5e-6, max_tries: int = 50) -> torch.Tensor:
  """First N(0, 1) draw of `shape` (from a generator seeded with `seed`) whose every routing
  decision has a relative top-k gap of at least `margin` (see `min_routing_margin`)."""
  generator = torch.Generator().manual_seed(seed)
  best = -math.inf
  for _ in range(max_tries):
    x = torch.randn(*shape, generator=generator)
    found = min_routing_margin(model, x)
    if found >= margin:
      return x
    best = max(best, found)
  raise RuntimeError(f'no input of shape {tuple(shape)} with routing margin >= {margin} in '
                     f'{max_tries} draws (seed {seed}, best margin {best:.3g}); raise max_tries '
                     f'or lower margin.')


_NORM_TYPES = (nn.LayerNorm, nn.BatchNorm2d)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
  """Sets every parameter and BatchNorm statistic to distinctive random values, in place.

  Norm scales 1 + 0.1 N(0,1); biases 0.05 N(0,1); rpe tables 0.5 N(0,1); other weights
  0.5 N(0,1) / sqrt(fan_in); BatchNorm running mean 0.1 N(0,1), running var 0.5 + U(0,1).
  The values depend only on `seed` and the model's structure. Returns the model.
  """
  generator = torch.Generator().manual_seed(seed)

  def normal(t: torch.Tensor) -> torch.Tensor:
    return torch.randn(t.shape, generator=generator, dtype=t.dtype)

  for module in model.modules():
    for name, p in module.named_parameters(recurse=False):
      if name == 'bias':
        p.copy_(0.05 * normal(p))
      elif isinstance(module, _NORM_TYPES):
        p.copy_(1.0 + 0.1 * normal(p))
      elif name == 'rpe_table':
        p.copy_(0.5 * normal(p))
      else:
        fan_in = p[0].numel() if p.ndim > 1 else 1
        p.copy_(0.5 * normal(p) / math.sqrt(fan_in))
    if isinstance(module, nn.BatchNorm2d):
      module.running_mean.copy_(0.1 * normal(module.running_mean))
      module.running_var.copy_(
          0.5 + torch.rand(module.running_var.shape, generator=generator,
                           dtype=module.running_var.dtype))
  return model

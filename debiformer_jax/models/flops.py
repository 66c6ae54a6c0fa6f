"""Analytic multiply-accumulate count of a DeBiFormer forward pass, from its config.

Counts what the official GMACs count: matmuls (linears, 1x1 convs, attention q·k and a·v,
the region-routing logits) and convolutions (stem, downsampling, depthwise), one MAC per
multiply-add, per image. Norms, activations, softmax, bilinear sampling and pooling are not
counted. At 224x224 this gives tiny 2.634, small 5.396, base 11.681 GMACs against the
published 2.64 / 5.40 / 11.69 (tests/test_benchmark.py holds it within 1%).

Routed attention is counted as the official computation does it: each query attends to the
k·T tokens of its k routed regions (no dense masking, no gather cost). With auto_pad the
attentions are counted on the padded maps and deformable grids they compute on.
"""

from __future__ import annotations

from typing import Dict

from debiformer_jax.models.architecture import Architecture


def forward_macs(cfg: Architecture, height: int = 224, width: int | None = None,
                 head: bool = True) -> Dict[str, int]:
  """MACs per image by kind: 'conv' (stem, downsampling), 'depthwise', 'linear' (linears and
  1x1 convs), 'attention' (q·k and a·v), 'routing' (region logits); 'total' sums them.
  `head=False`: a backbone (no classifier head)."""
  width = height if width is None else width
  cfg.check_input_size(height, width)
  out = {'conv': 0, 'depthwise': 0, 'linear': 0, 'attention': 0, 'routing': 0}
  sizes = cfg.stage_sizes(height, width)
  regions = cfg.n_win ** 2
  c0 = cfg.widths[0]
  stem1 = (-(-height // 2)) * (-(-width // 2))
  out['conv'] += stem1 * (c0 // 2) * cfg.in_chans * 9
  pad = cfg.padded if cfg.auto_pad else (lambda side: side)
  for s, (h, w) in enumerate(sizes):
    c = cfg.widths[s]
    out['conv'] += h * w * c * (c0 // 2 if s == 0 else cfg.widths[s - 1]) * 9
    hw = pad(h) * pad(w)  # the map the attentions run on
    tokens = hw // regions  # per region
    r = cfg.offset_strides[s]
    hk, wk = -(-pad(h) // r), -(-pad(w) // r)
    points = hk * wk  # deformable points
    grid = pad(hk) * pad(wk)  # the deformable grid the routed attention runs on
    for _ in range(cfg.depths[s]):
      out['depthwise'] += 2 * h * w * c * cfg.pos_dwconv ** 2  # pos_embed1, pos_embed2
      for which in (1, 2):
        deformable = which == 2 or cfg.attn1_deformable[s]
        k = cfg.stage_topk(cfg.topk1[s] if which == 1 else cfg.topk2[s])
        out['linear'] += hw * c * 3 * c  # qkv
        if k < regions:
          out['routing'] += regions * regions * c
        if not deformable:  # BRA
          out['attention'] += 2 * hw * k * tokens * c
          out['depthwise'] += hw * c * cfg.side_dwconv ** 2  # lepe
          out['linear'] += hw * c * c  # wo
          continue
        e = cfg.dbra_mlp_ratios[s]
        out['depthwise'] += points * c * cfg.offset_kernels[s] ** 2  # offset dwconv (per group)
        out['linear'] += points * c  # offset proj, Cg -> 1 per group
        out['linear'] += 2 * grid * c * c  # proj_q, unifyheads
        out['attention'] += 2 * grid * k * tokens * c  # routed attention of the points
        out['depthwise'] += points * c * cfg.side_dwconv ** 2  # strided lepe
        out['linear'] += 2 * grid * c * e * c  # inner mlp
        out['depthwise'] += grid * e * c * 9
        out['linear'] += 2 * grid * c * c  # proj_k, proj_v
        out['attention'] += 2 * hw * grid * c  # every query over every point
        out['linear'] += hw * c * c  # proj_out
      for _ in range(2):  # mlp1, mlp2
        e = cfg.mlp_ratios[s]
        out['linear'] += 2 * h * w * c * e * c
        out['depthwise'] += h * w * e * c * 9
  if head:
    out['linear'] += cfg.widths[-1] * cfg.num_classes
  out['total'] = sum(out.values())
  return out


def train_flops(cfg: Architecture, height: int = 224, width: int | None = None) -> int:
  """FLOPs per image of a training step: forward + backward = 3x the forward's 2*MACs (the
  backward computes input and weight gradients of every matmul/conv)."""
  return 3 * 2 * forward_macs(cfg, height, width)['total']

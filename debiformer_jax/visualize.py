r"""Where a DeBiFormer looks: deformable points, routed regions and attention, one panel a stage.

  python -m debiformer_jax.visualize --weights DIR --image FILE --out FIG.png \
      [--query ROW,COL] [--pixel Y,X] [--dump FILE.npz] [--step S]
  python -m debiformer_jax.visualize --weights DIR --array BATCH.npy --out FIG.png ...

DIR is a training workdir or a converted directory (`classifier.load`); an exported artifact
has no internals to show. The image goes through the eval transform (`classifier.preprocess`);
`--array` takes an already-normalised float32 NHWC batch (N, S, S, 3) as it is, and the
figure shows its first image. Each stage's panel draws, over the model's input (cropped,
un-normalised):
  - the deformable sampling points of every DBRA of the stage, coloured by offset group
    (one marker shape per module);
  - the key regions that the query region routes to in the stage's last routing attention,
    outlined and numbered in descending score order (the query region dashed);
  - the final attention of the query pixel (star) in the stage's last DBRA, averaged over
    heads, as a heat map: head m weighs each deformable token at the position its own group
    g = m // (heads / G) sampled, so the weights are drawn as Gaussians (std r / 2 input
    pixels, r the stage's reduction) at those positions, scaled to the panel's maximum.

Conventions. The input is S x S; stage s's map is ceil(S / r) per side with r = 2**(s + 2),
and map pixel i covers input pixels [i r, (i + 1) r). The region grid is n_win x n_win on
every stage (row-major: region row * n_win + col), `--query` picks one (default the centre,
n_win // 2). `--pixel Y,X` is in input pixels (default the query region's centre) and is map
pixel (Y // r, X // r) at stage s. Positions (y, x) are in [-1, 1] with align_corners=True on
the (padded) map of side h: map pixel (y + 1) / 2 * (h - 1).

`--dump FILE.npz` saves, for every attention module (official names, 0-based):
  stages.{s}.{b}.attn{1,2}/r_idx  int32 (N, n_win**2, topk): the routed key regions of every
      query region, in descending score order (omitted where top-k covers every region);
  stages.{s}.{b}.attn{1,2}/pos    float32 (N, G, Hk, Wk, 2), DBRA only: the clamped deformable
      positions (y, x);
  stages.{s}.{b}.attn{1,2}/attn   float32 (N, heads, Hg, Wg), DBRA only: the final attention of
      the query pixel over the deformable grid (Hg x Wg is Hk x Wk padded to multiples of
      n_win under auto_pad); it sums to 1 per head.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys

import jax
import numpy as np

from debiformer_jax import classifier
from debiformer_jax.data.augment import MEAN_RGB, STD_RGB


@dataclasses.dataclass(frozen=True)
class Capture:
  """What one attention module computed in a forward of a batch of N images (numpy).

  r_idx: (N, n_win**2, topk) or None where top-k covers every region; pos: (N, G, Hk, Wk, 2)
  (y, x) and attn: (N, heads, H, W, Hg, Wg) for every (padded) query pixel, None for BRA.
  """
  name: str  # 'stages.{s}.{b}.attn{1,2}'
  stage: int
  r_idx: np.ndarray | None
  pos: np.ndarray | None
  attn: np.ndarray | None


def _module_name(block: str, attention: str) -> tuple[str, int]:
  """('stage2_block0', 'attn1') -> ('stages.2.0.attn1', 2)."""
  stage, index = re.fullmatch(r'stage(\d+)_block(\d+)', block).groups()
  return f'stages.{stage}.{index}.{attention}', int(stage)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, variables, images):
  """(logits, {'intermediates': ...}) of an eval forward that captures the internals."""
  return model.apply(variables, images, mutable=['intermediates'])


def capture(model, variables, images) -> tuple[np.ndarray, list[Capture]]:
  """Logits (N, classes) and every attention module's internals, in forward order, from one
  forward of `images` (N, S, S, 3) normalised float32."""
  logits, state = _forward(model, variables, images)
  captures = []
  for block, modules in state['intermediates'].items():
    for attention, values in modules.items():
      name, stage = _module_name(block, attention)
      get = lambda key: np.asarray(values[key][0]) if key in values else None
      captures.append(Capture(name, stage, get('r_idx'), get('pos'), get('attn')))
  order = lambda c: tuple(int(n) for n in re.findall(r'\d+', c.name))
  return np.asarray(logits), sorted(captures, key=order)


def reduction(stage: int) -> int:
  """Input pixels per map pixel at `stage` (stem /4, then /2 a stage)."""
  return 2 ** (stage + 2)


def query_attention(c: Capture, pixel: tuple[int, int]) -> np.ndarray:
  """(N, heads, Hg, Wg): the attention of input pixel (Y, X) (map pixel (Y // r, X // r))."""
  r = reduction(c.stage)
  return c.attn[:, :, pixel[0] // r, pixel[1] // r]


def dump_arrays(captures: list[Capture], pixel: tuple[int, int]) -> dict[str, np.ndarray]:
  """The `--dump` arrays (module docstring) of every module that has them."""
  out = {}
  for c in captures:
    if c.r_idx is not None:
      out[f'{c.name}/r_idx'] = c.r_idx
    if c.pos is not None:
      out[f'{c.name}/pos'] = c.pos
      out[f'{c.name}/attn'] = query_attention(c, pixel)
  return out


def _padded_positions(pos: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """(G, Hk, Wk, 2) -> (G, Hg, Wg, 2), zeros (the map centre) where auto_pad padded the grid,
  as the model does."""
  g, hk, wk, _ = pos.shape
  return np.pad(pos, ((0, 0), (0, grid[0] - hk), (0, grid[1] - wk), (0, 0)))


def group_weights(attn: np.ndarray, groups: int) -> np.ndarray:
  """(heads, Hg, Wg) attention of one query -> (G, Hg, Wg): each group's share of the head
  mean (heads are grouped as m // (heads / G)); it sums to 1."""
  heads = attn.shape[0]
  return attn.reshape(groups, heads // groups, *attn.shape[1:]).sum(1) / heads


def heat_map(weights: np.ndarray, points: np.ndarray, size: int, sigma: float) -> np.ndarray:
  """(S, S) sum of Gaussians (std `sigma` pixels) of height `weights` (...) centred at
  `points` (..., 2) (y, x) in input pixels: Gy diag(w) Gx^T, separable."""
  grid = np.arange(size, dtype=np.float64)
  gauss = lambda c: np.exp(-0.5 * ((grid[:, None] - c.ravel()[None, :]) / sigma) ** 2)
  return (gauss(points[..., 0]) * weights.ravel()) @ gauss(points[..., 1]).T


def to_input_pixels(pos: np.ndarray, side: tuple[int, int], stage: int) -> np.ndarray:
  """(..., 2) positions (y, x) in [-1, 1] on a map of `side` -> input pixel coordinates
  (pixel centres at integers): map pixel p = (y + 1) / 2 * (h - 1) is input (p + 0.5) r - 0.5."""
  r = reduction(stage)
  scale = (np.asarray(side, np.float64) - 1) / 2
  return ((pos + 1) * scale + 0.5) * r - 0.5


def unnormalise(image: np.ndarray) -> np.ndarray:
  """(S, S, 3) normalised float -> uint8 RGB (the inverse of `augment.normalize`)."""
  return np.clip(np.rint(image * np.asarray(STD_RGB) + np.asarray(MEAN_RGB)), 0, 255).astype(
      np.uint8)


def default_pixel(query: tuple[int, int], n_win: int, size: int) -> tuple[int, int]:
  """The input pixel at the centre of region `query` of an n_win x n_win grid over S x S."""
  return tuple(min(int((q + 0.5) * size / n_win), size - 1) for q in query)


def draw(image: np.ndarray, captures: list[Capture], *, n_win: int, query: tuple[int, int],
         pixel: tuple[int, int], title: str):
  """The figure (module docstring) for image 0 of the captures; `image` (S, S, 3) uint8."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  stages = sorted({c.stage for c in captures})
  fig, axes = plt.subplots(1, len(stages), figsize=(3.3 * len(stages), 4.3), squeeze=False,
                           layout='constrained')
  for ax, s in zip(axes[0], stages):
    _draw_stage(ax, image, [c for c in captures if c.stage == s], s, n_win, query, pixel)
  fig.suptitle(title, fontsize=9)
  return fig


_MARKERS = 'osD^vP<>'
_EXTENT = lambda size: (-0.5, size - 0.5, size - 0.5, -0.5)  # Pixel centres at integers.


def _draw_stage(ax, image, captures, stage, n_win, query, pixel):
  """One stage's panel: the image, the heat map, the points, the routed regions, the query."""
  size = image.shape[0]
  dbras = [c for c in captures if c.pos is not None]
  side = dbras[-1].attn.shape[2:4]  # The (padded) map.
  ax.imshow(image, extent=_EXTENT(size), interpolation='nearest')
  _draw_heat(ax, dbras[-1], stage, side, pixel, size)
  handles = _draw_points(ax, dbras, stage, side)
  routing = _draw_regions(ax, [c for c in captures if c.r_idx is not None], stage, side, n_win,
                          query)
  ax.scatter([pixel[1]], [pixel[0]], s=110, marker='*', color='cyan', edgecolors='black',
             linewidths=0.7, zorder=5)
  ax.set(xlim=(-0.5, size - 0.5), ylim=(size - 0.5, -0.5), xticks=[], yticks=[])
  ax.set_title(f'stage {stage} ({side[0]}x{side[1]} map)\n{routing}\n'
               f'heat: {dbras[-1].name}', fontsize=7.5)
  ax.legend(handles=handles, loc='upper center', bbox_to_anchor=(0.5, 0.0), fontsize=6.5,
            ncol=4, frameon=False, handletextpad=0.1, columnspacing=0.8)


def _draw_heat(ax, c: Capture, stage, side, pixel, size):
  """The query pixel's head-mean attention in DBRA `c` over its points, as a heat overlay."""
  from matplotlib import colormaps
  weights = group_weights(query_attention(c, pixel)[0], c.pos.shape[1])
  points = to_input_pixels(_padded_positions(c.pos[0], weights.shape[1:]), side, stage)
  heat = heat_map(weights, points, size, sigma=reduction(stage) / 2)
  heat /= max(heat.max(), 1e-12)
  overlay = colormaps['inferno'](heat)
  overlay[..., 3] = 0.8 * heat
  ax.imshow(overlay, extent=_EXTENT(size), interpolation='bilinear')


def _draw_points(ax, dbras: list[Capture], stage, side) -> list:
  """Every DBRA's points (image 0): colour by offset group, marker by module. Legend handles."""
  from matplotlib import colormaps
  from matplotlib.lines import Line2D
  colours = colormaps['tab10'].colors
  groups = max(c.pos.shape[1] for c in dbras)
  for k, c in enumerate(dbras):
    pts = to_input_pixels(c.pos[0], side, stage)  # (G, Hk, Wk, 2)
    for g in range(pts.shape[0]):
      ax.scatter(pts[g, ..., 1].ravel(), pts[g, ..., 0].ravel(), s=10,
                 marker=_MARKERS[k % len(_MARKERS)], color=colours[g % len(colours)],
                 edgecolors='white', linewidths=0.3)
  dot = lambda marker, colour, label: Line2D([], [], marker=marker, color=colour, ls='',
                                             markersize=4, label=label)
  return ([dot('o', colours[g % len(colours)], f'group {g}') for g in range(groups)]
          + [dot(_MARKERS[k % len(_MARKERS)], 'grey', 'block {} {}'.format(*c.name.split('.')[2:]))
             for k, c in enumerate(dbras)])


def _draw_regions(ax, routed: list[Capture], stage, side, n_win, query) -> str:
  """Outlines the key regions that `query` routes to in the last of `routed` (numbered by
  rank) and the query region (dashed); returns a line saying what was drawn."""
  import matplotlib.patches as patches
  r = reduction(stage)
  rh, rw = side[0] / n_win * r, side[1] / n_win * r
  box = lambda row, col, **kw: patches.Rectangle((col * rw - 0.5, row * rh - 0.5), rw, rh,
                                                 fill=False, **kw)
  ax.add_patch(box(*query, edgecolor='white', linewidth=1.2, linestyle='--', zorder=4))
  if not routed:
    return f'no routing: all {n_win ** 2} regions'
  c = routed[-1]
  for rank, region in enumerate(c.r_idx[0, query[0] * n_win + query[1]]):
    row, col = divmod(int(region), n_win)
    ax.add_patch(box(row, col, edgecolor='lime', linewidth=1.5))
    ax.text(col * rw + 0.05 * rw, row * rh + 0.05 * rh, str(rank + 1), color='lime',
            fontsize=7, va='top', ha='left', fontweight='bold')
  return f'{c.name} routes to {c.r_idx.shape[-1]} of {n_win ** 2}'


def _pair(text: str) -> tuple[int, int]:
  """'3,4' -> (3, 4)."""
  try:
    a, b = (int(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected two integers as A,B, got {text!r}') from None
  return a, b


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--weights', required=True,
                 help='a training workdir or a converted directory (not an export)')
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--image', help='an image file (goes through the eval transform)')
  src.add_argument('--array', help='a .npy float32 batch (N, S, S, 3), already normalised; the '
                                   'figure shows image 0, --dump covers all')
  p.add_argument('--out', required=True, help='the figure (.png)')
  p.add_argument('--query', type=_pair, metavar='ROW,COL',
                 help='query region on the n_win x n_win grid (default the centre)')
  p.add_argument('--pixel', type=_pair, metavar='Y,X',
                 help='query pixel in input pixels (default the query region\'s centre)')
  p.add_argument('--dump', metavar='FILE.npz', help='also save the arrays behind the figure')
  p.add_argument('--step', type=int, help='checkpoint step of a workdir (default its best)')
  return p


def load_array(path: str) -> np.ndarray:
  """The --array batch, checked: float32 (N, S, S, 3)."""
  try:
    x = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not a .npy array ({e}).') from None
  if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
    raise ValueError(f'{path} holds shape {getattr(x, "shape", None)}; --array takes a batch of '
                     f'square NHWC images (N, S, S, 3): add a batch axis (x[None]) to one image, '
                     f'transpose NCHW with x.transpose(0, 2, 3, 1).')
  if x.shape[0] == 0:
    raise ValueError(f'{path} holds no images (shape {x.shape}).')
  if x.dtype != np.float32:
    raise ValueError(f'{path} is {x.dtype}; --array takes float32 images normalised as in '
                     f'training ((pixels - MEAN_RGB) / STD_RGB); use --image for a picture file.')
  return x


def _check_grid(query, pixel, n_win: int, size: int) -> None:
  """Raises ValueError unless query is on the region grid and pixel inside the input."""
  if not all(0 <= q < n_win for q in query):
    raise ValueError(f'--query {query[0]},{query[1]} is outside the {n_win}x{n_win} region grid: '
                     f'give ROW,COL in 0..{n_win - 1}.')
  if not all(0 <= v < size for v in pixel):
    raise ValueError(f'--pixel {pixel[0]},{pixel[1]} is outside the {size}x{size} input: give '
                     f'Y,X in 0..{size - 1}.')


def run(args) -> str:
  """Does what the command line asks; returns a summary line. ValueError / FileNotFoundError
  for input the user must change."""
  if os.path.isfile(os.path.join(args.weights, classifier.ARTIFACT_FILE)):
    raise ValueError(f'{args.weights} is an exported artifact: it keeps only the compiled '
                     f'forward, not the attention internals. Visualise the training workdir or '
                     f'converted directory it was exported from.')
  clf = classifier.load(args.weights, step=args.step)
  if args.image:
    images = classifier.preprocess([classifier.read_image(args.image)], clf.preprocessing)
  else:
    images = load_array(args.array)
  n_win, size = clf.model.config.n_win, images.shape[1]
  query = args.query or (n_win // 2, n_win // 2)
  pixel = args.pixel or default_pixel(query, n_win, size)
  _check_grid(query, pixel, n_win, size)

  logits, captures = capture(clf.model, clf.variables, images)
  probs = np.exp(logits[0] - logits[0].max())
  probs /= probs.sum()
  top = int(np.argmax(probs))
  label = clf.class_names[top] if top < len(clf.class_names) else str(top)
  source = os.path.basename(args.image or args.array)
  title = (f'{source}: top-1 "{label}" ({probs[top]:.0%}); query region {query[0]},{query[1]}, '
           f'pixel {pixel[0]},{pixel[1]}\n{clf.description}')
  fig = draw(unnormalise(images[0]), captures, n_win=n_win, query=query, pixel=pixel,
             title=title)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=110)
  summary = f'wrote {args.out} (top-1 {label!r})'
  if args.dump:
    np.savez(args.dump, **dump_arrays(captures, pixel))
    summary += f' and {args.dump}'
  return summary


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    print(run(args))
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""Throughput, compile time, FLOPs, memory and MFU of DeBiFormer on this machine's backend.

  python -m debiformer_jax.benchmark --model debiformer_tiny --batch 8 --mode inference
  python -m debiformer_jax.benchmark --mode train --compare-torch
  python -m debiformer_jax.benchmark --mode train --remat --remat-compare
  python -m debiformer_jax.benchmark --mode train --profile /tmp/debiformer-trace
  python -m debiformer_jax.benchmark --model debi_small --features-only --size 512x512 \
      --batch 2 --compare-torch
  python -m debiformer_jax.benchmark --mode input --batch 32 --steps 16 --compare-timm

Inference is a jitted forward pass (eval mode). Train is the training loop's own step
(`train.train_step` with the ImageNet recipe: mixup/cutmix, label smoothing, drop path,
grad-norm clipping, AdamW, BatchNorm statistics; state donated). Images/s is the median over
the timed steps (each ended with block_until_ready) after the warm-up steps. FLOPs per image:
XLA's count for the compiled step (`cost_analysis`) next to the analytic count from the config
(`debiformer_jax.models.flops`; train = 3x forward). Peak memory: the compiled executable's
`memory_analysis` (temporaries + arguments + outputs, minus outputs aliased to donated
arguments); in train mode also the activations the forward pass saves for the backward pass
(what --remat trades for recomputation; XLA:CPU's peak does not shrink with remat, its
scheduler keeps the recomputed values alive, while these residuals do). MFU = analytic
FLOPs x images/s / the device's peak, where the peak is known.

--features-only measures the dense backbone (`create_model(MODEL, features_only=True)`: the
official segmentation settings, auto_pad, any --size HxW) in inference; its FLOPs count the
padded maps the attentions compute on, and --compare-torch runs our reference's dense backbone.

--compare-torch times our PyTorch reference of the official model
(`debiformer_jax.reference.torch_debiformer`) in the same process: eager, same batch and
dtype (bfloat16 through torch.autocast), torch.set_num_threads(core count), no_grad for
inference, cross-entropy and a torch AdamW step for train (no mixup or clipping: a little
less work than ours). JAX and torch steps alternate, so both see the same machine load; the
speed-up is given for the median steps and for the best (least disturbed) steps. The last
line of output is one JSON object with every number.

--mode input times the host's training and eval input pipelines on synthetic JPEGs (and, with
--compare-timm, timm's DataLoader on the same files): see debiformer_jax/input_benchmark.py.

--profile DIR traces two more steps with `jax.profiler` into DIR (open it with TensorBoard's
profile plugin or Perfetto) and prints where the step time goes: every XLA op's time, summed
per step and grouped by model part (from the op's name scope) and by direction (forward /
backward: autodiff's transpose scope / other, e.g. the optimizer). Ops can overlap on a
multi-core host, so the sum may exceed the step time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from debiformer_jax import config as config_lib
from debiformer_jax import input_benchmark, train, weights
from debiformer_jax.models import Implementation, create_model, get_architecture
from debiformer_jax.models.architecture import parse_override, parse_size
from debiformer_jax.models.flops import forward_macs

# Peak dense matmul FLOP/s per chip, by dtype: (device_kind substring, bf16, f32). For TPUs
# f32 is listed at the bf16 rate: XLA:TPU runs f32 matmuls at default precision as one bf16
# MXU pass. For NVIDIA GPUs f32 is the TF32 tensor-core rate (XLA's default for f32 dots on
# Ampere and later). Sources: Google Cloud TPU system architecture pages; NVIDIA A100/H100/H200
# datasheets (dense, without sparsity; SXM parts).
PEAK_FLOPS = (
    ('TPU v6 lite', 918e12, 918e12),  # v6e (Trillium)
    ('TPU v6e', 918e12, 918e12),
    ('TPU v5 lite', 197e12, 197e12),  # v5e
    ('TPU v5e', 197e12, 197e12),
    ('TPU v5p', 459e12, 459e12),
    ('TPU v5', 459e12, 459e12),  # v5p reports itself as 'TPU v5'
    ('TPU v4', 275e12, 275e12),
    ('H200', 989e12, 495e12),
    ('H100', 989e12, 495e12),
    ('A100', 312e12, 156e12),
)


def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """Peak FLOP/s of one device of this kind for `dtype` compute, or None if unknown (CPU)."""
  for key, bf16, f32 in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else f32
  return None


def _auto_or_int(text: str):
  return text if text == 'auto' else int(text)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='debiformer_tiny')
  p.add_argument('--override', type=parse_override, action='append', default=[],
                 metavar='FIELD=VALUE', help='replace a model config field, e.g. depths=(1,1,1,1)')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--resolution', type=int, default=224, help='square input side')
  p.add_argument('--size', type=parse_size, metavar='HxW',
                 help='input height x width (e.g. 512x683); replaces --resolution')
  p.add_argument('--features-only', action='store_true',
                 help='the dense backbone (official segmentation settings), inference only')
  p.add_argument('--mode', choices=('inference', 'train', 'eval', 'input'), default='inference',
                 help="'eval': the training loop's eval step (with --topology only); 'input': "
                      'the host input pipelines (debiformer_jax.input_benchmark)')
  p.add_argument('--dtype', choices=tuple(config_lib.DTYPES), default='float32',
                 help='compute dtype; parameters, softmax and norms stay float32')
  p.add_argument('--steps', type=int, default=10, help='timed steps')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  p.add_argument('--dwconv', default='auto', choices=('auto', 'shifted', 'grouped'))
  p.add_argument('--sampling', default='auto', choices=('auto', 'gather', 'matmul'))
  p.add_argument('--region-gather', default='auto', choices=('auto', 'take', 'onehot'))
  p.add_argument('--dense-routing', default='auto', type=_auto_or_int,
                 help="max dense logits per image and head for masked routing; 0 = never")
  p.add_argument('--remat', action='store_true', help='rematerialise every block (train)')
  p.add_argument('--remat-policy', default='dots_no_batch',
                 choices=('dots_no_batch', 'dots', 'nothing'))
  p.add_argument('--remat-compare', action='store_true',
                 help='train: also compile the other remat setting and report both peak memories')
  p.add_argument('--compare-torch', action='store_true',
                 help='time the PyTorch reference of the official model in the same run')
  p.add_argument('--profile', metavar='DIR',
                 help='trace two extra steps into DIR and print the time per model part')
  p.add_argument('--seed', type=int, default=0)
  input_benchmark.add_arguments(p)
  tpu = p.add_argument_group('TPU compile (debiformer_jax.tpu_compile; needs libtpu, no TPU)')
  tpu.add_argument('--topology', metavar='TOPO',
                   help="compile for a Cloud TPU slice instead of running here, e.g. 'v5e:2x2'")
  tpu.add_argument('--per-chip-batch', type=int, default=64)
  tpu.add_argument('--sharding', choices=config_lib.SHARDINGS, default='dp')
  tpu.add_argument('--max-batch', action='store_true',
                   help='find the largest per-chip batch that fits (a multiple of 8), by compiling '
                        'from --per-chip-batch')
  return p


# ---------------------------------------------------------------------------------------------
# What a compiled step costs.

@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes of a compiled executable (`memory_analysis`)."""
  temp: int
  argument: int
  output: int
  alias: int

  @property
  def peak(self) -> int:
    """Temporaries, arguments and outputs, without outputs aliased to donated arguments."""
    return self.temp + self.argument + self.output - self.alias

  @classmethod
  def of(cls, compiled) -> Optional['Memory']:
    try:
      m = compiled.memory_analysis()
    except Exception:  # Some backends do not implement it.
      return None
    if m is None:
      return None
    size = lambda k: int(getattr(m, f'{k}_size_in_bytes', 0) or 0)
    return cls(temp=size('temp'), argument=size('argument'), output=size('output'),
               alias=size('alias'))


def xla_cost(compiled, key: str) -> Optional[float]:
  """`key` ('flops', 'bytes accessed') of one run of `compiled` by XLA's cost model, if the
  backend gives it."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost[key]) if cost and key in cost else None


def residual_bytes(model, batch: int, size: Tuple[int, int]) -> Optional[int]:
  """Bytes of activations the forward pass saves for the backward pass (JAX's residuals of the
  training loss w.r.t. the parameters, arguments excluded): the backend-independent activation
  memory that rematerialisation trades for recomputation. None if this JAX cannot say."""
  try:
    from jax._src.ad_checkpoint import saved_residuals
  except ImportError:
    return None
  cfg = model.config
  variables = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), weights.abstract_variables(model))
  args = (variables['batch_stats'], jnp.zeros((batch, *size, cfg.in_chans)),
          jnp.full((batch, cfg.num_classes), 1.0 / cfg.num_classes), jax.random.PRNGKey(0))
  loss = lambda params: train.loss_fn(params, *args, model=model)[0]
  try:
    found = saved_residuals(loss, variables['params'])
  except Exception:  # A private JAX helper: never let it break the benchmark.
    return None
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, why in found
             if 'argument' not in why)


def compile_step(model, mode: str, batch: int, size: Tuple[int, int], seed: int):
  """Returns (compiled, compile_seconds, run) where run() performs one step and blocks.

  Train is the training loop's own step (`train.train_step`) with the recipe of
  `config.defaults()`: mixup/cutmix, label smoothing, drop path, grad-norm clipping and AdamW
  with its weight-decay mask, BatchNorm statistics, state donated.
  """
  cfg = model.config
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch, *size, cfg.in_chans)), jnp.float32)
  if mode == 'inference':
    variables = jax.jit(weights.init_variables, static_argnums=0)(model, jax.random.PRNGKey(seed))
    t0 = time.perf_counter()
    compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).compile()
    seconds = time.perf_counter() - t0

    def run():
      jax.block_until_ready(compiled(variables, images))

    return compiled, seconds, run
  config = config_lib.defaults()
  # Any schedule will do: its values do not change the step's cost.
  schedule = train.make_schedule(config, steps_per_epoch=1000, total_steps=300_000)
  tx = train.make_optimizer(config, schedule)
  state = [jax.jit(functools.partial(train.init_state, model=model, tx=tx, use_ema=False))(
      jax.random.PRNGKey(seed))]
  labels = jnp.asarray(rng.integers(0, cfg.num_classes, size=(batch,)), jnp.int32)
  # The pipeline's uint8 batch; the erasing fill costs the same whatever the boxes.
  pixels = jnp.asarray(rng.integers(0, 256, size=(batch, *size, cfg.in_chans)), jnp.uint8)
  data = {'image': pixels, 'label': labels, 'erase': jnp.zeros((batch, 4), jnp.int32)}
  step = functools.partial(train.train_step, model=model, tx=tx, schedule=schedule, config=config)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state[0], data).compile()
  seconds = time.perf_counter() - t0

  def run():
    new_state, metrics = compiled(state[0], data)
    jax.block_until_ready((new_state, metrics))
    state[0] = new_state

  return compiled, seconds, run


# ---------------------------------------------------------------------------------------------
# PyTorch reference.

def torch_step(cfg, mode: str, batch: int, size: Tuple[int, int], dtype: str, seed: int,
               features_only: bool = False):
  """One eager step of our PyTorch reference of the official model (its dense backbone with
  `features_only`); returns run()."""
  import torch

  from debiformer_jax.reference.torch_debiformer import build_torch_model
  torch.manual_seed(seed)
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model = build_torch_model(cfg, features_only)
  x = torch.randn(batch, cfg.in_chans, *size)
  y = torch.randint(0, cfg.num_classes, (batch,))

  def autocast():
    if dtype == 'bfloat16':
      return torch.autocast('cpu', dtype=torch.bfloat16)
    return contextlib.nullcontext()

  if mode == 'inference':
    model.eval()

    def run():
      with torch.no_grad(), autocast():
        model(x)

    return run
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

  def run():
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()

  return run


# ---------------------------------------------------------------------------------------------
# Profile: op times by model part.

PROFILE_STEPS = 2
# First match wins; searched in the op's name scope (Flax module path + JAX transformations).
PARTS = (('depthwise conv', r'/(dwconv|lepe|pos_embed\d|offset_dwconv)/'),
         ('norm', r'/(norm\d|\w+_norm|stem_bn\d)/'),
         ('stem + downsampling', r'/(stem_|downsample)'),
         ('attention (BRA / DBRA)', r'/attn\d/'),
         ('MLP', r'/mlp\d/'),
         ('head', r'/(head|final_norm)'))


def _op_scopes(compiled) -> Dict[str, str]:
  """HLO instruction name -> its op_name metadata (the JAX name scope), from the HLO text."""
  return dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"',
                         compiled.as_text(), re.M))


def profile_breakdown(trace_dir: str, compiled, steps: int,
                      train_mode: bool = True) -> Optional[Dict[str, Any]]:
  """Op time per step from the newest trace in trace_dir: {'trace', 'total_ms', 'matmul_ms',
  'parts': [(part, direction, ms, of which matmul/conv ms)]}; None if no op can be named."""
  traces = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True),
                  key=os.path.getmtime)
  if not traces:
    return None
  with gzip.open(traces[-1]) as f:
    events = json.load(f).get('traceEvents', [])
  scopes = _op_scopes(compiled)
  total, matmul = collections.Counter(), collections.Counter()
  for e in events:
    scope = scopes.get(e.get('name'))
    if e.get('ph') != 'X' or scope is None:
      continue
    part = next((name for name, pattern in PARTS if re.search(pattern, scope)), 'other')
    direction = ('backward' if 'transpose(' in scope else
                 'forward' if not train_mode or 'jvp(' in scope or part != 'other' else
                 'other (optimizer, loss)')
    ms = e['dur'] / 1e3 / steps
    total[(part, direction)] += ms
    if re.search(r'dot_general|conv_general_dilated', scope):
      matmul[(part, direction)] += ms
  if not total:
    return None
  rows = [(part, direction, ms, matmul[(part, direction)])
          for (part, direction), ms in total.most_common()]
  return {'trace': traces[-1], 'total_ms': sum(total.values()),
          'matmul_ms': sum(matmul.values()), 'parts': rows}


def _profile(run, compiled, trace_dir: str, train_mode: bool) -> Optional[Dict[str, Any]]:
  with jax.profiler.trace(trace_dir):
    for _ in range(PROFILE_STEPS):
      run()
  return profile_breakdown(trace_dir, compiled, PROFILE_STEPS, train_mode)


# ---------------------------------------------------------------------------------------------
# The measurement.

@dataclasses.dataclass(frozen=True)
class Times:
  """Seconds per step of the timed steps."""
  steps: List[float]

  @property
  def median(self) -> float:
    return statistics.median(self.steps)

  @property
  def best(self) -> float:
    return min(self.steps)


@dataclasses.dataclass(frozen=True)
class Other:
  """The compiled step with the other remat setting (--remat-compare)."""
  remat: bool
  memory: Optional[Memory]
  residual_bytes: Optional[int]


@dataclasses.dataclass(frozen=True)
class Result:
  """Everything one benchmark run measured; the derived numbers are properties."""
  model: str
  overrides: Dict[str, Any]
  features_only: bool
  mode: str
  batch: int
  size: Tuple[int, int]  # Input height, width.
  dtype: str
  backend: str
  device: str
  implementation: Dict[str, Any]  # Resolved for the backend.
  warmup: int
  times: Times
  compile_s: float
  xla_flops: Optional[float]  # Per step.
  analytic_macs: int  # Forward pass, per image.
  memory: Optional[Memory]
  residual_bytes: Optional[int]  # Train mode.
  device_peak_flops: Optional[float]
  profile: Optional[Dict[str, Any]] = None
  profile_dir: Optional[str] = None
  remat_other: Optional[Other] = None
  torch_times: Optional[Times] = None
  torch_threads: Optional[int] = None

  @property
  def images_per_s(self) -> float:
    return self.batch / self.times.median

  @property
  def analytic_flops_per_image(self) -> float:
    """2 FLOPs per MAC; a train step is 3 forward passes' worth (forward + backward)."""
    return 2 * self.analytic_macs * (3 if self.mode == 'train' else 1)

  @property
  def xla_flops_per_image(self) -> Optional[float]:
    return None if self.xla_flops is None else self.xla_flops / self.batch

  @property
  def mfu(self) -> Optional[float]:
    if self.device_peak_flops is None:
      return None
    return self.analytic_flops_per_image * self.images_per_s / self.device_peak_flops

  @property
  def torch_images_per_s(self) -> Optional[float]:
    return None if self.torch_times is None else self.batch / self.torch_times.median

  @property
  def speedup_vs_torch(self) -> Optional[float]:
    """Median step time of the reference over ours."""
    return None if self.torch_times is None else self.torch_times.median / self.times.median

  @property
  def speedup_vs_torch_best(self) -> Optional[float]:
    """The same for the best (least disturbed) steps."""
    return None if self.torch_times is None else self.torch_times.best / self.times.best

  def to_json(self) -> Dict[str, Any]:
    """The fields and the derived numbers, for the last output line."""
    out = dataclasses.asdict(self)
    for name in ('images_per_s', 'analytic_flops_per_image', 'xla_flops_per_image', 'mfu',
                 'torch_images_per_s', 'speedup_vs_torch', 'speedup_vs_torch_best'):
      out[name] = getattr(self, name)
    if self.memory is not None:
      out['memory']['peak'] = self.memory.peak
    if self.remat_other is not None and self.remat_other.memory is not None:
      out['remat_other']['memory']['peak'] = self.remat_other.memory.peak
    return out


def _timed(run) -> float:
  t0 = time.perf_counter()
  run()
  return time.perf_counter() - t0


def benchmark(args) -> Result:
  for name, least in (('steps', 1), ('warmup', 0), ('batch', 1)):
    if getattr(args, name) < least:
      raise ValueError(f'--{name} {getattr(args, name)} must be at least {least}.')
  overrides = dict(args.override)
  size = args.size or (args.resolution, args.resolution)
  if args.features_only and args.mode == 'train':
    raise ValueError("--features-only measures the backbone's forward pass: use --mode "
                     "inference (the train step is the classifier's).")
  cfg = get_architecture(args.model, backbone=args.features_only, **overrides)
  cfg.check_input_size(*size)
  impl = Implementation(dwconv=args.dwconv, sampling=args.sampling,
                        region_gather=args.region_gather, dense_routing=args.dense_routing,
                        remat=args.remat, remat_policy=args.remat_policy)
  train_mode = args.mode == 'train'
  build = lambda impl: create_model(args.model, features_only=args.features_only,
                                    dtype=config_lib.DTYPES[args.dtype], impl=impl, **overrides)
  model = build(impl)
  compiled, compile_s, run = compile_step(model, args.mode, args.batch, size, args.seed)

  remat_other = None
  if args.remat_compare and train_mode:
    other = build(dataclasses.replace(impl, remat=not args.remat))
    other_compiled, _, _ = compile_step(other, args.mode, args.batch, size, args.seed)
    remat_other = Other(remat=not args.remat, memory=Memory.of(other_compiled),
                        residual_bytes=residual_bytes(other, args.batch, size))
    del other_compiled

  torch_run = None
  if args.compare_torch:
    torch_run = torch_step(cfg, args.mode, args.batch, size, args.dtype, args.seed,
                           args.features_only)

  for _ in range(args.warmup):
    run()
    if torch_run:
      torch_run()
  times, torch_times = [], []
  for _ in range(args.steps):  # Alternate, so both see the same machine load.
    times.append(_timed(run))
    if torch_run:
      torch_times.append(_timed(torch_run))

  device = jax.devices()[0]
  return Result(
      model=args.model, overrides=overrides, features_only=args.features_only, mode=args.mode,
      batch=args.batch, size=size, dtype=args.dtype, backend=jax.default_backend(),
      device=device.device_kind, implementation=dataclasses.asdict(impl.resolve()),
      warmup=args.warmup, times=Times(times), compile_s=compile_s,
      xla_flops=xla_cost(compiled, 'flops'),
      analytic_macs=forward_macs(cfg, *size, head=not args.features_only)['total'],
      memory=Memory.of(compiled),
      residual_bytes=residual_bytes(model, args.batch, size) if train_mode else None,
      device_peak_flops=peak_flops(device.device_kind, args.dtype),
      profile=_profile(run, compiled, args.profile, train_mode) if args.profile else None,
      profile_dir=args.profile, remat_other=remat_other,
      torch_times=Times(torch_times) if torch_run else None,
      torch_threads=__import__('torch').get_num_threads() if torch_run else None)


def _mib(n: Optional[int]) -> str:
  return 'n/a' if n is None else f'{n / 2 ** 20:,.1f} MiB'


def _ms(seconds: float) -> str:
  return f'{seconds * 1e3:.1f} ms'


def format_table(r: Result) -> str:
  """The human-readable report of a Result."""
  impl = ', '.join(f'{k}={v}' for k, v in r.implementation.items())
  m = r.memory
  rows = [
      ('model', r.model + (' (backbone)' if r.features_only else '')
       + (f' {r.overrides}' if r.overrides else '')),
      ('mode / dtype', f'{r.mode} / {r.dtype}'),
      ('batch x size', f'{r.batch} x {r.size[0]}x{r.size[1]}'),
      ('device', f'{r.backend}: {r.device}'),
      ('implementation', impl),
      ('images/s (median)', f'{r.images_per_s:.2f}   (step {_ms(r.times.median)}; min '
                            f'{_ms(r.times.best)}, max {_ms(max(r.times.steps))}; '
                            f'{len(r.times.steps)} steps after {r.warmup} warm-up)'),
      ('compile time', f'{r.compile_s:.1f} s'),
      ('GFLOPs/image, XLA', 'n/a' if r.xla_flops is None else f'{r.xla_flops_per_image / 1e9:.3f}'),
      ('GFLOPs/image, analytic', f'{r.analytic_flops_per_image / 1e9:.3f}   '
                                 f'({r.analytic_macs / 1e9:.3f} GMACs forward)'),
      ('XLA / analytic', 'n/a' if r.xla_flops is None else
       f'{r.xla_flops_per_image / r.analytic_flops_per_image:.3f}'),
      ('peak memory', 'n/a' if m is None else
       f'{_mib(m.peak)}   (temp {_mib(m.temp)}, args {_mib(m.argument)}, out {_mib(m.output)}, '
       f'aliased {_mib(m.alias)})'),
      ('saved activations', 'n/a (inference)' if r.mode != 'train' else
       f'{_mib(r.residual_bytes)}   (forward residuals kept for the backward pass)'),
      ('MFU', 'n/a (peak FLOP/s of this device unknown)' if r.mfu is None else
       f'{r.mfu * 100:.1f}% of {r.device_peak_flops / 1e12:.0f} TFLOP/s'),
  ]
  if r.remat_other is not None:
    o, remat = r.remat_other, r.implementation['remat']
    ratio = lambda a, b: ('' if not a or not b else
                          f'   (remat={remat} / remat={o.remat}: {a / b:.2f}x)')
    mine, theirs = (None if x is None else x.peak for x in (m, o.memory))
    rows.append((f'peak memory, remat={o.remat}', _mib(theirs) + ratio(mine, theirs)))
    rows.append((f'saved activations, remat={o.remat}',
                 _mib(o.residual_bytes) + ratio(r.residual_bytes, o.residual_bytes)))
  if r.torch_times is not None:
    rows.append(('PyTorch reference', f'{r.torch_images_per_s:.2f} images/s   (step '
                                      f'{_ms(r.torch_times.median)}; {r.torch_threads} threads, '
                                      f'eager)'))
    rows.append(('speed-up vs PyTorch', f'{r.speedup_vs_torch:.2f}x median steps   '
                                        f'({r.speedup_vs_torch_best:.2f}x best steps)'))
  width = max(len(k) for k, _ in rows)
  table = '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)
  if r.profile:
    prof = r.profile
    lines = [f"\ntime per step by part ({prof['trace']}): op time summed, "
             f"{prof['total_ms']:.0f} ms, of which matmuls/convs {prof['matmul_ms']:.0f} ms",
             f"  {'part':<24} {'direction':<24} {'ms/step':>8} {'matmul':>8} {'share':>6}"]
    for part, direction, ms, mm in prof['parts']:
      lines.append(f'  {part:<24} {direction:<24} {ms:8.1f} {mm:8.1f} '
                   f"{ms / prof['total_ms'] * 100:5.1f}%")
    table += '\n'.join(lines)
  elif r.profile_dir:
    table += f'\nprofile: no op events could be named in the trace under {r.profile_dir}'
  return table


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.topology:
    from debiformer_jax import tpu_compile  # It imports this module's helpers.
    return tpu_compile.main(args)
  if args.mode == 'input':
    return input_benchmark.main(args)
  try:
    if args.mode == 'eval':
      raise ValueError("--mode eval compiles the training loop's eval step for a TPU slice: "
                       'add --topology (e.g. v5e:2x2), or use --mode inference here.')
    result = benchmark(args)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_table(result))
  print(json.dumps(result.to_json(), sort_keys=True))
  return 0


if __name__ == '__main__':
  sys.exit(main())

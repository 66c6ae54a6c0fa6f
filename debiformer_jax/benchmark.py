"""Throughput, compile time, FLOPs, memory and MFU of DeBiFormer on this machine's backend.

  python -m debiformer_jax.benchmark --model debiformer_tiny --batch 8 --mode inference
  python -m debiformer_jax.benchmark --mode train --compare-torch
  python -m debiformer_jax.benchmark --mode train --remat --remat-compare
  python -m debiformer_jax.benchmark --mode train --profile /tmp/debiformer-trace

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

--compare-torch times our PyTorch reference of the official model
(`debiformer_jax.reference.torch_debiformer`) in the same process: eager, same batch and
dtype (bfloat16 through torch.autocast), torch.set_num_threads(core count), no_grad for
inference, cross-entropy and a torch AdamW step for train (no mixup or clipping: a little
less work than ours). JAX and torch steps alternate, so both see the same machine load; the
speed-up is given for the median steps and for the best (least disturbed) steps. The last
line of output is one JSON object with every number.

--profile DIR traces two more steps with `jax.profiler` into DIR (open it with TensorBoard's
profile plugin or Perfetto) and prints where the step time goes: every XLA op's time, summed
per step and grouped by model part (from the op's name scope) and by direction (forward /
backward: autodiff's transpose scope / other, e.g. the optimizer). Ops can overlap on a
multi-core host, so the sum may exceed the step time.
"""

from __future__ import annotations

import argparse
import collections
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
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from debiformer_jax import config_defaults, train
from debiformer_jax.models import Implementation, create_model, get_config
from debiformer_jax.models.config import parse_override
from debiformer_jax.models.flops import forward_macs

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

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
  p.add_argument('--resolution', type=int, default=224)
  p.add_argument('--mode', choices=('inference', 'train'), default='inference')
  p.add_argument('--dtype', choices=tuple(DTYPES), default='float32',
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
  return p


# ---------------------------------------------------------------------------------------------
# JAX steps.

def _cost_flops(compiled) -> Optional[float]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def _memory(compiled) -> Dict[str, Optional[int]]:
  try:
    m = compiled.memory_analysis()
  except Exception:
    m = None
  if m is None:
    return {'peak_bytes': None}
  out = {k: int(getattr(m, f'{k}_size_in_bytes', 0) or 0)
         for k in ('temp', 'argument', 'output', 'alias', 'generated_code')}
  out['peak_bytes'] = out['temp'] + out['argument'] + out['output'] - out['alias']
  return out


def residual_bytes(model, batch: int, resolution: int) -> Optional[int]:
  """Bytes of activations the forward pass saves for the backward pass (JAX's residuals of the
  training loss w.r.t. the parameters, arguments excluded): the backend-independent activation
  memory that rematerialisation trades for recomputation. None if this JAX cannot say."""
  try:
    from jax._src.ad_checkpoint import saved_residuals
  except ImportError:
    return None
  cfg = model.config
  images = jax.ShapeDtypeStruct((batch, resolution, resolution, cfg.in_chans), jnp.float32)
  variables = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                           jax.eval_shape(model.init, jax.random.PRNGKey(0), images))
  args = (variables['batch_stats'], jnp.zeros(images.shape, images.dtype),
          jnp.full((batch, cfg.num_classes), 1.0 / cfg.num_classes), jax.random.PRNGKey(0))
  loss = lambda params: train.loss_fn(params, *args, model=model)[0]
  try:
    found = saved_residuals(loss, variables['params'])
  except Exception:  # a private JAX helper: never let it break the benchmark
    return None
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, why in found
             if 'argument' not in why)


def compile_step(model, mode: str, batch: int, resolution: int, seed: int):
  """Returns (compiled, compile_seconds, run) where run() performs one step and blocks.

  Train is the training loop's own step (`train.train_step`) with the ImageNet recipe of
  `config_defaults`: mixup/cutmix, label smoothing, drop path, grad-norm clipping and AdamW
  with its weight-decay mask, BatchNorm statistics, state donated.
  """
  cfg = model.config
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch, resolution, resolution, cfg.in_chans)),
                       jnp.float32)
  if mode == 'inference':
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), images[:1])
    t0 = time.perf_counter()
    compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).compile()
    seconds = time.perf_counter() - t0

    def run():
      jax.block_until_ready(compiled(variables, images))

    return compiled, seconds, run
  config = config_defaults.base_config()
  # Any schedule will do: its values do not change the step's cost.
  schedule = train.make_schedule(config, steps_per_epoch=1000, total_steps=300_000)
  tx = train.make_optimizer(config, schedule)
  state = [jax.jit(functools.partial(train.init_state, model=model, tx=tx,
                                     image_size=resolution, use_ema=False))(
      jax.random.PRNGKey(seed))]
  labels = jnp.asarray(rng.integers(0, cfg.num_classes, size=(batch,)), jnp.int32)
  data = {'image': images, 'label': labels}
  step = functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                           num_classes=cfg.num_classes, data_config=config.data, ema_decay=0.0)
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

def torch_step(cfg, mode: str, batch: int, resolution: int, dtype: str, seed: int):
  """One eager step of our PyTorch reference of the official model; returns run()."""
  import torch

  from debiformer_jax.reference.torch_debiformer import build_torch_model
  torch.manual_seed(seed)
  torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                        else os.cpu_count())
  model = build_torch_model(cfg)
  x = torch.randn(batch, cfg.in_chans, resolution, resolution)
  y = torch.randint(0, cfg.num_classes, (batch,))
  autocast = (lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if dtype == 'bfloat16' else None

  def ctx():
    import contextlib
    return autocast() if autocast else contextlib.nullcontext()

  if mode == 'inference':
    model.eval()

    def run():
      with torch.no_grad(), ctx():
        model(x)

    return run
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

  def run():
    opt.zero_grad(set_to_none=True)
    with ctx():
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
                      train: bool = True) -> Optional[Dict[str, Any]]:
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
                 'forward' if not train or 'jvp(' in scope or part != 'other' else
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


def _profile(run, compiled, trace_dir: str, train: bool) -> Optional[Dict[str, Any]]:
  with jax.profiler.trace(trace_dir):
    for _ in range(PROFILE_STEPS):
      run()
  return profile_breakdown(trace_dir, compiled, PROFILE_STEPS, train)


# ---------------------------------------------------------------------------------------------

def _timed(run) -> float:
  t0 = time.perf_counter()
  run()
  return time.perf_counter() - t0


def benchmark(args) -> Dict[str, Any]:
  overrides = dict(args.override)
  cfg = get_config(args.model, **overrides)
  cfg.check_input_size(args.resolution, args.resolution)
  impl = Implementation(dwconv=args.dwconv, sampling=args.sampling,
                        region_gather=args.region_gather, dense_routing=args.dense_routing,
                        remat=args.remat, remat_policy=args.remat_policy)
  train = args.mode == 'train'
  resolved = impl.resolve()
  model = create_model(args.model, dtype=DTYPES[args.dtype], impl=impl, **overrides)
  device = jax.devices()[0]

  compiled, compile_s, run = compile_step(model, args.mode, args.batch, args.resolution,
                                          args.seed)
  xla_flops = _cost_flops(compiled)
  memory = _memory(compiled)
  macs = forward_macs(cfg, args.resolution)
  analytic = 2 * macs['total'] * (3 if train else 1)

  residuals = residual_bytes(model, args.batch, args.resolution) if train else None
  remat_other = None
  if args.remat_compare and train:
    other = create_model(args.model, dtype=DTYPES[args.dtype],
                         impl=dataclasses.replace(impl, remat=not args.remat), **overrides)
    other_compiled, _, _ = compile_step(other, args.mode, args.batch, args.resolution, args.seed)
    remat_other = _memory(other_compiled)
    remat_other['residual_bytes'] = residual_bytes(other, args.batch, args.resolution)
    del other_compiled

  torch_run = None
  if args.compare_torch:
    torch_run = torch_step(cfg, args.mode, args.batch, args.resolution, args.dtype, args.seed)

  for _ in range(args.warmup):
    run()
    if torch_run:
      torch_run()
  times, torch_times = [], []
  for _ in range(args.steps):  # alternate, so both see the same machine load
    times.append(_timed(run))
    if torch_run:
      torch_times.append(_timed(torch_run))

  profile = _profile(run, compiled, args.profile, train) if args.profile else None
  median = statistics.median(times)
  ips = args.batch / median
  peak = peak_flops(device.device_kind, args.dtype)
  n_dev = 1  # the step runs on one device
  result = {
      'model': args.model, 'overrides': {k: list(v) if isinstance(v, tuple) else v
                                         for k, v in overrides.items()},
      'mode': args.mode, 'batch': args.batch, 'resolution': args.resolution,
      'dtype': args.dtype, 'backend': jax.default_backend(), 'device': device.device_kind,
      'implementation': dataclasses.asdict(resolved),
      'steps': args.steps, 'warmup': args.warmup,
      'images_per_s': ips, 'step_s_median': median,
      'step_s_min': min(times), 'step_s_max': max(times),
      'compile_s': compile_s,
      'xla_gflops_per_image': None if xla_flops is None else xla_flops / args.batch / 1e9,
      'analytic_gflops_per_image': analytic / 1e9,
      'analytic_gmacs_forward': macs['total'] / 1e9,
      'xla_over_analytic': None if xla_flops is None else xla_flops / args.batch / analytic,
      'peak_memory_bytes': memory['peak_bytes'], 'memory': memory,
      'profile': profile, 'profile_dir': args.profile,
      'residual_bytes': residuals,
      'device_peak_flops': peak,
      'mfu': None if peak is None else analytic * ips / (peak * n_dev),
  }
  if remat_other is not None:
    result['remat_compare'] = {'remat': not args.remat, 'peak_memory_bytes':
                               remat_other['peak_bytes'], 'memory': remat_other,
                               'residual_bytes': remat_other['residual_bytes']}
  if torch_run:
    torch_median = statistics.median(torch_times)
    result.update({'torch_images_per_s': args.batch / torch_median,
                   'torch_step_s_median': torch_median,
                   'torch_step_s_min': min(torch_times), 'torch_step_s_max': max(torch_times),
                   'torch_threads': __import__('torch').get_num_threads(),
                   'speedup_vs_torch': torch_median / median,
                   'speedup_vs_torch_best_step': min(torch_times) / min(times)})
  return result


def _fmt_bytes(n: Optional[int]) -> str:
  return 'n/a' if n is None else f'{n / 2 ** 20:,.1f} MiB'


def format_table(r: Dict[str, Any]) -> str:
  impl = ', '.join(f'{k}={v}' for k, v in r['implementation'].items())
  na = lambda v, f: 'n/a' if v is None else f.format(v)
  rows = [
      ('model', f"{r['model']}" + (f" {r['overrides']}" if r['overrides'] else '')),
      ('mode / dtype', f"{r['mode']} / {r['dtype']}"),
      ('batch x resolution', f"{r['batch']} x {r['resolution']}"),
      ('device', f"{r['backend']}: {r['device']}"),
      ('implementation', impl),
      ('images/s (median)', f"{r['images_per_s']:.2f}   (step {r['step_s_median'] * 1e3:.1f} ms; "
                            f"min {r['step_s_min'] * 1e3:.1f}, max {r['step_s_max'] * 1e3:.1f}; "
                            f"{r['steps']} steps after {r['warmup']} warm-up)"),
      ('compile time', f"{r['compile_s']:.1f} s"),
      ('GFLOPs/image, XLA', na(r['xla_gflops_per_image'], '{:.3f}')),
      ('GFLOPs/image, analytic', f"{r['analytic_gflops_per_image']:.3f}   "
                                 f"({r['analytic_gmacs_forward']:.3f} GMACs forward)"),
      ('XLA / analytic', na(r['xla_over_analytic'], '{:.3f}')),
      ('peak memory', f"{_fmt_bytes(r['peak_memory_bytes'])}   (temp "
                      f"{_fmt_bytes(r['memory'].get('temp'))}, args "
                      f"{_fmt_bytes(r['memory'].get('argument'))}, out "
                      f"{_fmt_bytes(r['memory'].get('output'))}, aliased "
                      f"{_fmt_bytes(r['memory'].get('alias'))})"),
      ('saved activations', 'n/a (inference)' if r['mode'] != 'train' else
       f"{_fmt_bytes(r['residual_bytes'])}   (forward residuals kept for the backward pass)"),
      ('MFU', 'n/a (peak FLOP/s of this device unknown)' if r['mfu'] is None else
       f"{r['mfu'] * 100:.1f}% of {r['device_peak_flops'] / 1e12:.0f} TFLOP/s"),
  ]
  if 'remat_compare' in r:
    other, remat = r['remat_compare'], r['implementation']['remat']
    for label, mine, theirs in (('peak memory', r['peak_memory_bytes'], other['peak_memory_bytes']),
                                ('saved activations', r['residual_bytes'],
                                 other['residual_bytes'])):
      ratio = '' if not mine or not theirs else (f'   (remat={remat} / remat={other["remat"]}: '
                                                 f'{mine / theirs:.2f}x)')
      rows.append((f"{label}, remat={other['remat']}", _fmt_bytes(theirs) + ratio))
  if 'torch_images_per_s' in r:
    rows.append(('PyTorch reference', f"{r['torch_images_per_s']:.2f} images/s   (step "
                                      f"{r['torch_step_s_median'] * 1e3:.1f} ms; "
                                      f"{r['torch_threads']} threads, eager)"))
    rows.append(('speed-up vs PyTorch', f"{r['speedup_vs_torch']:.2f}x median steps   "
                                        f"({r['speedup_vs_torch_best_step']:.2f}x best steps)"))
  width = max(len(k) for k, _ in rows)
  table = '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)
  if r.get('profile'):
    prof = r['profile']
    lines = [f"\ntime per step by part ({prof['trace']}): op time summed, "
             f"{prof['total_ms']:.0f} ms, of which matmuls/convs {prof['matmul_ms']:.0f} ms",
             f"  {'part':<24} {'direction':<24} {'ms/step':>8} {'matmul':>8} {'share':>6}"]
    for part, direction, ms, mm in prof['parts']:
      lines.append(f'  {part:<24} {direction:<24} {ms:8.1f} {mm:8.1f} '
                   f"{ms / prof['total_ms'] * 100:5.1f}%")
    table += '\n'.join(lines)
  elif 'profile' in r and r['profile'] is None and r.get('profile_dir'):
    table += f"\nprofile: no op events could be named in the trace under {r['profile_dir']}"
  return table


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    result = benchmark(args)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_table(result))
  print(json.dumps(result, sort_keys=True))
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""The training loop's steps compiled for a Cloud TPU topology, on a machine without a TPU.

  python -m debiformer_jax.benchmark --topology v5e:2x2 --model debiformer_small \
      --dtype bfloat16 --per-chip-batch 64 --sharding dp
  python -m debiformer_jax.benchmark --topology v4:2x2x1 --model debiformer_tiny \
      --dtype bfloat16 --remat --max-batch

libtpu (`pip install "jax[tpu]==<the pinned jax>"`) carries XLA's TPU compiler; with it,
`jax.experimental.topologies.get_topology_desc` describes the chips of a slice without any
being attached (JAX keeps running ordinary work on the CPU). The steps are `train.py`'s own:
`compile_train_step` (train mode) and `compile_eval_step` (eval mode) on a ('data', 'model')
mesh over those chips, with the state and batch shardings the loop uses ('dp' or 'fsdp').
Inference mode compiles the forward pass alone. 'auto' formulation fields resolve to the TPU
defaults (`models/implementation.py`), not to this host's.

What comes out is the compiler's: per-chip memory (`memory_analysis`), FLOPs and bytes
accessed (`cost_analysis`; its `optimal_seconds` is not a time), and the HLO's collectives
(kind, count, bytes moved per step: the sum of their result sizes, counted once per
appearance in the program) and gathers/scatters. A step that does not fit the chip's HBM
fails to compile (RESOURCE_EXHAUSTED), early and cheaply; that becomes `DoesNotFit`, whose
message names the fixes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import json
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import ml_collections
import numpy as np

from debiformer_jax import config as config_lib
from debiformer_jax import device_augment, sharding, train
from debiformer_jax.benchmark import Memory, xla_cost
from debiformer_jax.models import Implementation
from debiformer_jax.models.flops import forward_macs

INSTALL = f'pip install "jax[tpu]=={jax.__version__}"'
LOCKFILE = '/tmp/libtpu_lockfile'  # libtpu's own path; one process may hold it.
# HBM per chip (GiB) by device kind, first match wins; Google Cloud TPU system architecture
# pages. The compiler keeps a little for itself (v5e: 15.75 of 16 GiB usable).
HBM_GIB = (('TPU v6 lite', 32), ('TPU v5 lite', 16), ('TPU v5', 95), ('TPU v4', 32))
# Generations with two TensorCores per chip, run as one device per chip (megacore) on Cloud TPU.
MEGACORE = ('v4', 'v5p')
MODES = ('train', 'eval', 'inference')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
                'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}


class LibtpuMissing(RuntimeError):
  """libtpu, XLA's TPU compiler, is not installed."""


class LibtpuBusy(RuntimeError):
  """Another process on this machine holds libtpu's lock; TPU compiles run one at a time."""


class DoesNotFit(RuntimeError):
  """The step needs more memory than one chip has."""


def topology_devices(name: str) -> List[jax.Device]:
  """The (compile-only) devices of a Cloud TPU slice such as 'v5e:2x2' or 'v4:2x2x1', one per
  chip."""
  if importlib.util.find_spec('libtpu') is None:
    raise LibtpuMissing(f'compiling for --topology {name} needs libtpu, XLA\'s TPU compiler: '
                        f'{INSTALL} (it installs beside the CPU jaxlib; no TPU needed).')
  from jax.experimental import topologies
  kwargs = {'chip_config_name': 'megacore'} if name.split(':')[0] in MEGACORE else {}
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform='tpu',
                                             **kwargs).devices)
  except Exception as e:  # libtpu says INVALID_ARGUMENT / NOT_FOUND in many wordings.
    if 'lockfile' in str(e):
      raise LibtpuBusy(f'another process on this machine holds libtpu\'s lock {LOCKFILE} '
                       f'(libtpu serves one process at a time, so TPU compiles cannot run two '
                       f'at once; any JAX process holds it where libtpu is installed); wait '
                       f'for it to finish, or, where no TPU is attached, set '
                       f'ALLOW_MULTIPLE_LIBTPU_LOAD=1 for this command (libtpu then shares '
                       f'itself; never on a TPU host whose chips another process uses).') from e
    raise ValueError(f'--topology {name!r} is not a TPU topology libtpu knows ({e}); use '
                     f"GENERATION:SHAPE, e.g. 'v5e:2x2', 'v6e:2x2', 'v4:2x2x1', 'v5p:2x2x1'.")


def hbm_bytes(device_kind: str) -> Optional[int]:
  for key, gib in HBM_GIB:
    if key.lower() in device_kind.lower():
      return gib * 2 ** 30
  return None


def tpu_config(config: ml_collections.ConfigDict, per_chip_batch: int,
               num_chips: int) -> ml_collections.ConfigDict:
  """A copy of `config` for `num_chips` chips: global batch = per_chip_batch x chips, and the
  formulation's 'auto' fields resolved for TPU."""
  if per_chip_batch < 1:
    raise ValueError(f'--per-chip-batch {per_chip_batch} must be >= 1.')
  config = config.copy_and_resolve_references()
  config.global_batch_size = per_chip_batch * num_chips
  fields = config.impl.to_dict()
  if isinstance(fields['dense_routing'], str) and fields['dense_routing'].isdigit():
    fields['dense_routing'] = int(fields['dense_routing'])
  resolved = Implementation(**fields).resolve('tpu')
  config.impl = ml_collections.ConfigDict(dataclasses.asdict(resolved))
  return config


# ---------------------------------------------------------------------------------------------
# What the HLO holds.

def _shape_bytes(shape: str) -> int:
  """Bytes of an HLO result shape such as 'f32[64,128]{1,0}' or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', shape):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',') if d]))
  return total


def hlo_ops(hlo: str) -> Dict[str, Any]:
  """{'collectives': {kind: {'count', 'bytes'}}, 'gathers', 'scatters', 'while_loops',
  'compiler_remat'} of an HLO module's text, each op counted once where it appears.
  'compiler_remat': instructions XLA's own rematerialisation pass cloned (named '*.remat',
  '*.remat2', ...) to bring a step that would not fit under the chip's HBM; not `--remat`'s,
  which JAX does before XLA sees the program. Bytes: the full-size arrays a collective
  reduces, gathers or sends (its result; for an async start, the largest array of the result
  tuple, which also holds the operand and, for a collective-permute, u32 contexts). XLA:TPU
  writes a reduce-scatter as an all-reduce and slices fused into a computation named
  'all-reduce-scatter...': counted as a reduce-scatter."""
  collectives = collections.defaultdict(lambda: {'count': 0, 'bytes': 0})
  counts = collections.Counter()
  computation = ''
  for line in hlo.splitlines():
    header = re.match(r'(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header:
      computation = header.group(1)
      continue
    op = re.match(r'\s+(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(', line)
    if not op:
      continue
    result, shape, name = op.groups()
    if re.search(r'\.remat\d*$', result):
      counts['remat'] += 1
    kind = name[:-len('-start')] if name.endswith('-start') else name
    if kind in COLLECTIVES:
      if name.endswith('-start') and shape.startswith('('):
        shape = max(re.findall(r'[a-z]+\d*\[[\d,]*\]', shape), key=_shape_bytes)
      if kind == 'all-reduce' and computation.startswith('all-reduce-scatter'):
        kind = 'reduce-scatter'
      collectives[kind]['count'] += 1
      collectives[kind]['bytes'] += _shape_bytes(shape)
    elif name in ('gather', 'scatter', 'while'):
      counts[name] += 1
  return {'collectives': dict(collectives), 'gathers': counts['gather'],
          'scatters': counts['scatter'], 'while_loops': counts['while'],
          'compiler_remat': counts['remat']}


# ---------------------------------------------------------------------------------------------
# Compiling.

@dataclasses.dataclass(frozen=True)
class Compiled:
  """One step compiled for a topology; bytes are per chip."""
  step: str  # 'train', 'eval' or 'inference'.
  topology: str
  device_kind: str
  num_chips: int
  per_chip_batch: int
  sharding: str
  implementation: Dict[str, Any]
  compile_s: float
  memory: Memory
  hbm: Optional[int]
  flops: Optional[float]  # Per chip and step (XLA's count).
  bytes_accessed: Optional[float]  # Per chip and step.
  analytic_flops_per_image: float
  hlo: Dict[str, Any]

  @property
  def xla_flops_per_image(self) -> Optional[float]:
    return None if self.flops is None else self.flops / self.per_chip_batch

  @property
  def free(self) -> Optional[int]:
    """HBM left on each chip (negative: short by that much)."""
    return None if self.hbm is None else self.hbm - self.memory.peak

  def to_json(self) -> Dict[str, Any]:
    out = dataclasses.asdict(self)
    out['memory']['peak'] = self.memory.peak
    out['xla_flops_per_image'], out['free'] = self.xla_flops_per_image, self.free
    return out


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'exceeds available HBM' in text


def fixes(config: ml_collections.ConfigDict, per_chip_batch: int) -> str:
  """The changes that lower per-chip memory, for the sentence that says a step does not fit."""
  out = []
  if not config.impl.remat:
    out.append('--remat (recompute each block in the backward pass)')
  if config.sharding == 'dp':
    out.append('--sharding fsdp (split parameters and optimizer state over the chips)')
  if per_chip_batch > 1:
    out.append(f'a smaller batch (--per-chip-batch {per_chip_batch // 2}, or --max-batch to '
               f'find the largest that fits)')
  return '; '.join(out) or 'a larger slice or a chip with more HBM'


def _lowered(config: ml_collections.ConfigDict, mode: str, mesh, num_classes: int):
  """The jitted step of `mode`, lowered for `mesh` (train.py's own for train and eval)."""
  model = train.build_model(config, num_classes)
  schedule = train.make_schedule(config, steps_per_epoch=1000, total_steps=300_000)
  tx = train.make_optimizer(config, schedule)
  _, abstract_state, state_sharding = train.abstract_train_state(config, model, tx, mesh)
  if mode == 'train':
    return functools.partial(train.compile_train_step, config, model=model, tx=tx,
                             schedule=schedule, mesh=mesh, abstract_state=abstract_state,
                             state_sharding=state_sharding)
  variables = train.eval_variables(abstract_state)
  if mode == 'eval':
    return functools.partial(train.compile_eval_step, config, model=model, mesh=mesh,
                             abstract_variables=variables)
  images = train.abstract_batch(config, mesh, train=False)['image']
  forward = jax.jit(lambda v, x: model.apply(v, device_augment.normalize(x)),
                    out_shardings=sharding.batch_sharding(mesh))
  return lambda: forward.lower(variables, images).compile()


def compile_step(config: ml_collections.ConfigDict, topology: str, mode: str,
                 per_chip_batch: int, num_classes: int = 1000,
                 devices: Optional[Sequence[jax.Device]] = None) -> Compiled:
  """Compiles the `mode` step of the run `config` describes (its model, dtype, image size,
  sharding, formulation, recipe) for `topology` at `per_chip_batch` images per chip.

  Raises DoesNotFit (naming the fixes) when the compiler finds it exceeds a chip's HBM.
  """
  if mode not in MODES:
    raise ValueError(f'mode {mode!r} is not one of {MODES}.')
  devices = list(devices or topology_devices(topology))
  config = tpu_config(config, per_chip_batch, len(devices))
  mesh = sharding.make_mesh(devices=devices)
  compile_fn = _lowered(config, mode, mesh, num_classes)
  kind = devices[0].device_kind
  t0 = time.perf_counter()
  try:
    compiled = compile_fn()
  except Exception as e:  # XLA's compile error; only out-of-memory is ours to explain.
    if not _is_out_of_memory(e):
      raise
    first = next((line for line in str(e).splitlines() if 'exceeds' in line or 'HBM' in line),
                 str(e).splitlines()[0])
    raise DoesNotFit(f'the {mode} step at {per_chip_batch} images per chip does not fit a '
                     f'{kind} chip ({first.strip()}); try {fixes(config, per_chip_batch)}.')
  seconds = time.perf_counter() - t0
  arch = train.build_model(config, num_classes).config
  macs = forward_macs(arch, config.image_size, head=True)['total']
  return Compiled(
      step=mode, topology=topology, device_kind=kind, num_chips=len(devices),
      per_chip_batch=per_chip_batch, sharding=config.sharding,
      implementation=config.impl.to_dict(), compile_s=seconds, memory=Memory.of(compiled),
      hbm=hbm_bytes(kind), flops=xla_cost(compiled, 'flops'),
      bytes_accessed=xla_cost(compiled, 'bytes accessed'),
      analytic_flops_per_image=2 * macs * (3 if mode == 'train' else 1),
      hlo=hlo_ops(compiled.as_text()))


BATCH_MULTIPLE = 8  # --max-batch's step: per-chip batches that fill the TPU's 8-row tiles.


def _predicted_batch(fitting: Dict[int, Compiled], hbm: int, step: int) -> int:
  """The largest multiple of `step` whose peak memory a line through the compiled steps that
  fit stays within `hbm`: through the two largest, or, from one, with all its temporaries
  per image (which overstates the slope, so the guess errs low)."""
  (b1, c1), *rest = sorted(fitting.items(), reverse=True)
  if rest:
    b0, c0 = rest[0]
    slope = (c1.memory.peak - c0.memory.peak) / (b1 - b0)
  else:
    slope = c1.memory.temp / b1
  if slope <= 0:
    return 2 * b1
  return int(b1 + (hbm - c1.memory.peak) / slope) // step * step


def max_batch(config: ml_collections.ConfigDict, topology: str, mode: str, start: int,
              num_classes: int = 1000, report=print) -> tuple[int, Optional[Compiled]]:
  """The largest per-chip batch whose step fits, by compiling: a multiple of BATCH_MULTIPLE
  (or 1-7 when not even 8 fits). From `start`, each next try is where the memory of the steps
  that fit, drawn as a line in the batch, reaches the chip's HBM (nominal, a little above the
  compiler's limit): for a step whose memory grows linearly that is the answer, confirmed by one
  try above it. Near the limit the compiler holds the memory level, the line flattens and its
  guess overshoots: then the search bisects (a try far over fails within minutes, one near the
  limit compiles in full). Halves while nothing fits. Returns (batch, its Compiled); (0, None)
  if not even one image fits. `report(line)` hears of every try."""
  devices = topology_devices(topology)
  fitting: Dict[int, Compiled] = {}
  low, high = 0, None  # The largest batch that fits, the smallest that does not.
  batch = start
  while True:
    try:
      fitting[batch] = compile_step(config, topology, mode, batch, num_classes, devices)
      low = max(low, batch)
      report(f'  {batch:5d} per chip: fits, {_gib(fitting[batch].memory.peak)} '
             f'({fitting[batch].compile_s:.0f} s)')
    except DoesNotFit:
      high = batch if high is None else min(high, batch)
      report(f'  {batch:5d} per chip: does not fit')
    step = BATCH_MULTIPLE if high is None or high > BATCH_MULTIPLE else 1
    above = (low // step + 1) * step  # The smallest batch that would beat `low`.
    if high is not None and above >= high:
      return low, fitting.get(low)
    if not fitting:
      batch = max(high // 2 // step * step, 1)
      continue
    hbm = fitting[low].hbm
    guess = 2 * low if hbm is None else _predicted_batch(fitting, hbm, step)
    if high is not None and guess >= high:
      guess = (low + high) // 2 // step * step
    batch = max(guess, above)


# ---------------------------------------------------------------------------------------------
# Report.

def _gib(n: Optional[float]) -> str:
  return 'n/a' if n is None else f'{n / 2 ** 30:.2f} GiB'


def format_report(c: Compiled) -> str:
  """The human-readable report of one compiled step."""
  m = c.memory
  flops = ('n/a' if c.flops is None else
           f'{c.xla_flops_per_image / 1e9:.3f}   (analytic {c.analytic_flops_per_image / 1e9:.3f},'
           f' XLA / analytic {c.xla_flops_per_image / c.analytic_flops_per_image:.3f})')
  rows = [
      ('step', f'{c.step} on {c.topology} ({c.num_chips} x {c.device_kind}), {c.sharding}'),
      ('batch', f'{c.per_chip_batch} per chip, {c.per_chip_batch * c.num_chips} global'),
      ('implementation', ', '.join(f'{k}={v}' for k, v in c.implementation.items())),
      ('compile time', f'{c.compile_s:.1f} s'),
      ('memory per chip', f'{_gib(m.peak)} of {_gib(c.hbm)} HBM   (arguments '
                          f'{_gib(m.argument)}, outputs {_gib(m.output)}, temporaries '
                          f'{_gib(m.temp)}, aliased {_gib(m.alias)}; free {_gib(c.free)})'),
      ('GFLOPs/image, XLA', flops),
      ('bytes accessed/image', _gib(None if c.bytes_accessed is None
                                    else c.bytes_accessed / c.per_chip_batch)),
      ('gathers / scatters', f"{c.hlo['gathers']} / {c.hlo['scatters']}   "
                             f"({c.hlo['while_loops']} while loops)"),
      ('compiler remat', f"{c.hlo['compiler_remat']} instructions cloned by XLA's "
                         f"rematerialisation pass to fit the chip"),
  ]
  collectives = c.hlo['collectives']
  rows.append(('collectives per step', ', '.join(
      f"{kind} x{v['count']} ({v['bytes'] / 2 ** 20:,.1f} MiB)"
      for kind, v in sorted(collectives.items())) or 'none'))
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


# ---------------------------------------------------------------------------------------------
# The command (python -m debiformer_jax.benchmark --topology ...).

def config_from_args(args) -> tuple[ml_collections.ConfigDict, int]:
  """(the ImageNet recipe's config for the benchmark's arguments, class count)."""
  overrides = dict(args.override)
  num_classes = overrides.pop('num_classes', 1000)
  if args.features_only:
    raise ValueError('--topology compiles the classifier\'s steps; drop --features-only.')
  size = args.size or (args.resolution, args.resolution)
  if size[0] != size[1]:
    raise ValueError(f'--topology compiles the training loop\'s square images; --size '
                     f'{size[0]}x{size[1]} is not square: use --resolution N.')
  config = config_lib.defaults()
  config.model_name = args.model
  config.model.update(overrides)
  config.dtype = args.dtype
  config.image_size = size[0]
  config.sharding = args.sharding
  config.impl.update(dwconv=args.dwconv, sampling=args.sampling,
                     region_gather=args.region_gather, dense_routing=str(args.dense_routing),
                     remat=args.remat, remat_policy=args.remat_policy)
  return config, num_classes


def main(args) -> int:
  """Compiles (or searches the largest batch) and prints the report, then one JSON line.
  Exit status: 0 fits, 3 does not fit, 2 bad arguments or no libtpu."""
  try:
    config, num_classes = config_from_args(args)
    if args.max_batch:
      print(f'largest per-chip batch of the {args.mode} step on {args.topology}, from '
            f'{args.per_chip_batch}:')
      best, compiled = max_batch(config, args.topology, args.mode, args.per_chip_batch,
                                 num_classes)
      if compiled is None:
        raise DoesNotFit(f'not even 1 image per chip fits the {args.mode} step on '
                         f'{args.topology}; try {fixes(config, 1)}.')
    else:
      compiled = compile_step(config, args.topology, args.mode, args.per_chip_batch,
                              num_classes)
  except DoesNotFit as e:
    print(f'does not fit: {e}', file=sys.stderr)
    return 3
  except (ValueError, LibtpuMissing, LibtpuBusy) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_report(compiled))
  print(json.dumps(compiled.to_json(), sort_keys=True))
  return 0

"""The training configuration: every field declared once here, every check in `validate`.

`defaults()` is the ImageNet-1k recipe of the paper (supplementary Table 10, "Detailed
Experimental Settings"); the files in configs/ start from it and change a few fields, and any
field can be changed with --config.FIELD=VALUE. `finalize(config, workdir)` fills in the values
that depend on where the run lives and checks everything, before anything compiles; what comes
out is trusted by the rest of the job. Next to each recipe value: where it comes from, and what
the other official sources say where they disagree (paper main text, the official README's
command, the official `main.py` defaults and model builders).

This lives in the package (not in configs/) so that a config file loaded by path, from any
working directory, can import it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from ml_collections import config_dict

from debiformer_jax.models import Architecture, Implementation, get_architecture

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MODES = ('train', 'eval')
SHARDINGS = ('dp', 'fsdp')
DATASETS = ('imagenet2012', 'imagefolder')
PREPARE = ('', 'sklearn_digits')
EVAL_SPLITS = {'imagenet2012': 'validation', 'imagefolder': 'val'}
# Path fields may say '{workdir}': the run's workdir, filled in by `finalize`.
PATH_FIELDS = ('data.data_dir', 'data.manual_dir', 'data.folder', 'init_from')
# Fields a resumed run may change: how it is logged, evaluated, checkpointed, laid out and
# computed (impl: equal formulations), not what it computes. A prefix ending in '.' covers a
# group.
RESUMABLE_FIELDS = ('workdir', 'mode', 'init_from', 'log_every_steps', 'eval_every_epochs',
                    'checkpoint_every_epochs', 'keep_checkpoints', 'keep_best',
                    'async_checkpoints', 'sharding', 'fsdp_min_size', 'impl.',
                    'data.num_parallel_calls', 'data.cache', 'data.download')
# Architecture fields a config may set; num_classes comes from the dataset.
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(Architecture) if f.name != 'num_classes')


class ConfigError(ValueError):
  """A config that makes no sense; the message lists every problem found."""


def defaults() -> ml_collections.ConfigDict:
  """Every field the job reads, with the paper's ImageNet-1k recipe (DeBiFormer-T)."""
  c = ml_collections.ConfigDict()
  c.mode = 'train'  # 'train': train with periodic eval. 'eval': evaluate a checkpoint only.
  c.workdir = ''  # Used when --workdir is not given; '' means ./workdir.
  c.seed = 0

  # Model: a preset name, and Architecture fields to change (None: the preset's value).
  c.model_name = 'debiformer_tiny'
  c.model = ml_collections.ConfigDict(
      {name: config_dict.placeholder(type(_default(name))) for name in MODEL_FIELDS})
  c.dtype = 'bfloat16'  # Compute dtype; parameters and optimizer state stay float32.
  # How the model is computed (models/implementation.py); 'auto' = the backend's default.
  c.impl = ml_collections.ConfigDict(dataclasses.asdict(Implementation()))
  c.image_size = 224

  # Data: the host input pipeline (data/input_pipeline.py).
  c.data = ml_collections.ConfigDict()
  c.data.name = 'imagenet2012'  # Or 'imagefolder' (root/<split>/<class>/*.jpg|jpeg|png).
  c.data.data_dir = config_dict.placeholder(str)  # tfds data dir; None = tfds' default.
  c.data.manual_dir = config_dict.placeholder(str)  # Where the ILSVRC2012 tars are.
  c.data.download = False  # Prepare imagenet2012 from manual_dir if it is not prepared.
  c.data.folder = config_dict.placeholder(str)  # ImageFolder root.
  c.data.prepare = ''  # 'sklearn_digits': write the demo ImageFolder into `folder` first.
  c.data.train_split = 'train'
  c.data.eval_split = ''  # '' = the dataset's own: 'validation' (imagenet2012), 'val'.
  c.data.eval_crop_pct = 0.875  # Official datasets.py: resize to 256/224 x size, centre crop.
  c.data.randaugment = 'rand-m9-mstd0.5-inc1'  # Official main.py (--aa); '' = off.
  c.data.random_erase = 0.25  # Table 10 (official main.py --reprob agrees); pixel mode.
  c.data.hflip = True
  c.data.rrc_scale = (0.08, 1.0)  # timm's random-resized crop, as the official transform.
  c.data.shuffle_buffer = 16384
  c.data.cache = False  # Keep this process's encoded images in memory.
  c.data.num_parallel_calls = -1  # -1 = AUTOTUNE.
  # Undecodable images are skipped (each named once in the log, counted in the metrics) until
  # more than this fraction of a split's files fail; 0 = strict: stop at the first, naming it.
  c.data.max_undecodable_fraction = 0.001

  # Targets, on device in the train step (mixup.py): timm's Mixup in batch mode.
  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.8  # Table 10 (official main.py agrees); 0 = off.
  c.mixup.cutmix_alpha = 1.0  # Table 10 (official main.py agrees); 0 = off.
  c.mixup.switch_prob = 0.5  # Official main.py (Table 10 does not say).
  c.label_smoothing = 0.1  # Table 10 (official main.py agrees).

  # Length: num_train_steps > 0 replaces num_epochs (smoke runs).
  c.global_batch_size = 1024  # Table 10 for T (S, B: 512; the paper's text: 1024 for all).
  c.num_epochs = 300  # Table 10 (everywhere the same).
  c.num_train_steps = -1

  # Optimizer and schedule (in steps: warm-up and cosine per step; timm's is per epoch).
  c.optimizer = ml_collections.ConfigDict()
  # Peak lr = base_lr x global batch / lr_base_batch_size: Table 10 gives 1e-3 at batch 1024
  # (T) and 5e-4 at 512 (S, B), i.e. 5e-4 per 512 throughout, the official main.py rule.
  c.optimizer.base_lr = 5e-4
  c.optimizer.lr_base_batch_size = 512
  c.optimizer.warmup_epochs = 20.0  # Table 10, and the README's command; main text and main.py: 5.
  c.optimizer.warmup_lr = 1e-6  # Official main.py (Table 10 does not say).
  c.optimizer.min_lr = 5e-6  # Official main.py (Table 10 does not say).
  # Table 10 and main.py: 0.05; the official README's command for S: 0.1. Applied to every
  # parameter of more than one dimension, as timm's create_optimizer in the official main.py.
  c.optimizer.weight_decay = 0.05
  c.optimizer.b1 = 0.9  # AdamW (Table 10), timm's default betas and eps.
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 5.0  # Table 10 (official main.py agrees); <= 0: no clipping.
  c.ema_decay = 0.0  # EMA of params, evaluated instead of them when > 0. 0 = off.

  # Cadence.
  c.log_every_steps = 100
  c.eval_every_epochs = 1.0
  c.checkpoint_every_epochs = 1.0
  c.keep_checkpoints = 3  # The last N...
  c.keep_best = 1  # ... and the best N by eval top-1 all survive.
  c.async_checkpoints = True  # Write checkpoints in a background thread while training goes on.

  # Sharding: 'dp' replicates params; 'fsdp' splits params and optimizer state over the data
  # axis (leaves with at least fsdp_min_size elements).
  c.sharding = 'dp'
  c.fsdp_min_size = 2 ** 18

  # Fine-tuning / evaluation of a converted or earlier checkpoint: a directory written by
  # convert_torch_weights.py (has debiformer.json) or a training workdir. In 'train' mode its
  # params and batch_stats start a fresh run (a head of another class count is dropped); a
  # checkpoint in --workdir takes precedence (resume). In 'eval' mode it is what gets evaluated.
  c.init_from = ''
  return c


def _default(name: str) -> Any:
  return getattr(Architecture(), name)


def model_overrides(config: ml_collections.ConfigDict) -> dict:
  """The Architecture fields the config sets (tuples for lists)."""
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in config.model.to_dict().items() if v is not None}


def implementation(config: ml_collections.ConfigDict) -> Implementation:
  """The config's Implementation, resolved for this backend (raises ValueError if bad)."""
  fields = config.impl.to_dict()
  if isinstance(fields['dense_routing'], str) and fields['dense_routing'].isdigit():
    fields['dense_routing'] = int(fields['dense_routing'])  # From the command line.
  return Implementation(**fields).resolve()


def finalize(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A resolved copy of `config` for a run in `workdir`, checked (ConfigError otherwise).

  '{workdir}' in path fields becomes the workdir; an empty eval_split the dataset's own.
  """
  config = config.copy_and_resolve_references()
  for field in PATH_FIELDS:
    *parents, leaf = field.split('.')
    node = config
    for p in parents:
      node = node[p]
    if isinstance(node[leaf], str) and '{workdir}' in node[leaf]:
      node[leaf] = node[leaf].replace('{workdir}', os.path.abspath(workdir))
  if not config.data.eval_split:
    config.data.eval_split = EVAL_SPLITS.get(config.data.name, '')
  validate(config, workdir)
  return config


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> tuple[list, list]:
  """(changes of fields that change what a run means, changes of RESUMABLE_FIELDS) between a
  saved config.json (parsed) and `config`, each as 'field: old -> new'."""
  before = traverse_util.flatten_dict(saved, sep='.')
  after = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep='.')
  meaningful, harmless = [], []
  for key in sorted(set(before) | set(after)):
    old, new = before.get(key, '(absent)'), after.get(key, '(absent)')
    if old != new:
      resumable = any(key == f or (f.endswith('.') and key.startswith(f))
                      for f in RESUMABLE_FIELDS)
      (harmless if resumable else meaningful).append(f'{key}: {old!r} -> {new!r}')
  return meaningful, harmless


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError listing every problem of a resolved `config` for `workdir`."""
  problems = []
  bad = problems.append
  if config.mode not in MODES:
    bad(f'mode={config.mode!r} is not one of {MODES}.')
  if config.dtype not in DTYPES:
    bad(f'dtype={config.dtype!r} is not one of {tuple(DTYPES)}.')

  arch = None
  try:
    arch = get_architecture(config.model_name, **model_overrides(config))
  except (ValueError, TypeError) as e:
    bad(f'model: {e}')
  try:
    implementation(config)
  except (ValueError, TypeError) as e:
    bad(f'impl: {e}')
  size = config.image_size
  if not _is_int(size) or size <= 0:
    bad(f'image_size={size!r} must be a positive integer.')
  elif arch is not None:
    try:
      arch.check_input_size(size, size)
    except ValueError as e:
      bad(f'image_size={size}: {e}')

  batch, devices, processes = config.global_batch_size, jax.device_count(), jax.process_count()
  if not _is_int(batch) or batch <= 0:
    bad(f'global_batch_size={batch!r} must be a positive integer.')
  elif batch % devices or batch % processes:
    bad(f'global_batch_size={batch} must be divisible by the number of devices ({devices}) '
        f'and of processes ({processes}).')

  if config.num_epochs < 0:
    bad(f'num_epochs={config.num_epochs} must be positive.')
  if config.num_train_steps != -1 and config.num_train_steps <= 0:
    bad(f'num_train_steps={config.num_train_steps} must be > 0, or -1 to use num_epochs.')
  elif config.num_train_steps == -1 and config.num_epochs == 0:
    bad(f'num_epochs={config.num_epochs} must be > 0 when num_train_steps is -1.')

  o = config.optimizer
  for name in ('base_lr', 'lr_base_batch_size', 'eps'):
    if not o[name] > 0:
      bad(f'optimizer.{name}={o[name]} must be > 0.')
  for name in ('warmup_epochs', 'warmup_lr', 'min_lr', 'weight_decay'):
    if o[name] < 0:
      bad(f'optimizer.{name}={o[name]} must be >= 0.')
  for name in ('b1', 'b2'):
    if not 0 <= o[name] < 1:
      bad(f'optimizer.{name}={o[name]} must be in [0, 1).')
  if not 0 <= config.ema_decay < 1:
    bad(f'ema_decay={config.ema_decay} must be in [0, 1) (0 turns EMA off).')
  for name in ('mixup_alpha', 'cutmix_alpha'):
    if not _is_number(config.mixup[name]) or config.mixup[name] < 0:
      bad(f'mixup.{name}={config.mixup[name]!r} must be a Beta alpha >= 0 (0 disables it).')
  if not _is_number(config.mixup.switch_prob) or not 0 <= config.mixup.switch_prob <= 1:
    bad(f'mixup.switch_prob={config.mixup.switch_prob!r} must be a probability in [0, 1].')
  if not _is_number(config.label_smoothing) or not 0 <= config.label_smoothing < 1:
    bad(f'label_smoothing={config.label_smoothing!r} must be in [0, 1).')

  if not (_is_int(config.log_every_steps) and config.log_every_steps >= 1):
    bad(f'log_every_steps={config.log_every_steps} must be an integer >= 1.')
  for name in ('eval_every_epochs', 'checkpoint_every_epochs'):
    if not config[name] > 0:
      bad(f'{name}={config[name]} must be > 0.')
  if config.keep_checkpoints < 1 or config.keep_best < 0:
    bad(f'keep_checkpoints={config.keep_checkpoints} must be >= 1 and keep_best='
        f'{config.keep_best} >= 0.')
  if config.sharding not in SHARDINGS:
    bad(f'sharding={config.sharding!r} is not one of {SHARDINGS}.')
  if config.fsdp_min_size < 0:
    bad(f'fsdp_min_size={config.fsdp_min_size} must be >= 0.')

  problems += _data_problems(config.data)

  problems += _workdir_problems(workdir)
  if config.init_from:
    from debiformer_jax import weights  # pylint: disable=g-import-not-at-top
    source_problem = weights.source_problem(config.init_from)
    if source_problem:
      bad(f'init_from={config.init_from!r}: {source_problem}')
  if config.mode == 'eval' and not config.init_from and not _has_checkpoint(workdir):
    bad(f"mode='eval' needs a checkpoint: none in {os.path.join(workdir, 'checkpoints')}; "
        f'set init_from to converted weights or to a training workdir.')

  if problems:
    raise ConfigError('invalid config:\n  - ' + '\n  - '.join(problems))


def _workdir_problems(workdir: str) -> list[str]:
  """Whether the job can make and write `workdir` (checkpoints, events, config.json)."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    return [f'workdir {path} is a file: give a directory (it holds checkpoints and TensorBoard '
            f'events).']
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return [f'workdir {path} cannot be created: {existing} is a file, not a directory.']
  if not os.access(existing, os.W_OK | os.X_OK):
    what = 'is' if existing == path else f'cannot be created in {existing}, which is'
    return [f'workdir {path} {what} not writable by this user: choose a directory you can '
            f'write to, or change its permissions.']
  return []


def _has_checkpoint(workdir: str) -> bool:
  from debiformer_jax import checkpointing  # pylint: disable=g-import-not-at-top
  directory = checkpointing.checkpoint_dir(workdir)
  return os.path.isdir(directory) and checkpointing.make_manager(
      directory, read_only=True).latest_step() is not None


def _data_problems(d: ml_collections.ConfigDict) -> list[str]:
  """What is wrong with the data fields, each as a sentence that says what they may be."""
  from debiformer_jax.data import randaugment  # pylint: disable=g-import-not-at-top
  problems = []

  def bad(field, allowed):
    problems.append(f'data.{field}={d[field]!r} is invalid: {allowed}.')

  if d.name not in DATASETS:
    bad('name', f'must be one of {list(DATASETS)}')
  if d.prepare not in PREPARE:
    bad('prepare', f'must be one of {list(PREPARE)}')
  for field in ('data_dir', 'manual_dir', 'folder'):
    if d[field] is not None and not isinstance(d[field], str):
      bad(field, 'must be a path (string) or None')
  if d.prepare == 'sklearn_digits' and d.name != 'imagefolder':
    bad('prepare', "'sklearn_digits' writes an ImageFolder, so it needs data.name='imagefolder'")
  if d.name == 'imagefolder' and not d.folder:
    bad('folder', 'data.name=imagefolder needs the ImageFolder root '
        '(root/<split>/<class>/*.jpg|jpeg|png)')
  if not isinstance(d.download, bool):
    bad('download', 'must be True or False')
  elif d.download and d.name == 'imagefolder':
    bad('download', 'only tfds datasets (imagenet2012) are downloaded; '
        'use data.prepare for the demo folder')
  elif d.download and not d.manual_dir:
    bad('manual_dir', 'data.download=True needs the directory holding '
        'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar')
  for field in ('train_split', 'eval_split'):
    if not isinstance(d[field], str) or not d[field]:
      bad(field, 'must be a non-empty split name (e.g. '
          f'{"train" if field == "train_split" else EVAL_SPLITS.get(d.name, "val")!r})')
  if not _is_number(d.eval_crop_pct) or not 0 < d.eval_crop_pct <= 1:
    bad('eval_crop_pct', 'must be a number in (0, 1] (0.875: 224 crop of a 256 resize)')
  if not isinstance(d.randaugment, str):
    bad('randaugment', "must be a timm policy string like 'rand-m9-mstd0.5-inc1' or ''")
  elif d.randaugment:
    try:
      randaugment.parse_randaugment(d.randaugment)
    except ValueError as e:
      bad('randaugment', f"{e} Use e.g. 'rand-m9-mstd0.5-inc1', or '' for none")
  if not _is_number(d.random_erase) or not 0 <= d.random_erase <= 1:
    bad('random_erase', 'must be a probability in [0, 1]')
  if not isinstance(d.hflip, bool):
    bad('hflip', 'must be True or False')
  scale = d.rrc_scale
  if (not isinstance(scale, (tuple, list)) or len(scale) != 2
      or not all(_is_number(v) for v in scale) or not 0 < scale[0] <= scale[1] <= 1):
    bad('rrc_scale', 'must be a pair (lo, hi) with 0 < lo <= hi <= 1')
  if not _is_int(d.shuffle_buffer) or d.shuffle_buffer < 0:
    bad('shuffle_buffer', 'must be an integer >= 0 (0 or 1: no shuffle buffer)')
  if not isinstance(d.cache, bool):
    bad('cache', 'must be True or False')
  if not _is_int(d.num_parallel_calls) or not (d.num_parallel_calls == -1
                                               or d.num_parallel_calls >= 1):
    bad('num_parallel_calls', 'must be -1 (AUTOTUNE) or a positive integer')
  if not _is_number(d.max_undecodable_fraction) or not 0 <= d.max_undecodable_fraction < 1:
    bad('max_undecodable_fraction', 'must be a fraction in [0, 1) (0: stop at the first '
        'undecodable image)')
  return problems

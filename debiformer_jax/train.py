"""Training and evaluation of DeBiFormer, readable top to bottom.

`train_and_evaluate(config, workdir)`:
  validate config -> mesh -> model -> data info -> optimizer -> abstract state -> shardings ->
  restore from workdir, or init (+ `init_from` weights) -> data iterators -> compiled steps ->
  loop: train step, log every `log_every_steps`, eval + checkpoint every epoch (by default).

`evaluate_checkpoint(config, workdir)`: evaluates `config.init_from` (converted weights or a
workdir) or the latest checkpoint in `workdir`.

The train step runs under `jax.jit` with NamedShardings on a ('data', 'model') mesh: the batch
is split over 'data'; params and optimizer state are replicated ('dp') or split over 'data'
('fsdp'). Mixup/cutmix, label smoothing and stochastic depth happen on device; their random
keys are `fold_in(state.rng, state.step)`, so a resumed run repeats an uninterrupted one exactly.
Metrics stay on device until a log step.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers

from debiformer_jax import checkpointing, distributed, preemption, sharding
from debiformer_jax.models import create_model, get_config

MODES = ('train', 'eval')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Number of updates applied.
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # None when config.ema_decay == 0.
  rng: jax.Array  # Raw uint32[2] key; step keys are fold_in(rng, step).


# ---------------------------------------------------------------------------------------------
# Config checks: everything that can be wrong with a config is found here, before any compile.

def resolve_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of `config` with the values that default to places in `workdir` filled in: the
  demo digits are prepared into <workdir>/digits unless data.folder says otherwise."""
  config = config.copy_and_resolve_references()
  if config.data.prepare == 'sklearn_digits' and not config.data.folder:
    config.data.folder = os.path.join(os.path.abspath(workdir), 'digits')
  return config


def validate_config(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
  """Raises ValueError listing every problem found in `config` (resolved for `workdir`)."""
  from debiformer_jax.data import input_pipeline

  if workdir is not None:
    config = resolve_config(config, workdir)
  problems = []
  bad = problems.append
  if config.mode not in MODES:
    bad(f'mode={config.mode!r} is not one of {MODES}.')
  if config.dtype not in DTYPES:
    bad(f'dtype={config.dtype!r} is not one of {tuple(DTYPES)}.')

  model_cfg = None
  try:
    model_cfg = get_config(config.model_name, **config.model.to_dict())
  except (ValueError, TypeError) as e:
    bad(f'model: {e}')
  size = config.image_size
  if not isinstance(size, int) or size <= 0:
    bad(f'image_size={size!r} must be a positive integer.')
  elif model_cfg is not None:
    try:
      model_cfg.check_input_size(size, size)
    except ValueError as e:
      bad(f'image_size={size}: {e}')

  batch, devices, processes = config.global_batch_size, jax.device_count(), jax.process_count()
  if not isinstance(batch, int) or batch <= 0:
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

  if not (isinstance(config.log_every_steps, int) and config.log_every_steps >= 1):
    bad(f'log_every_steps={config.log_every_steps} must be an integer >= 1.')
  for name in ('eval_every_epochs', 'checkpoint_every_epochs'):
    if not config[name] > 0:
      bad(f'{name}={config[name]} must be > 0.')
  if config.keep_checkpoints < 1 or config.keep_best < 0:
    bad(f'keep_checkpoints={config.keep_checkpoints} must be >= 1 and keep_best='
        f'{config.keep_best} >= 0.')
  if config.sharding not in sharding.STRATEGIES:
    bad(f'sharding={config.sharding!r} is not one of {sharding.STRATEGIES}.')
  if config.fsdp_min_size < 0:
    bad(f'fsdp_min_size={config.fsdp_min_size} must be >= 0.')

  try:
    input_pipeline.validate_data_config(config.data)
  except ValueError as e:
    bad(f'data: {e}')

  if config.init_from and not os.path.isdir(config.init_from):
    bad(f'init_from={config.init_from!r} is not a directory.')
  if (config.mode == 'eval' and not config.init_from and workdir is not None
      and not _has_checkpoint(workdir)):
    bad(f"mode='eval' needs a checkpoint: none in {checkpointing.checkpoint_dir(workdir)}; "
        f'set init_from to converted weights or to a training workdir.')

  if problems:
    raise ValueError('invalid config:\n  - ' + '\n  - '.join(problems))


def _has_checkpoint(workdir: str) -> bool:
  directory = checkpointing.checkpoint_dir(workdir)
  return os.path.isdir(directory) and checkpointing.make_manager(
      directory, read_only=True).latest_step() is not None


# ---------------------------------------------------------------------------------------------
# Model, optimizer, state.

def build_model(config: ml_collections.ConfigDict, num_classes: int):
  overrides = {k: v for k, v in config.model.to_dict().items() if k != 'num_classes'}
  return create_model(config.model_name, dtype=DTYPES[config.dtype], num_classes=num_classes,
                      **overrides)


def train_length(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps)."""
  steps_per_epoch = num_train // config.global_batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'global_batch_size={config.global_batch_size} is larger than the '
                     f'{num_train} training examples.')
  if config.num_train_steps > 0:
    return steps_per_epoch, config.num_train_steps
  return steps_per_epoch, max(1, int(round(config.num_epochs * steps_per_epoch)))


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
  """Linear warm-up from warmup_lr to the peak, then cosine to min_lr; per step."""
  o = config.optimizer
  peak = o.base_lr * config.global_batch_size / o.lr_base_batch_size
  warmup = min(int(round(o.warmup_epochs * steps_per_epoch)), total_steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=o.warmup_lr, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=o.min_lr)


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: not 1-D params (biases, norm scales), not rpe_table."""
  def decays(path, x):
    return x.ndim > 1 and getattr(path[-1], 'key', None) != 'rpe_table'
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
  o = config.optimizer
  clip = optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm > 0 else optax.identity()
  return optax.chain(clip, optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                                       weight_decay=o.weight_decay, mask=decay_mask))


def init_state(rng, *, model, tx, image_size: int, use_ema: bool) -> TrainState:
  params_rng, state_rng = jax.random.split(rng)
  variables = model.init({'params': params_rng},
                         jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    ema_params=params if use_ema else None, rng=state_rng)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def abstract_train_state(config: ml_collections.ConfigDict, model, tx, mesh):
  """(init_fn(rng) -> TrainState, abstract state with shardings, state shardings)."""
  init_fn = functools.partial(init_state, model=model, tx=tx, image_size=config.image_size,
                              use_ema=config.ema_decay > 0)
  abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_sharding = sharding.state_shardings(abstract_state, mesh, config.sharding,
                                            config.fsdp_min_size)
  return init_fn, with_shardings(abstract_state, state_sharding), state_sharding


def eval_variables(state: TrainState) -> dict:
  """The weights that get evaluated: the EMA params when EMA is on."""
  params = state.params if state.ema_params is None else state.ema_params
  return {'params': params, 'batch_stats': state.batch_stats}


# ---------------------------------------------------------------------------------------------
# Steps.

def loss_fn(params, batch_stats, images, targets, dropout_rng, *, model):
  """(mean softmax cross-entropy against soft `targets`, updated batch_stats), train mode."""
  logits, mutated = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                train=True, rngs={'dropout': dropout_rng},
                                mutable=['batch_stats'])
  loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
  return loss, mutated.get('batch_stats', {})


def train_step(state: TrainState, batch: dict, *, model, tx, schedule, num_classes: int,
               data_config: ml_collections.ConfigDict, ema_decay: float):
  """One update. Returns the new state and on-device metrics."""
  from debiformer_jax.data import mixup

  mix_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  images, targets = mixup.mixup_cutmix(
      mix_rng, batch['image'], batch['label'], num_classes=num_classes,
      mixup_alpha=data_config.mixup, cutmix_alpha=data_config.cutmix,
      switch_prob=data_config.mixup_switch_prob, label_smoothing=data_config.label_smoothing)

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, images, targets, dropout_rng, model=model)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema)
  metrics = {'loss': loss, 'lr': schedule(state.step), 'grad_norm': optax.global_norm(grads)}
  return new_state, metrics


def compile_train_step(config: ml_collections.ConfigDict, *, model, tx, schedule,
                       num_classes: int, mesh, abstract_state, state_sharding):
  """The train step, compiled ahead of time for global batches split over 'data'.

  The state is donated: its buffers are reused for the new state.
  """
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                              num_classes=num_classes, data_config=config.data,
                              ema_decay=config.ema_decay)
  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, sharding.replicated(mesh)),
                 donate_argnums=0).lower(abstract_state, _abstract_batch(config, mesh)).compile()


def _abstract_batch(config: ml_collections.ConfigDict, mesh, *, with_mask: bool = False) -> dict:
  """Shapes of a global batch split over 'data': image, label (and the eval mask)."""
  batch_sharding = sharding.batch_sharding(mesh)
  size = (config.global_batch_size, config.image_size, config.image_size, 3)
  batch = {'image': jax.ShapeDtypeStruct(size, jnp.float32, sharding=batch_sharding),
           'label': jax.ShapeDtypeStruct(size[:1], jnp.int32, sharding=batch_sharding)}
  if with_mask:
    batch['mask'] = jax.ShapeDtypeStruct(size[:1], jnp.float32, sharding=batch_sharding)
  return batch


def eval_step(variables: dict, batch: dict, totals: dict, *, model, num_classes: int) -> dict:
  """Adds this batch's masked loss sum and top-1/top-5 counts to `totals`."""
  logits = model.apply(variables, batch['image'], train=False).astype(jnp.float32)
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jax.lax.top_k(logits, min(5, num_classes))[1] == labels[:, None]
  batch_totals = {
      'loss': jnp.sum(loss * mask),
      'top1': jnp.sum(correct[:, 0] * mask).astype(jnp.int32),
      'top5': jnp.sum(correct.any(axis=1) * mask).astype(jnp.int32),
      'num_examples': jnp.sum(mask).astype(jnp.int32),
  }
  return jax.tree.map(jnp.add, totals, batch_totals)


def compile_eval_step(config: ml_collections.ConfigDict, *, model, num_classes: int, mesh,
                      abstract_variables):
  """The eval step, compiled ahead of time (like the train step) for `abstract_variables`
  ({'params', 'batch_stats'} with shardings) and global eval batches split over 'data'; the
  totals stay replicated."""
  replicated = sharding.replicated(mesh)
  abstract_totals = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(empty_totals))
  step_fn = functools.partial(eval_step, model=model, num_classes=num_classes)
  return jax.jit(step_fn, out_shardings=replicated).lower(
      abstract_variables, _abstract_batch(config, mesh, with_mask=True), abstract_totals).compile()


def empty_totals() -> dict:
  return {'loss': jnp.zeros((), jnp.float32), 'top1': jnp.zeros((), jnp.int32),
          'top5': jnp.zeros((), jnp.int32), 'num_examples': jnp.zeros((), jnp.int32)}


def evaluate(compiled_eval_step, variables: dict, config: ml_collections.ConfigDict, mesh) -> dict:
  """Top-1, top-5 and mean loss over the whole eval split; each example counted once."""
  from debiformer_jax.data import input_pipeline

  replicated = sharding.replicated(mesh)
  totals = jax.tree.map(  # Laid out as the compiled step expects, on one host or many.
      lambda x: jax.make_array_from_callback(x.shape, replicated,
                                             lambda idx: np.zeros(x.shape, x.dtype)[idx]),
      jax.eval_shape(empty_totals))
  for batch in input_pipeline.create_eval_iterator(
      config.data, global_batch_size=config.global_batch_size, image_size=config.image_size):
    totals = compiled_eval_step(variables, sharding.host_to_global(batch, mesh), totals)
  totals = jax.device_get(totals)
  n = int(totals['num_examples'])
  if n == 0:
    raise ValueError('the eval split is empty.')
  return {'eval/top1': float(totals['top1']) / n, 'eval/top5': float(totals['top5']) / n,
          'eval/loss': float(totals['loss']) / n, 'eval/num_examples': n}


# ---------------------------------------------------------------------------------------------
# Pretrained weights (fine-tuning and eval mode).

def read_weights(path: str) -> tuple[dict, dict]:
  """{'params', 'batch_stats'} (numpy) and metadata from converted weights or a workdir."""
  if os.path.isfile(os.path.join(path, checkpointing.METADATA_FILE)):
    return checkpointing.load_variables(path)
  return checkpointing.load_training_variables(path)


def place_weights(path: str, target: dict, *, drop_head: bool) -> dict:
  """The weights at `path`, checked against and laid out like `target` (jax.Arrays).

  With `drop_head`, a head of another number of classes keeps `target`'s (fresh) values, and a
  warning names the dropped leaves.
  """
  loaded, meta = read_weights(path)
  got, want = checkpointing.flatten(loaded), checkpointing.flatten(target)
  dropped = [k for k in want if k.startswith('params/head/') and k in got
             and tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if drop_head and dropped:
    logging.warning(
        'init_from %s: the number of classes differs; dropping the checkpoint head (%s) and '
        'training a fresh one.', path,
        ', '.join(f'{k[len("params/"):]} {tuple(np.shape(got[k]))} -> {tuple(want[k].shape)}'
                  for k in dropped))
    for k in dropped:
      got[k] = np.asarray(jax.device_get(want[k]))
  problems = checkpointing.tree_mismatches(got, want)
  if problems:
    raise ValueError(f'the weights at {path} (model {meta.get("model_name", "?")!r}) do not fit '
                     f'the model: ' + '; '.join(problems))

  def place(key, leaf):
    value = np.asarray(got[key], dtype=leaf.dtype)
    return jax.make_array_from_callback(value.shape, leaf.sharding, lambda idx: value[idx])

  placed = {k: place(k, leaf) for k, leaf in want.items()}
  treedef = jax.tree_util.tree_structure(target)
  return jax.tree_util.tree_unflatten(treedef, [placed[k] for k in want])


# ---------------------------------------------------------------------------------------------
# The loop.

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> dict:
  """Trains with periodic evaluation and checkpoints; resumes from `workdir` if it has one.

  `stop_at_step` ends the run after that step as if the job were interrupted (tests).
  SIGTERM / SIGUSR1 (or, with several processes, JAX's preemption sync point) do the same for
  real: every process stops at the same step, that step is checkpointed, and the run returns
  normally; relaunching resumes from it.
  Returns {'state', 'train_loss': {step: loss}, 'eval': {step: metrics}, 'images_per_sec',
  'preempted_at': the step saved on preemption, else None}.
  """
  from debiformer_jax.data import input_pipeline

  config = resolve_config(config, workdir)
  validate_config(config, workdir)
  workdir = os.path.abspath(workdir)
  is_chief = jax.process_index() == 0

  mesh = sharding.make_mesh()
  info = input_pipeline.dataset_info(config.data)
  model = build_model(config, info.num_classes)
  steps_per_epoch, total_steps = train_length(config, info.num_train)
  schedule = make_schedule(config, steps_per_epoch, total_steps)
  tx = make_optimizer(config, schedule)

  init_fn, abstract_state, state_sharding = abstract_train_state(config, model, tx, mesh)

  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdir),
                                       keep=config.keep_checkpoints, keep_best=config.keep_best,
                                       async_save=config.async_checkpoints)
  if manager.latest_step() is not None:
    state, _ = checkpointing.restore(manager, abstract_state)
    _log_chief('Resumed from %s at step %d.', manager.directory, int(state.step))
  else:
    state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
    if config.init_from:
      weights = place_weights(config.init_from, eval_variables(state), drop_head=True)
      state = state.replace(params=weights['params'], batch_stats=weights['batch_stats'],
                            ema_params=weights['params'] if config.ema_decay > 0 else None)
      _log_chief('Initialised from %s.', config.init_from)
  start_step = int(state.step)
  if start_step >= total_steps:
    _log_chief('Step %d of %d: training is already complete.', start_step, total_steps)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  _log_chief('%s: %.2fM params; %d steps (%d per epoch), global batch %d on %d devices (%s).',
             config.model_name, num_params / 1e6, total_steps, steps_per_epoch,
             config.global_batch_size, jax.device_count(), config.sharding)

  train_iter = input_pipeline.create_train_iterator(
      config.data, global_batch_size=config.global_batch_size, image_size=config.image_size,
      seed=config.seed, start_step=start_step)

  t0 = time.perf_counter()
  compiled_train_step = compile_train_step(config, model=model, tx=tx, schedule=schedule,
                                           num_classes=info.num_classes, mesh=mesh,
                                           abstract_state=abstract_state,
                                           state_sharding=state_sharding)
  _log_chief('Compiled the train step in %.1fs.', time.perf_counter() - t0)
  compiled_eval_step = compile_eval_step(config, model=model, num_classes=info.num_classes,
                                         mesh=mesh,
                                         abstract_variables=eval_variables(abstract_state))
  # Processes compile at their own pace; the first step's collectives wait only ~30 s (gloo).
  distributed.barrier('compiled')

  writer = _metric_writer(workdir, is_chief)
  if is_chief:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
  checkpoint_every = max(1, int(round(config.checkpoint_every_epochs * steps_per_epoch)))
  history = {'train_loss': {}, 'eval': {}, 'images_per_sec': None, 'preempted_at': None}
  pending = []  # On-device metrics of the steps since the last log.
  last_time, last_step = time.perf_counter(), start_step

  # The watcher turns SIGTERM/SIGUSR1 into a stop at a step all processes agree on; it must be
  # asked on every process at every step (with several processes it is a collective).
  with preemption.PreemptionWatcher() as watcher:
    for step in range(start_step + 1, total_steps + 1):  # `step` updates done after this one.
      batch = sharding.host_to_global(next(train_iter), mesh)
      state, metrics = compiled_train_step(state, batch)
      pending.append(metrics)

      preempted = watcher.should_stop(step)
      interrupted = preempted or (stop_at_step is not None and step >= stop_at_step)
      do_eval = step % eval_every == 0 or step == total_steps
      do_checkpoint = step % checkpoint_every == 0 or step == total_steps or interrupted
      if step % config.log_every_steps == 0 or do_eval or do_checkpoint:
        fetched = jax.device_get(pending)  # The only host sync of the training loop.
        now = time.perf_counter()
        pending = []
        for i, m in enumerate(fetched):
          history['train_loss'][step - len(fetched) + 1 + i] = float(m['loss'])
        images_per_sec = (step - last_step) * config.global_batch_size / (now - last_time)
        history['images_per_sec'] = images_per_sec
        scalars = {f'train/{k}': float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        scalars['train/images_per_sec'] = images_per_sec
        scalars['train/epoch'] = step / steps_per_epoch
        writer.write_scalars(step, scalars)
        if is_chief:
          eta = (total_steps - step) * (now - last_time) / (step - last_step)
          logging.info('step %d/%d  epoch %.2f  loss %.4f  lr %.2e  %.1f img/s  ETA %s', step,
                       total_steps, step / steps_per_epoch, scalars['train/loss'],
                       scalars['train/lr'], images_per_sec, _format_seconds(eta))

      eval_metrics = None
      if do_eval:
        eval_metrics = evaluate(compiled_eval_step, eval_variables(state), config, mesh)
        history['eval'][step] = eval_metrics
        writer.write_scalars(step, eval_metrics)
        if is_chief:
          logging.info('step %d eval: top-1 %.4f  top-5 %.4f  loss %.4f  (%d examples)', step,
                       eval_metrics['eval/top1'], eval_metrics['eval/top5'],
                       eval_metrics['eval/loss'], eval_metrics['eval/num_examples'])
      if do_checkpoint:
        checkpointing.save(manager, step, state, metrics=eval_metrics)
      if do_eval or do_checkpoint:
        last_time, last_step = time.perf_counter(), step  # Throughput excludes eval and saving.
      if preempted:
        history['preempted_at'] = step
        break
      if interrupted:
        break

  manager.wait_until_finished()
  manager.close()
  writer.flush()
  if history['preempted_at'] is not None and is_chief:
    logging.warning('Preempted: saved a checkpoint of step %d/%d in %s; relaunch with the same '
                    'workdir to resume from it.', history['preempted_at'], total_steps,
                    manager.directory)
  history['state'] = state
  return history


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates `config.init_from` if set, else the latest checkpoint in `workdir`."""
  from debiformer_jax.data import input_pipeline

  config = resolve_config(config, workdir)
  validate_config(config, workdir)
  mesh = sharding.make_mesh()
  info = input_pipeline.dataset_info(config.data)
  model = build_model(config, info.num_classes)
  abstract = jax.eval_shape(
      functools.partial(model.init, train=False), {'params': jax.random.PRNGKey(0)},
      jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32))
  abstract = {'params': abstract['params'], 'batch_stats': abstract.get('batch_stats', {})}
  shardings = sharding.state_shardings(abstract, mesh, config.sharding, config.fsdp_min_size)
  source = config.init_from or workdir
  abstract = with_shardings(abstract, shardings)
  variables = place_weights(source, abstract, drop_head=False)
  step = 0
  if not config.init_from:
    step = int(checkpointing.make_manager(checkpointing.checkpoint_dir(workdir),
                                          read_only=True).latest_step())
  compiled_eval_step = compile_eval_step(config, model=model, num_classes=info.num_classes,
                                         mesh=mesh, abstract_variables=abstract)
  metrics = evaluate(compiled_eval_step, variables, config, mesh)
  writer = _metric_writer(workdir, jax.process_index() == 0)
  writer.write_scalars(step, metrics)
  writer.flush()
  if jax.process_index() == 0:
    logging.info('eval of %s: top-1 %.4f  top-5 %.4f  loss %.4f  (%d examples)', source,
                 metrics['eval/top1'], metrics['eval/top5'], metrics['eval/loss'],
                 metrics['eval/num_examples'])
  return metrics


def _log_chief(msg: str, *args) -> None:
  """logging.info on process 0 only (the others run the same loop and would repeat it)."""
  if jax.process_index() == 0:
    logging.info(msg, *args)


logging.ABSLLogger.register_frame_to_skip(__file__, '_log_chief')  # Log the caller's line.


def _metric_writer(workdir: str, is_chief: bool) -> metric_writers.MetricWriter:
  """TensorBoard (and log) writer on process 0; a writer that drops everything elsewhere."""
  if is_chief:
    return metric_writers.create_default_writer(workdir)
  return metric_writers.MultiWriter([])


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'

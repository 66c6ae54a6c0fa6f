"""Training and evaluation of DeBiFormer, readable top to bottom.

`train_and_evaluate(config, workdir)`:
  set-up (finalize config -> mesh -> dataset -> model) -> optimizer -> abstract state ->
  shardings -> restore from workdir, or init (+ `init_from` weights) -> data iterators ->
  compiled steps -> loop: train step, log every `log_every_steps`, eval + checkpoint every
  epoch (by default).

`evaluate_checkpoint(config, workdir)`: evaluates `config.init_from` (converted weights or a
workdir) or the latest checkpoint in `workdir`, with the same set-up.

The train step runs under `jax.jit` with NamedShardings on a ('data', 'model') mesh: the batch
is split over 'data'; params and optimizer state are replicated ('dp') or split over 'data'
('fsdp'). Batches arrive as uint8 images; normalisation, the random-erasing fill,
mixup/cutmix, label smoothing and stochastic depth happen on device; their random keys are
`fold_in(state.rng, state.step)`, so a resumed run repeats an uninterrupted one exactly.
Metrics stay on device until a log step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
from clu import metric_writers, periodic_actions

from debiformer_jax import checkpointing, device_augment, distributed, mixup, preemption
from debiformer_jax import sharding, weights
from debiformer_jax import config as config_lib
from debiformer_jax.data import class_names as class_names_lib
from debiformer_jax.data import input_pipeline
from debiformer_jax.models import DeBiFormer, get_architecture


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Number of updates applied.
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # None when config.ema_decay == 0.
  rng: jax.Array  # Raw uint32[2] key; step keys are fold_in(rng, step).


# ---------------------------------------------------------------------------------------------
# Set-up shared by training and evaluation.

@dataclasses.dataclass(frozen=True)
class Job:
  config: ml_collections.ConfigDict  # Finalized: resolved for the workdir and checked.
  workdir: str
  mesh: jax.sharding.Mesh
  data: input_pipeline.DatasetInfo
  model: DeBiFormer

  @property
  def is_chief(self) -> bool:
    return jax.process_index() == 0


def setup(config: ml_collections.ConfigDict, workdir: str) -> Job:
  """Checks the config (config.ConfigError before anything compiles), reads the dataset's
  sizes, builds the model for its class count."""
  config = config_lib.finalize(config, workdir)
  data = input_pipeline.dataset_info(config.data)
  return Job(config=config, workdir=os.path.abspath(workdir), mesh=sharding.make_mesh(),
             data=data, model=build_model(config, data.num_classes))


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> DeBiFormer:
  arch = get_architecture(config.model_name, num_classes=num_classes,
                          **config_lib.model_overrides(config))
  return DeBiFormer(arch, config_lib.implementation(config), config_lib.DTYPES[config.dtype])


# ---------------------------------------------------------------------------------------------
# Optimizer and state.

def train_length(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps)."""
  steps_per_epoch = num_train // config.global_batch_size
  if steps_per_epoch < 1:
    raise config_lib.ConfigError(
        f'global_batch_size={config.global_batch_size} is larger than the {num_train} '
        f'training examples of {config.data.name}: use a global batch of at most {num_train}.')
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
  """True where weight decay applies: every parameter of more than one dimension.

  The official run builds AdamW with timm's `create_optimizer`, which exempts 1-D parameters,
  names ending in '.bias' (all 1-D here) and `no_weight_decay()` ({'pos_embed', 'cls_token'}:
  DeBiFormer has neither). So the relative-position tables (3-D) are decayed.
  """
  return jax.tree.map(lambda x: x.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
  o = config.optimizer
  clip = optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm > 0 else optax.identity()
  return optax.chain(clip, optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                                       weight_decay=o.weight_decay, mask=decay_mask))


def init_state(rng, *, model, tx, use_ema: bool) -> TrainState:
  params_rng, state_rng = jax.random.split(rng)
  variables = weights.init_variables(model, params_rng)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables['batch_stats'], opt_state=tx.init(params),
                    ema_params=params if use_ema else None, rng=state_rng)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def abstract_train_state(config: ml_collections.ConfigDict, model, tx, mesh):
  """(init_fn(rng) -> TrainState, abstract state with shardings, state shardings)."""
  init_fn = functools.partial(init_state, model=model, tx=tx, use_ema=config.ema_decay > 0)
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


def train_step(state: TrainState, batch: dict, *, model, tx, schedule,
               config: ml_collections.ConfigDict):
  """One update from a train batch (uint8 'image', 'label', 'erase' boxes). Returns the new
  state and on-device metrics."""
  erase_rng, mix_rng, dropout_rng = jax.random.split(
      jax.random.fold_in(state.rng, state.step), 3)
  images = device_augment.normalize(batch['image'])
  if config.data.random_erase > 0:  # Else every box is empty: no noise to draw.
    images = device_augment.erase(erase_rng, images, batch['erase'])
  images, targets = mixup.mixup_cutmix(
      mix_rng, images, batch['label'], num_classes=model.config.num_classes,
      label_smoothing=config.label_smoothing, **config.mixup)

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, images, targets, dropout_rng, model=model)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema, decay = state.ema_params, config.ema_decay
  if ema is not None:
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema)
  metrics = {'loss': loss, 'lr': schedule(state.step), 'grad_norm': optax.global_norm(grads)}
  return new_state, metrics


def compile_train_step(config: ml_collections.ConfigDict, *, model, tx, schedule, mesh,
                       abstract_state, state_sharding):
  """The train step, compiled ahead of time for global batches split over 'data'.

  The state is donated: its buffers are reused for the new state.
  """
  step_fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config)
  return jax.jit(step_fn, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)),
                 donate_argnums=0).lower(abstract_state, abstract_batch(config, mesh)).compile()


def abstract_batch(config: ml_collections.ConfigDict, mesh, *, train: bool = True) -> dict:
  """Shapes of a global batch split over 'data' (input_pipeline's): uint8 image, label, and
  the erasing boxes (train) or the mask (eval)."""
  batch_sharding = sharding.batch_sharding(mesh)
  size = (config.global_batch_size, config.image_size, config.image_size, 3)
  batch = {'image': jax.ShapeDtypeStruct(size, jnp.uint8, sharding=batch_sharding),
           'label': jax.ShapeDtypeStruct(size[:1], jnp.int32, sharding=batch_sharding)}
  if train:
    batch['erase'] = jax.ShapeDtypeStruct((size[0], 4), jnp.int32, sharding=batch_sharding)
  else:
    batch['mask'] = jax.ShapeDtypeStruct(size[:1], jnp.float32, sharding=batch_sharding)
  return batch


def eval_step(variables: dict, batch: dict, totals: dict, *, model) -> dict:
  """Adds this batch's (uint8 'image', 'label', 'mask') masked loss sum and top-1/top-5
  counts to `totals`."""
  images = device_augment.normalize(batch['image'])
  logits = model.apply(variables, images, train=False).astype(jnp.float32)
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jax.lax.top_k(logits, min(5, model.config.num_classes))[1] == labels[:, None]
  batch_totals = {
      'loss': jnp.sum(loss * mask),
      'top1': jnp.sum(correct[:, 0] * mask).astype(jnp.int32),
      'top5': jnp.sum(correct.any(axis=1) * mask).astype(jnp.int32),
      'num_examples': jnp.sum(mask).astype(jnp.int32),
  }
  return jax.tree.map(jnp.add, totals, batch_totals)


def compile_eval_step(config: ml_collections.ConfigDict, *, model, mesh, abstract_variables):
  """The eval step, compiled ahead of time (like the train step) for `abstract_variables`
  ({'params', 'batch_stats'} with shardings) and global eval batches split over 'data'; the
  totals stay replicated."""
  replicated = sharding.replicated(mesh)
  abstract_totals = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(empty_totals))
  step_fn = functools.partial(eval_step, model=model)
  return jax.jit(step_fn, out_shardings=replicated).lower(
      abstract_variables, abstract_batch(config, mesh, train=False), abstract_totals).compile()


def empty_totals() -> dict:
  return {'loss': jnp.zeros((), jnp.float32), 'top1': jnp.zeros((), jnp.int32),
          'top5': jnp.zeros((), jnp.int32), 'num_examples': jnp.zeros((), jnp.int32)}


def evaluate(compiled_eval_step, variables: dict, config: ml_collections.ConfigDict,
             mesh) -> dict:
  """Top-1, top-5 and mean loss over the whole eval split; each example counted once."""
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
# The loop.

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False,
                       stop_at_step: int | None = None) -> dict:
  """Trains with periodic evaluation and checkpoints; resumes from `workdir` if it has one.

  A resumed run must have the config saved in the workdir (config.json) up to harmless fields
  (`config.RESUMABLE_FIELDS`); other changes are a ConfigError unless `allow_config_change`.
  `stop_at_step` ends the run after that step as if the job were interrupted (tests).
  SIGTERM / SIGUSR1 / a first Ctrl-C (or, with several processes, JAX's preemption sync point)
  do the same for real: every process stops at the same step, that step is checkpointed, and
  the run returns normally; relaunching resumes from it. A checkpoint that cannot be written
  stops the run with checkpointing.CheckpointSaveError.
  Returns {'state', 'train_loss': {step: loss}, 'eval': {step: metrics},
  'preempted_at': the step saved on preemption, else None}.
  """
  job = setup(config, workdir)
  config, mesh, model = job.config, job.mesh, job.model
  steps_per_epoch, total_steps = train_length(config, job.data.num_train)
  schedule = make_schedule(config, steps_per_epoch, total_steps)
  tx = make_optimizer(config, schedule)

  init_fn, abstract_state, state_sharding = abstract_train_state(config, model, tx, mesh)

  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(job.workdir),
                                       keep=config.keep_checkpoints, keep_best=config.keep_best,
                                       async_save=config.async_checkpoints)
  if manager.latest_step() is not None:
    _check_resumed_config(job, manager.latest_step(), allow_config_change)
    state = checkpointing.restore(manager, abstract_state)
    _log_chief('Resumed from %s at step %d.', manager.directory, int(state.step))
  else:
    state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
    if config.init_from:
      loaded = weights.load(config.init_from, eval_variables(state), drop_head=True)
      state = state.replace(params=loaded['params'], batch_stats=loaded['batch_stats'],
                            ema_params=loaded['params'] if config.ema_decay > 0 else None)
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
                                           mesh=mesh, abstract_state=abstract_state,
                                           state_sharding=state_sharding)
  _log_chief('Compiled the train step in %.1fs.', time.perf_counter() - t0)
  compiled_eval_step = compile_eval_step(config, model=model, mesh=mesh,
                                         abstract_variables=eval_variables(abstract_state))
  # Processes compile at their own pace; the first step's collectives wait only ~30 s (gloo).
  distributed.barrier('compiled')

  writer = _metric_writer(job)
  if job.is_chief:
    with open(os.path.join(job.workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    class_names_lib.write(job.workdir, job.data.class_names)
  # Progress, rate and ETA on the console (and steps_per_sec in TensorBoard).
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps, every_secs=None)

  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
  checkpoint_every = max(1, int(round(config.checkpoint_every_epochs * steps_per_epoch)))
  history = {'train_loss': {}, 'eval': {}, 'preempted_at': None}
  pending = []  # On-device metrics of the steps since the last log.
  saving = False  # A background save started and not yet checked.
  last_time, last_step = time.perf_counter(), start_step

  # The watcher turns SIGTERM/SIGUSR1 into a stop at a step all processes agree on; it must be
  # asked on every process at every step (with several processes it is a collective).
  with preemption.PreemptionWatcher() as watcher:
    for step in range(start_step + 1, total_steps + 1):  # `step` updates done after this one.
      batch = sharding.host_to_global(next(train_iter), mesh)
      state, metrics = compiled_train_step(state, batch)
      if saving and not manager.is_saving_in_progress():
        checkpointing.check_saved(manager)  # A failed background save stops the run here.
        saving = False
      pending.append(metrics)
      if job.is_chief:
        progress(step)

      preempted = watcher.should_stop(step)
      interrupted = preempted or (stop_at_step is not None and step >= stop_at_step)
      do_eval = step % eval_every == 0 or step == total_steps
      do_checkpoint = step % checkpoint_every == 0 or step == total_steps or interrupted
      if step % config.log_every_steps == 0 or do_eval or do_checkpoint:
        fetched = jax.device_get(pending)  # The only host sync of the training loop.
        pending = []
        for i, m in enumerate(fetched):
          history['train_loss'][step - len(fetched) + 1 + i] = float(m['loss'])
        scalars = {f'train/{k}': float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        scalars['train/images_per_sec'] = ((step - last_step) * config.global_batch_size
                                           / (time.perf_counter() - last_time))
        scalars['train/epoch'] = step / steps_per_epoch
        # Examples this process skipped so far because their image could not be decoded.
        scalars['train/skipped_images'] = train_iter.undecodable.skipped
        writer.write_scalars(step, scalars)

      eval_metrics = None
      if do_eval:
        with progress.timed('eval'):
          eval_metrics = evaluate(compiled_eval_step, eval_variables(state), config, mesh)
        history['eval'][step] = eval_metrics
        writer.write_scalars(step, eval_metrics)
      if do_checkpoint:
        saving = checkpointing.save(manager, step, state, metrics=eval_metrics) or saving
      if do_eval or do_checkpoint:
        last_time, last_step = time.perf_counter(), step  # Throughput excludes eval and saving.
      if preempted:
        history['preempted_at'] = step
        break
      if interrupted:
        break

  checkpointing.check_saved(manager)
  manager.close()
  writer.flush()
  if history['preempted_at'] is not None and job.is_chief:
    logging.warning('Preempted: saved a checkpoint of step %d/%d in %s; relaunch with the same '
                    'workdir to resume from it.', history['preempted_at'], total_steps,
                    manager.directory)
  history['state'] = state
  return history


def _check_resumed_config(job: Job, step: int, allow_change: bool) -> None:
  """Compares the config with the one saved in the workdir (ConfigError if it changed what the
  run means, unless `allow_change`); an accepted change keeps the old file beside the new."""
  path = os.path.join(job.workdir, 'config.json')
  try:
    with open(path) as f:
      saved = json.load(f)
  except FileNotFoundError:  # Checkpoints from before config.json was written, or moved.
    return
  meaningful, harmless = config_lib.config_changes(saved, job.config)
  if harmless:
    _log_chief('Resuming with changed settings that do not change the run: %s.',
               '; '.join(harmless))
  if not meaningful:
    return
  if not allow_change:
    raise config_lib.ConfigError(
        f'the config differs from the one {job.workdir} was trained with (config.json) in '
        f'fields that change what the run means:\n  - ' + '\n  - '.join(meaningful)
        + f'\nUse a new workdir for a new run, or pass --allow_config_change to continue '
        f'this one from step {step} with the new values.')
  if job.is_chief:
    logging.warning('Continuing from step %d with a changed config (--allow_config_change): '
                    '%s.', step, '; '.join(meaningful))
    os.replace(path, os.path.join(job.workdir, f'config.until_step_{step}.json'))


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates `config.init_from` if set, else the latest checkpoint in `workdir`."""
  job = setup(config, workdir)
  config = job.config
  abstract = weights.abstract_variables(job.model)
  abstract = with_shardings(abstract, sharding.state_shardings(
      abstract, job.mesh, config.sharding, config.fsdp_min_size))
  source = config.init_from or job.workdir
  variables = weights.load(source, abstract)
  step = 0
  if not config.init_from:
    step = checkpointing.make_manager(checkpointing.checkpoint_dir(job.workdir),
                                      read_only=True).latest_step()
  compiled_eval_step = compile_eval_step(config, model=job.model, mesh=job.mesh,
                                         abstract_variables=abstract)
  metrics = evaluate(compiled_eval_step, variables, config, job.mesh)
  _log_chief('Evaluated %s.', source)
  writer = _metric_writer(job)
  writer.write_scalars(step, metrics)
  writer.flush()
  return metrics


def _log_chief(msg: str, *args) -> None:
  """logging.info on process 0 only (the others run the same loop and would repeat it)."""
  if jax.process_index() == 0:
    logging.info(msg, *args)


logging.ABSLLogger.register_frame_to_skip(__file__, '_log_chief')  # Log the caller's line.


def _metric_writer(job: Job) -> metric_writers.MetricWriter:
  """TensorBoard events and one console line per write on process 0; nothing elsewhere."""
  if job.is_chief:
    os.makedirs(job.workdir, exist_ok=True)
    return metric_writers.create_default_writer(job.workdir)
  return metric_writers.MultiWriter([])

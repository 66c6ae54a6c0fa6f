"""Training checkpoints: the whole training state through an orbax CheckpointManager.

Checkpoints live in `<workdir>/checkpoints/<step>/state/` (params, batch_stats, opt_state,
EMA params, step, rng; the step is also the data position, since the input pipeline resumes
from `start_step`). The last `keep` checkpoints and the `keep_best` best by eval top-1 are kept.
Orbax writes each checkpoint into a `<step>.orbax-checkpoint-tmp*` directory and renames it
only when complete, so a save that dies half-way never replaces or hides a good checkpoint.
A failed save stops the run (`CheckpointSaveError`, noticed at the first step after the
background write fails). A step that does not restore (a truncated file) is moved aside to
`<step>.damaged` when an older step restores, and the run resumes from that one.
Model weights alone (converted or from a workdir) are read by `weights.py`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

STATE_ITEM = 'state'
BEST_METRIC = 'eval/top1'
DAMAGED_SUFFIX = '.damaged'
_CAUSE_CHARS = 300  # Of a restore error (TensorStore's are long); enough to name the file.


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the message names the directory and the cause."""


class CheckpointRestoreError(RuntimeError):
  """No checkpoint in a directory restores; the message names it and every step's cause."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(directory: str, *, keep: int = 3, keep_best: int = 1,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  """A manager that keeps the last `keep` and the `keep_best` best (by eval/top1) steps."""
  keep_policies = [policies.LatestN(n=max(keep, 1))]
  if keep_best > 0:
    keep_policies.append(policies.BestN(get_metric_fn=_best_metric, reverse=False,
                                        n=keep_best, keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep_policies),
      # best_fn makes orbax write each step's metrics and read them back after a restart, so
      # "best" is still known when a resumed run decides what to delete.
      best_fn=_best_metric, best_mode='max',
      enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(directory, options=options, item_names=(STATE_ITEM,))


def _best_metric(metrics: Mapping[str, float]) -> float:
  return metrics[BEST_METRIC]


def save(manager: ocp.CheckpointManager, step: int, state: Any, *,
         metrics: Mapping[str, float] | None = None) -> bool:
  """Saves `state` at `step` (asynchronously; `check_saved(manager)` waits for it).

  `metrics` with an 'eval/top1' entry make the step a candidate for "best".
  Raises CheckpointSaveError if this save, or an earlier background one, failed.
  """
  if step in manager.all_steps():
    return False
  metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
  try:
    return manager.save(step, metrics=metrics, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(state)}))
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, e) from e


def check_saved(manager: ocp.CheckpointManager) -> None:
  """Waits for the background save; raises CheckpointSaveError if it failed."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, e) from e


def _save_error(manager: ocp.CheckpointManager, cause: Exception) -> CheckpointSaveError:
  latest = manager.latest_step()
  last = f'step {latest}' if latest is not None else 'none'
  return CheckpointSaveError(
      f'could not write a checkpoint in {manager.directory} ({type(cause).__name__}: {cause}); '
      f'training stopped. The last complete checkpoint there: {last}. Make the directory '
      f'writable (space, permissions, mount) and relaunch to resume.')


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None):
  """The state of `step`, laid out as `abstract_state`'s ShapeDtypeStructs (shardings
  included) say. Without `step`: the newest step that restores (`restore_latest`)."""
  if step is None:
    return restore_latest(manager, abstract_state)
  restored = manager.restore(step, args=ocp.args.Composite(
      **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
  return restored[STATE_ITEM]


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any):
  """The newest step that restores. Newer ones that fail are reported and, once an older one
  has restored (so `abstract_state` fits this run), moved aside to `<step>.damaged` by
  process 0; never deleted. Raises CheckpointRestoreError if none restores."""
  failed = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = restore(manager, abstract_state, step)
    except Exception as e:  # pylint: disable=broad-except
      cause = f'{type(e).__name__}: {str(e)[:_CAUSE_CHARS]}'
      logging.warning('Checkpoint step %d in %s does not restore (%s).', step,
                      manager.directory, cause)
      failed.append((step, cause))
      continue
    for bad, _ in failed:
      _move_aside(manager, bad)
    if failed:
      manager.reload()
    return state
  if not failed:
    raise CheckpointRestoreError(f'no checkpoint in {manager.directory}.')
  raise CheckpointRestoreError(
      f'no checkpoint in {manager.directory} restores; nothing was moved or deleted: '
      + '; '.join(f'step {s}: {c}' for s, c in failed)
      + '. Use another workdir to start afresh, or remove the damaged steps.')


def _move_aside(manager: ocp.CheckpointManager, step: int) -> None:
  source = os.path.join(os.fspath(manager.directory), str(step))
  target, n = source + DAMAGED_SUFFIX, 1
  while os.path.exists(target):  # Damaged twice (restored from, damaged again): keep both.
    target, n = f'{source}{DAMAGED_SUFFIX}.{n}', n + 1
  if jax.process_index() == 0:
    os.replace(source, target)
  logging.warning('Skipped the damaged checkpoint step %d: moved it to %s (kept, not deleted).',
                  step, target)

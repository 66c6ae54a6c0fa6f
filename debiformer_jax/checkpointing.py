"""Training checkpoints: the whole training state through an orbax CheckpointManager.

Checkpoints live in `<workdir>/checkpoints/<step>/state/` (params, batch_stats, opt_state,
EMA params, step, rng; the step is also the data position, since the input pipeline resumes
from `start_step`). The last `keep` checkpoints and the `keep_best` best by eval top-1 are kept.
Orbax writes each checkpoint into a `<step>.orbax-checkpoint-tmp*` directory and renames it
only when complete, so a save that dies half-way never replaces or hides a good checkpoint.
Model weights alone (converted or from a workdir) are read by `weights.py`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

STATE_ITEM = 'state'
BEST_METRIC = 'eval/top1'


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
  """Saves `state` at `step` (asynchronously; `manager.wait_until_finished()` to block).

  `metrics` with an 'eval/top1' entry make the step a candidate for "best".
  """
  if step in manager.all_steps():
    return False
  metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
  return manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state)}),
                      metrics=metrics)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None):
  """The state of `step` (default: the latest complete one), laid out as `abstract_state`'s
  ShapeDtypeStructs (shardings included) say."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}')
  restored = manager.restore(step, args=ocp.args.Composite(
      **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
  return restored[STATE_ITEM]

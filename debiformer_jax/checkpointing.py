"""Checkpoints: the training state (orbax CheckpointManager) and converted model weights.

Training checkpoints live in `<workdir>/checkpoints/<step>/` with two items: `state` (params,
batch_stats, opt_state, EMA params, step, rng) and `meta` (JSON: step, which is also the data
position, since the input pipeline resumes from `start_step`). The last `keep` checkpoints and
the `keep_best` best by eval top-1 are kept. Orbax writes each checkpoint into a
`<step>.orbax-checkpoint-tmp*` directory and renames it only when complete, so a save that
dies half-way never replaces or hides a good checkpoint.

Converted weights (written by convert_torch_weights.py, read by `init_from`) are a directory
with `variables/` (orbax checkpoint of {'params', 'batch_stats'}) and `debiformer.json`
(model name, model config). The JSON is written last, so a directory without it is incomplete.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

METADATA_FILE = 'debiformer.json'
VARIABLES_DIR = 'variables'
FORMAT = 'debiformer-jax-variables'
BEST_METRIC = 'eval/top1'


# ---------------------------------------------------------------------------------------------
# Training state.

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
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'meta'))


def _best_metric(metrics: Mapping[str, float]) -> float:
  return metrics[BEST_METRIC]


def save(manager: ocp.CheckpointManager, step: int, state: Any, *,
         metrics: Mapping[str, float] | None = None) -> bool:
  """Saves `state` at `step` (asynchronously; `manager.wait_until_finished()` to block).

  `metrics` with an 'eval/top1' entry make the step a candidate for "best".
  """
  if step in manager.all_steps():
    return False
  meta = {'step': int(step)}
  metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)),
                      metrics=metrics)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None):
  """(state, meta) of `step` (default: the latest complete one), laid out as `abstract_state`'s
  ShapeDtypeStructs (shardings included) say."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}')
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored['state'], restored['meta']


def _restore_numpy(path: str) -> Any:
  """Any orbax pytree checkpoint item at `path` as a nested dict of numpy arrays."""
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def load_training_variables(directory: str, use_ema: bool = True) -> tuple[dict, dict]:
  """{'params', 'batch_stats'} (numpy) of the latest training checkpoint, and its meta.

  `directory` is a workdir or its checkpoints/ folder. With `use_ema` the EMA params are
  returned when the checkpoint has them (they are what was evaluated).
  """
  ckpt_dir = checkpoint_dir(directory)
  if not os.path.isdir(ckpt_dir):
    ckpt_dir = directory
  manager = make_manager(ckpt_dir, read_only=True)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(
        f'{directory} holds no training checkpoint (no complete step directory in {ckpt_dir}) '
        f'and no {METADATA_FILE} of converted weights.')
  state = _restore_numpy(os.path.join(ckpt_dir, str(step), 'state'))
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  params = state['ema_params'] if use_ema and state.get('ema_params') else state['params']
  return {'params': params, 'batch_stats': state.get('batch_stats') or {}}, meta


# ---------------------------------------------------------------------------------------------
# Converted weights.

def save_variables(directory: str, variables: Mapping[str, Any], *, model_name: str,
                   model_config: Mapping[str, Any], overwrite: bool = False,
                   extra_metadata: Mapping[str, Any] | None = None) -> str:
  """Writes {'params', 'batch_stats'} and debiformer.json to `directory` (made absolute).

  Refuses a non-empty `directory` unless `overwrite`, which deletes it first.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    if not overwrite:
      raise FileExistsError(f'{directory} exists and is not empty; choose another output '
                            f'directory or pass overwrite=True (--overwrite) to replace it.')
    shutil.rmtree(directory) if os.path.isdir(directory) else os.remove(directory)
  os.makedirs(directory, exist_ok=True)
  tree = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, VARIABLES_DIR), tree)
    ckptr.wait_until_finished()
  meta = {'format': FORMAT, 'version': 1, 'model_name': model_name,
          'model_config': _jsonable(dict(model_config)), **(extra_metadata or {})}
  tmp = os.path.join(directory, METADATA_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, METADATA_FILE))
  return directory


def load_variables(directory: str, abstract_variables: Any | None = None) -> tuple[dict, dict]:
  """(variables as numpy, metadata) of a directory written by `save_variables`.

  With `abstract_variables` (e.g. `jax.eval_shape(model.init, ...)`) every leaf's shape is
  checked and a ValueError names the leaves that are missing, unexpected or of another shape.
  """
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, METADATA_FILE)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no converted checkpoint at {directory}: the directory does not '
                            f'exist.')
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(
        f'{directory} is not a converted DeBiFormer checkpoint: {METADATA_FILE} is missing '
        f'(an interrupted conversion, or another kind of directory). Re-run the converter.')
  with open(meta_path) as f:
    meta = json.load(f)
  variables = _restore_numpy(os.path.join(directory, VARIABLES_DIR))
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats') or {}}
  if abstract_variables is not None:
    problems = tree_mismatches(variables, abstract_variables)
    if problems:
      raise ValueError(
          f'the checkpoint in {directory} (model {meta.get("model_name")!r}) does not fit the '
          f'model: ' + '; '.join(problems) + '. Is it a checkpoint of another variant?')
  return variables, meta


# ---------------------------------------------------------------------------------------------
# Tree comparison.

def flatten(tree: Any) -> dict[str, Any]:
  """{'params/stage0/.../kernel': leaf} for a nested dict of arrays."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat['/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)] = leaf
  return flat


def tree_mismatches(tree: Any, reference: Any, limit: int = 10) -> list[str]:
  """Leaves missing from / unexpected in `tree`, or with another shape than in `reference`."""
  got, want = flatten(tree), flatten(reference)
  problems = [f'{k}: shape {tuple(np.shape(got[k]))} in the checkpoint, '
              f'{tuple(want[k].shape)} in the model'
              for k in want if k in got and tuple(np.shape(got[k])) != tuple(want[k].shape)]
  missing = [k for k in want if k not in got]
  unexpected = [k for k in got if k not in want]
  if missing:
    problems.append(f'{len(missing)} leaves missing from the checkpoint: '
                    + ', '.join(missing[:limit]) + (' ...' if len(missing) > limit else ''))
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected leaves in the checkpoint: '
                    + ', '.join(unexpected[:limit]) + (' ...' if len(unexpected) > limit else ''))
  return problems


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic,)):
    return x.item()
  return x

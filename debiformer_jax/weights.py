"""Model weights: built, written, read and placed, in one place.

Variables are `{'params', 'batch_stats'}`. They come from two kinds of directory:
  - converted weights (written by convert_torch_weights.py with `save`): `variables/` (an
    orbax checkpoint) and `debiformer.json` (model name, architecture, provenance), written
    last, so a directory without it is incomplete;
  - a training workdir (or its checkpoints/ folder): its latest checkpoint's params (the EMA
    params when the run kept them: they are what was evaluated) and batch_stats.
`read` returns either as numpy; `load` checks them against a model's abstract variables and
lays them out with its shardings, optionally dropping a head of another class count.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from debiformer_jax import checkpointing

METADATA_FILE = 'debiformer.json'
VARIABLES_DIR = 'variables'
FORMAT = 'debiformer-jax-variables'


def init_variables(model, rng) -> dict:
  """Fresh {'params', 'batch_stats'} of `model` (their shapes do not depend on the input
  size; the smallest size the model takes is used)."""
  side = model.config.smallest_input_size()
  x = jnp.zeros((1, side, side, model.config.in_chans), jnp.float32)
  variables = model.init({'params': rng}, x, train=False)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def abstract_variables(model) -> dict:
  """ShapeDtypeStructs of `init_variables(model, ...)`, computed without running anything."""
  return jax.eval_shape(lambda rng: init_variables(model, rng), jax.random.PRNGKey(0))


def check_output(directory: str, *, overwrite: bool = False,
                 keep: tuple[str, ...] = ()) -> str:
  """The absolute `directory` if `save` may write there, else FileExistsError saying why.

  A new or empty directory is fine; with `overwrite`, so is an earlier conversion (it holds
  METADATA_FILE and none of the `keep` paths, e.g. the checkpoint being converted).
  """
  directory = os.path.abspath(directory)
  for path in keep:
    path = os.path.realpath(path)
    if os.path.commonpath([path, os.path.realpath(directory)]) == os.path.realpath(directory):
      raise FileExistsError(f'{directory} contains {path}, which is being converted; write the '
                            f'conversion to a directory of its own.')
  if not os.path.exists(directory) or (os.path.isdir(directory) and not os.listdir(directory)):
    return directory
  if not overwrite:
    raise FileExistsError(f'{directory} exists and is not empty; choose another output '
                          f'directory or pass overwrite=True (--overwrite) to replace an earlier '
                          f'conversion there.')
  if not os.path.isfile(os.path.join(directory, METADATA_FILE)):
    raise FileExistsError(f'{directory} is not an earlier conversion (it has no {METADATA_FILE}),'
                          f' so --overwrite does not replace it; choose another output directory.')
  return directory


def save(directory: str, variables: Mapping[str, Any], *, model_name: str,
         architecture: Mapping[str, Any], overwrite: bool = False,
         metadata: Mapping[str, Any] | None = None, keep: tuple[str, ...] = ()) -> str:
  """Writes converted `variables` and debiformer.json to `directory` (made absolute).

  Checks `directory` with `check_output` first. Everything is written to a temporary sibling
  that is renamed into place when complete, so an earlier conversion is replaced only by a
  complete one, and an interrupted save leaves no half-written output.
  """
  directory = check_output(directory, overwrite=overwrite, keep=keep)
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{name}.writing-', dir=parent)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it readable by its owner only.
    _write(staging, variables, model_name=model_name, architecture=architecture,
           metadata=metadata)
    replaced = None
    if os.path.exists(directory):  # An earlier conversion (check_output) or an empty folder.
      replaced = tempfile.mkdtemp(prefix=f'.{name}.replaced-', dir=parent)
      os.replace(directory, os.path.join(replaced, name))
    try:
      os.replace(staging, directory)
    except BaseException:
      if replaced is not None:
        os.replace(os.path.join(replaced, name), directory)
      raise
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  if replaced is not None:
    shutil.rmtree(replaced)
  return directory


def _write(directory: str, variables: Mapping[str, Any], *, model_name: str,
           architecture: Mapping[str, Any], metadata: Mapping[str, Any] | None) -> None:
  """variables/ (orbax) and then debiformer.json into the existing `directory`."""
  tree = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, VARIABLES_DIR), tree)
    ckptr.wait_until_finished()
  meta = {'format': FORMAT, 'version': 1, 'model_name': model_name,
          'model_config': _jsonable(dict(architecture)), **(metadata or {})}
  with open(os.path.join(directory, METADATA_FILE), 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True)


def source_problem(path: str) -> str | None:
  """Why `read(path)` would find no weights there (None if it would), in one sentence."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    return f'no weights at {path}: the directory does not exist.'
  if os.path.isfile(os.path.join(path, METADATA_FILE)):
    return None
  ckpt_dir, step = _latest_checkpoint(path)
  if step is None:
    return (f'{path} holds no training checkpoint (no complete step directory in {ckpt_dir}) '
            f'and no {METADATA_FILE} of converted weights (an interrupted conversion, or '
            f'another kind of directory).')
  return None


def _latest_checkpoint(path: str) -> tuple[str, int | None]:
  """(checkpoint directory, its latest step or None) of a workdir or its checkpoints/."""
  ckpt_dir = checkpointing.checkpoint_dir(path)
  if not os.path.isdir(ckpt_dir):
    ckpt_dir = path
  return ckpt_dir, checkpointing.make_manager(ckpt_dir, read_only=True).latest_step()


def workdir_steps(path: str) -> dict[int, float | None]:
  """{step: its eval top-1, None without eval metrics} of the checkpoints of a training
  workdir (or its checkpoints/ folder); FileNotFoundError when it has none."""
  path = os.path.abspath(path)
  problem = source_problem(path)
  if problem:
    raise FileNotFoundError(problem)
  manager = checkpointing.make_manager(_latest_checkpoint(path)[0], read_only=True)
  steps = {}
  for step in sorted(manager.all_steps()):
    metrics = manager.metrics(step) or {}
    top1 = metrics.get(checkpointing.BEST_METRIC)
    steps[step] = None if top1 is None else float(top1)
  return steps


def read(path: str, step: int | None = None) -> tuple[dict, dict]:
  """(variables as numpy, metadata) of converted weights or of a training workdir (its
  checkpoint of `step`, default the latest; metadata {'step': step})."""
  path = os.path.abspath(path)
  problem = source_problem(path)
  if problem:
    raise FileNotFoundError(problem)
  if os.path.isfile(os.path.join(path, METADATA_FILE)):
    with open(os.path.join(path, METADATA_FILE)) as f:
      meta = json.load(f)
    return _variables(_restore_numpy(os.path.join(path, VARIABLES_DIR)), ema=False), meta
  ckpt_dir, latest = _latest_checkpoint(path)
  if step is None:
    step = latest
  elif not os.path.isdir(os.path.join(ckpt_dir, str(step))):
    raise ValueError(f'{ckpt_dir} has no checkpoint of step {step}; its steps are '
                     f'{", ".join(map(str, workdir_steps(path)))}.')
  state = _restore_numpy(os.path.join(ckpt_dir, str(step), checkpointing.STATE_ITEM))
  return _variables(state, ema=True), {'step': step}


def load(path: str, target: Any, *, drop_head: bool = False) -> dict:
  """The weights at `path`, checked against and laid out like `target` (ShapeDtypeStructs
  or arrays with shardings, e.g. `abstract_variables(model)` with shardings attached).

  With `drop_head`, a head of another number of classes keeps `target`'s values (they must be
  arrays), and a warning names the dropped leaves.
  """
  loaded, meta = read(path)
  got, want = flatten(loaded), flatten(target)
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
  problems = tree_mismatches(got, want)
  if problems:
    raise ValueError(f'the weights at {path} (model {meta.get("model_name", "?")!r}) do not fit '
                     f'the model: ' + '; '.join(problems) + '. Are they of another variant?')

  def place(key, leaf):
    value = np.asarray(got[key], dtype=leaf.dtype)
    return jax.make_array_from_callback(value.shape, leaf.sharding, lambda idx: value[idx])

  leaves = [place(k, leaf) for k, leaf in want.items()]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)


def _variables(tree: Mapping[str, Any], ema: bool) -> dict:
  """{'params', 'batch_stats'} of a restored tree (a training state's EMA params if `ema`)."""
  params = tree['ema_params'] if ema and tree.get('ema_params') else tree['params']
  return {'params': params, 'batch_stats': tree.get('batch_stats') or {}}


def _restore_numpy(path: str) -> Any:
  """Any orbax pytree checkpoint item at `path` as a nested dict of numpy arrays."""
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


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
  if isinstance(x, np.generic):
    return x.item()
  return x

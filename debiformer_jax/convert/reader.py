"""Reading PyTorch DeBiFormer checkpoints into numpy, without unpickling arbitrary code.

`read_torch_state_dict` accepts a bare state dict or the official training checkpoint
`{'model': state_dict, 'model_ema'?: ..., 'optimizer', 'lr_scheduler', 'epoch', 'scaler',
'args': argparse.Namespace}` and always loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from typing import Any, Dict, Iterable, List, Mapping

import numpy as np
import torch

__all__ = ['read_torch_state_dict']

# Classes the official training checkpoint pickles besides tensors and builtins.
_ALLOWED_GLOBALS = [argparse.Namespace]
_MAX_KEYS_SHOWN = 20


def _describe_keys(keys: Iterable[Any]) -> str:
  """Up to _MAX_KEYS_SHOWN reprs, comma separated, with the total when cut short."""
  keys = [repr(k) for k in keys]
  shown = ', '.join(keys[:_MAX_KEYS_SHOWN])
  if len(keys) > _MAX_KEYS_SHOWN:
    shown += f', ... ({len(keys)} in all)'
  return shown or '(none)'


def _first_line(e: BaseException) -> str:
  """The exception's type and the first line of its message."""
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0]}' if lines else type(e).__name__


def _unpickler_reason(message: str) -> str:
  """The line of torch's weights_only error that says what it refused, if any."""
  for line in message.splitlines():
    if 'WeightsUnpickler error' in line:
      return line.strip()
  return message.strip().splitlines()[0] if message.strip() else 'no message'


def _unsafe_globals(path: str, message: str) -> List[str]:
  """Names of the classes the checkpoint pickles that weights_only loading refuses."""
  names: List[str] = []
  finder = getattr(torch.serialization, 'get_unsafe_globals_in_checkpoint', None)
  if finder is not None:
    try:
      names = list(finder(path))
    except Exception:  # The scan is best effort; torch's message is the fallback.
      names = []
  allowed = {f'{c.__module__}.{c.__qualname__}' for c in _ALLOWED_GLOBALS}
  names = [n for n in names if n not in allowed]
  return names or sorted(set(re.findall(r'GLOBAL ([\w.]+)', message)) - allowed)


def _load(path: str) -> Any:
  """torch.load(weights_only=True) with argparse.Namespace allowed; errors name the path."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  if os.path.isdir(path):
    raise ValueError(f'checkpoint path is a directory, not a file: {path}')
  try:
    with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
      return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    message = str(e)
    names = _unsafe_globals(path, message) if 'GLOBAL' in message else []
    if not names and 'weights_only' not in message.lower().replace(' ', '_'):
      raise ValueError(f'cannot read checkpoint {path}: the file is corrupt, truncated or not a '
                       f'PyTorch checkpoint ({_first_line(e)}).') from e
    what = (f'it pickles {", ".join(names)}' if names
            else f'torch says: {_unpickler_reason(message)}')
    raise ValueError(
        f'cannot read checkpoint {path} safely: torch.load(weights_only=True) refuses it; '
        f'{what}. Only tensors, builtins and argparse.Namespace are accepted. From a trusted '
        f'copy, re-save just the weights (torch.save(ckpt["model"], new_path)), or, if you '
        f'trust the file, allow those classes with torch.serialization.add_safe_globals before '
        f'calling this.') from e
  except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError,
          AttributeError, ImportError, IndexError, TypeError) as e:
    raise ValueError(f'cannot read checkpoint {path}: the file is corrupt, truncated or not a '
                     f'PyTorch checkpoint ({_first_line(e)}).') from e


def _pick_state_dict(obj: Any, path: str, ema: bool) -> Mapping[str, Any]:
  if not isinstance(obj, Mapping):
    raise ValueError(f'checkpoint {path} holds a {type(obj).__name__}, not a dict of weights.')
  if ema:
    if 'model_ema' not in obj:
      raise ValueError(f'checkpoint {path} has no EMA weights (no "model_ema" entry); its '
                       f'top-level keys are: {_describe_keys(obj.keys())}. Use ema=False.')
    state, where = obj['model_ema'], '"model_ema"'
  elif 'model' in obj:
    state, where = obj['model'], '"model"'
  elif 'state_dict' in obj:
    state, where = obj['state_dict'], '"state_dict"'
  else:
    state, where = obj, 'the top level'
  if not isinstance(state, Mapping):
    raise ValueError(f'checkpoint {path}: {where} holds a {type(state).__name__}, not a state '
                     f'dict.')
  not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
  if not_tensors:
    raise ValueError(
        f'checkpoint {path}: {where} is not a state dict of tensors (non-tensor entries: '
        f'{_describe_keys(not_tensors)}). Top-level keys: {_describe_keys(obj.keys())}. '
        f'Expected a bare state dict or a dict with "model" or "state_dict".')
  return state


def _to_numpy(t: torch.Tensor) -> np.ndarray:
  t = t.detach().cpu()
  if t.dtype in (torch.float16, torch.bfloat16):
    t = t.float()
  return np.ascontiguousarray(t.numpy())


def read_torch_state_dict(path: str | os.PathLike, ema: bool = False) -> Dict[str, np.ndarray]:
  """The weights in a PyTorch checkpoint as {name: numpy array}.

  Picks `model_ema` when `ema`, else `model`, else `state_dict`, else the whole (bare) dict.
  Strips a leading "module." from names, drops BatchNorm `num_batches_tracked`, and upcasts
  float16 / bfloat16 to float32. Raises FileNotFoundError for a missing file and ValueError,
  naming the path, for anything it cannot read safely.
  """
  path = os.fspath(path)
  state = _pick_state_dict(_load(path), path, ema)
  out: Dict[str, np.ndarray] = {}
  for key, value in state.items():
    name = key[len('module.'):] if key.startswith('module.') else key
    if name.endswith('num_batches_tracked'):
      continue
    if name in out:
      raise ValueError(f'checkpoint {path}: "{name}" appears both with and without a '
                       f'"module." prefix.')
    out[name] = _to_numpy(value)
  return out

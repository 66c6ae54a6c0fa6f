"""Device mesh and shardings.

One mesh with axes ('data', 'model'). The batch is split over 'data'. Parameters and optimizer
state are either replicated ('dp') or, for 'fsdp', split over 'data' along their largest dimension
that divides evenly; XLA inserts the all-gathers and reduce-scatters. 'model' has size 1 for now.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

STRATEGIES = ('dp', 'fsdp')


def make_mesh(num_model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'model') mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  if num_model < 1 or len(devices) % num_model:
    raise ValueError(f'num_model={num_model} must be >= 1 and divide the {len(devices)} devices.')
  shape = (len(devices) // num_model, num_model)
  return jax.make_mesh(shape, ('data', 'model'), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data', the rest replicated."""
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], num_shards: int, min_size: int) -> P:
  """Shards the largest dimension divisible by `num_shards`, for arrays of >= min_size elements."""
  if num_shards == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % num_shards == 0:
      spec = [None] * len(shape)
      spec[dim] = 'data'
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, strategy: str = 'dp',
                    fsdp_min_size: int = 2 ** 14) -> Any:
  """A NamedSharding for every leaf of `abstract_state` (arrays or ShapeDtypeStructs)."""
  if strategy not in STRATEGIES:
    raise ValueError(f'unknown sharding strategy {strategy!r}; use one of {STRATEGIES}.')

  def leaf_sharding(x):
    if strategy == 'dp':
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape['data'], fsdp_min_size))

  return jax.tree.map(leaf_sharding, abstract_state)


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Turns each process's local batch (numpy, leading dim = global batch / processes) into global
  jax.Arrays split over 'data'. Works on one host and on many."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

"""Joining a multi-process job (jax.distributed), and a barrier across its processes.

On Cloud TPU, in a SLURM step and the other clusters JAX knows, `jax.distributed.initialize()`
finds the job by itself; elsewhere every process is given the same coordinator address and
process count and its own process id. JAX reads JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS
itself.
"""

from __future__ import annotations

import jax
from absl import logging
from jax._src import distributed as jax_distributed  # The coordination client: no public API.

# JAX's error when it finds no cluster and no coordinator address: a plain single host.
_NOTHING_DETECTED = 'coordinator_address should be defined.'
_BARRIER_TIMEOUT_MS = 30 * 60 * 1000
_barrier_uses: dict[str, int] = {}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process's job. Call it before anything touches JAX devices.

  All three given: joins that job. None given: JAX looks for a cluster and this process runs
  alone if there is none.
  """
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  missing = [f'--{name}' for name, value in given.items() if value is None]
  if len(missing) == len(given):
    _initialize_detected()
    return
  if missing:
    raise ValueError(f'missing {", ".join(missing)}: a job joined by hand needs '
                     '--coordinator_address, --num_processes and --process_id together '
                     '(on Cloud TPU or SLURM give none of them).')
  _check(coordinator_address, num_processes, process_id)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  _log_joined()


def _check(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """Refuses values that JAX would reject obscurely, or only once the coordinator times out."""
  host, _, port = coordinator_address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'--coordinator_address must be host:port; got {coordinator_address!r}.')
  if not 0 <= process_id < num_processes:
    raise ValueError(f'need 0 <= --process_id < --num_processes; got --process_id={process_id}, '
                     f'--num_processes={num_processes}.')


def _initialize_detected() -> None:
  """`jax.distributed.initialize()` with JAX's own detection; one process if it finds no job."""
  try:
    jax.distributed.initialize()
  except ValueError as e:
    # Any other gap is a job JAX found only in part: that must not quietly run alone.
    if str(e) != _NOTHING_DETECTED:
      raise
    logging.info('No multi-process job found (Cloud TPU, SLURM, ...): running as one process.')
    return
  _log_joined()


def _log_joined() -> None:
  # From the distributed state: jax.process_index() would start the backends already.
  state = jax_distributed.global_state
  logging.info('Joined the job as process %d of %d (coordinator %s).', state.process_id,
               state.num_processes, state.coordinator_address)


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name` (nothing to wait for alone).

  It goes through the coordination service, not a device collective, so long skews between
  processes (compiling, restoring) do not hit the first collective's short time-out (gloo: 30 s).
  """
  if not jax.distributed.is_initialized():
    return
  # A fresh id for every use: the coordination service expects barrier ids to be unique.
  use = _barrier_uses.get(name, 0)
  _barrier_uses[name] = use + 1
  jax_distributed.global_state.client.wait_at_barrier(f'debiformer:{name}:{use}',
                                                      _BARRIER_TIMEOUT_MS)

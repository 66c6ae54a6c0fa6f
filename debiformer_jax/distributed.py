"""Multi-host start-up and preemption handling.

Two things live here:

* :func:`initialize_distributed` brings up ``jax.distributed`` when there is
  something to join: explicit arguments, the ``DEBIFORMER_*`` environment
  variables, a Cloud TPU VM (single host or pod slice) or a multi-task SLURM
  step. On a plain single host it does nothing.
  :func:`detect_cluster` is the pure decision behind it.
* :class:`PreemptionWatcher` turns SIGTERM (and SIGUSR1) into a decision that
  every process takes at the same step, so the training loop can save one
  consistent checkpoint and exit cleanly.

The training loop uses them like this::

    from debiformer_jax import distributed

    distributed.define_flags()          # at import time, next to the config flag

    def main(argv):
      distributed.initialize_from_flags(FLAGS)   # before any other JAX call
      ...
      with distributed.PreemptionWatcher() as watcher:
        for step in range(start_step, total_steps):
          state, metrics = train_step(state, batch)
          if watcher.should_stop(step + 1):   # every process, every step
            ckpt.save(step + 1, state, force=True)
            ckpt.wait_until_finished()
            break
"""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional

from absl import flags
from absl import logging
import jax
import numpy as np

ClusterKind = Literal["tpu", "slurm", "explicit"]

# Environment variables of the explicit form (the same three as the flags).
ENV_COORDINATOR = "DEBIFORMER_COORDINATOR"
ENV_NUM_PROCESSES = "DEBIFORMER_NUM_PROCESSES"
ENV_PROCESS_ID = "DEBIFORMER_PROCESS_ID"
# Comma-separated local device ids (e.g. "0,1,2,3"); rarely needed.
ENV_LOCAL_DEVICE_IDS = "DEBIFORMER_LOCAL_DEVICE_IDS"
# "0" / "off" / "false" / "no" switches the automatic TPU / SLURM detection off
# (explicit arguments and DEBIFORMER_COORDINATOR still apply).
ENV_DISABLE = "DEBIFORMER_DISTRIBUTED"

_EXPLICIT_ENV = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
_FALSY = frozenset({"0", "off", "false", "no", "none", "disable", "disabled"})

# Environment variables that only exist on a TPU VM that is part of a slice
# managed by GKE / queued resources / multislice. A plain `gcloud compute tpus
# tpu-vm create` VM keeps the same facts in its metadata server instead, which
# `tpu_vm=True` stands for (see `_on_cloud_tpu_vm`).
_TPU_ENV_HINTS = (
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)
# What JAX's own SlurmCluster needs to be present (jax/_src/clusters/slurm_cluster.py).
_SLURM_STEP_ENV = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")


# --------------------------------------------------------------------------- #
# Detection
# --------------------------------------------------------------------------- #


def _int_or_none(value: Optional[str]) -> Optional[int]:
  try:
    return int(str(value).strip())
  except (TypeError, ValueError):
    return None


def detect_cluster(env: Mapping[str, str], *, tpu_vm: bool = False) -> Optional[ClusterKind]:
  """Decides how this process should join a multi-process job.

  Pure function of `env` (an environment mapping such as `os.environ`) and
  `tpu_vm` (whether this machine is a Cloud TPU VM; probing that needs the
  file system, so the caller does it).

  Returns:
    'explicit' if any of DEBIFORMER_COORDINATOR / DEBIFORMER_NUM_PROCESSES /
      DEBIFORMER_PROCESS_ID is set (validation of the trio happens later);
    'tpu' on a Cloud TPU VM (or a TPU slice described by TPU_WORKER_HOSTNAMES
      & co.), where `jax.distributed.initialize()` finds everything itself;
    'slurm' inside a SLURM job with more than one task (SLURM_JOB_ID set and
      SLURM_NTASKS > 1), where JAX's SLURM detection does the work;
    None for a plain single host (nothing to initialise), or when
      DEBIFORMER_DISTRIBUTED=off disables the automatic detection.
  """
  if any(env.get(k) not in (None, "") for k in _EXPLICIT_ENV):
    return "explicit"
  if str(env.get(ENV_DISABLE) or "").strip().lower() in _FALSY:
    return None
  if env.get("TPU_SKIP_MDS_QUERY") is None:
    if tpu_vm or any(env.get(k) for k in _TPU_ENV_HINTS):
      return "tpu"
  if env.get("SLURM_JOB_ID"):
    ntasks = _int_or_none(env.get("SLURM_NTASKS"))
    if ntasks is not None and ntasks > 1:
      return "slurm"
  return None


def _on_cloud_tpu_vm() -> bool:
  """Best-effort probe for a Cloud TPU VM: TPU device files plus libtpu."""
  has_chips = os.path.exists("/dev/accel0") or any(
      name.isdigit() for name in _listdir("/dev/vfio"))
  if not has_chips:
    return False
  return (importlib.util.find_spec("libtpu") is not None
          or bool(os.environ.get("TPU_LIBRARY_PATH")))


def _listdir(path: str) -> list[str]:
  try:
    return os.listdir(path)
  except OSError:
    return []


# --------------------------------------------------------------------------- #
# Initialisation
# --------------------------------------------------------------------------- #


def is_initialized() -> bool:
  """True once `jax.distributed.initialize` has connected this process."""
  fn = getattr(jax.distributed, "is_initialized", None)
  if fn is not None:
    return bool(fn())
  from jax._src import distributed as _dist  # older jax
  return _dist.global_state.client is not None


_barrier_counts: dict[str, int] = {}


def barrier(name: str, timeout_s: float = 1800.0) -> None:
  """Blocks until every process has reached the barrier `name` (no-op with one process).

  It goes through the coordination service, not a device collective, so it tolerates long
  skews between processes: put one after per-process work of uneven length (compiling,
  restoring) and before the first collective, whose own time-out (gloo: 30 s) is short.
  """
  if not is_initialized() or jax.process_count() <= 1:
    return
  from jax._src import distributed as _dist
  count = _barrier_counts.get(name, 0)
  _barrier_counts[name] = count + 1
  _dist.global_state.client.wait_at_barrier(f"debiformer:{name}:{count}",
                                            int(timeout_s * 1000))


def _parse_device_ids(value: Any) -> Optional[list[int]]:
  if value is None or value == "":
    return None
  if isinstance(value, int):
    return [value]
  if isinstance(value, str):
    value = [v for v in value.replace(" ", "").split(",") if v]
  return [int(v) for v in value]


def _platform_is_cpu() -> bool:
  """Whether JAX will run on CPU only, judged without starting a backend."""
  platforms = (getattr(jax.config, "jax_platforms", None)
               or os.environ.get("JAX_PLATFORMS") or "")
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  accelerator_modules = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin",
                         "jax_rocm60_plugin", "jax_rocm7_plugin")
  for name in accelerator_modules:
    try:
      if importlib.util.find_spec(name) is not None:
        return False
    except (ImportError, ValueError):
      pass
  return True


def _enable_cpu_collectives() -> None:
  """Cross-process collectives on the CPU backend need gloo (or MPI)."""
  option = "jax_cpu_collectives_implementation"
  if option not in jax.config.values:  # very old / very new jax: nothing to do
    return
  if jax.config.values[option] in ("gloo", "mpi"):
    return
  jax.config.update(option, "gloo")


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int] | int | str] = None,
                           ) -> None:
  """Calls `jax.distributed.initialize` when this is a multi-process job.

  Must run before anything else touches JAX devices. Order of precedence:

  1. Explicit arguments, filled in field by field from DEBIFORMER_COORDINATOR,
     DEBIFORMER_NUM_PROCESSES and DEBIFORMER_PROCESS_ID. The three must end up
     all set (ValueError naming the missing ones otherwise).
  2. Cloud TPU VM (single host or pod slice): `jax.distributed.initialize()`
     with no arguments; JAX reads the worker list from the metadata server.
  3. SLURM with SLURM_NTASKS > 1: `jax.distributed.initialize()` with no
     arguments; JAX picks the coordinator from SLURM_STEP_NODELIST and, with
     one task per GPU, the GPU from SLURM_LOCALID.
  4. Otherwise (single plain host): nothing happens.

  Calling it again once initialised is a no-op.

  Args:
    coordinator_address: "host:port" of process 0's coordination service.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).
    local_device_ids: devices this process should use (GPU only; default all,
      or DEBIFORMER_LOCAL_DEVICE_IDS="0,1").
  """
  if is_initialized():
    logging.info("jax.distributed is already initialised; nothing to do.")
    return

  env = os.environ
  if coordinator_address in ("",):
    coordinator_address = None
  explicit = {
      "coordinator_address": coordinator_address
      if coordinator_address is not None else (env.get(ENV_COORDINATOR) or None),
      "num_processes": num_processes
      if num_processes is not None else _env_int(env, ENV_NUM_PROCESSES),
      "process_id": process_id
      if process_id is not None else _env_int(env, ENV_PROCESS_ID),
  }
  device_ids = _parse_device_ids(
      local_device_ids if local_device_ids is not None
      else env.get(ENV_LOCAL_DEVICE_IDS))

  given = [k for k, v in explicit.items() if v is not None]
  if given:
    missing = [k for k, v in explicit.items() if v is None]
    if missing:
      env_names = {"coordinator_address": ENV_COORDINATOR,
                   "num_processes": ENV_NUM_PROCESSES,
                   "process_id": ENV_PROCESS_ID}
      raise ValueError(
          "Explicit distributed initialisation needs coordinator_address, "
          "num_processes and process_id together; missing: "
          + ", ".join(f"{m} (flag --{m} or env {env_names[m]})" for m in missing)
          + f"; given: {', '.join(given)}.")
    n, pid = int(explicit["num_processes"]), int(explicit["process_id"])
    if n < 1 or not 0 <= pid < n:
      raise ValueError(
          f"Need 0 <= process_id < num_processes; got process_id={pid}, "
          f"num_processes={n}.")
    if ":" not in str(explicit["coordinator_address"]):
      raise ValueError("coordinator_address must look like host:port; got "
                       f"{explicit['coordinator_address']!r}.")
    kind: Optional[str] = "explicit"
    kwargs: dict[str, Any] = dict(
        coordinator_address=str(explicit["coordinator_address"]),
        num_processes=n, process_id=pid)
  else:
    kind = detect_cluster(env, tpu_vm=_on_cloud_tpu_vm())
    kwargs = {}
    if kind == "explicit":  # unreachable: the env trio was folded in above
      raise AssertionError(kind)
    if kind == "slurm":
      absent = [k for k in _SLURM_STEP_ENV if k not in env]
      if absent:
        raise RuntimeError(
            f"SLURM job with SLURM_NTASKS={env.get('SLURM_NTASKS')} but "
            f"{', '.join(absent)} unset: this process was not started by "
            "`srun`. Launch one task per GPU with `srun python -m "
            "debiformer_jax.main ...`, or set DEBIFORMER_DISTRIBUTED=off to "
            "run a single process.")

  if kind is None:
    logging.info("No multi-process environment detected; running single-process.")
    return
  if device_ids is not None:
    kwargs["local_device_ids"] = device_ids

  if _platform_is_cpu():
    _enable_cpu_collectives()
  logging.info("Initialising jax.distributed (%s): %s", kind, kwargs or "auto-detect")
  jax.distributed.initialize(**kwargs)
  # Read from the distributed state rather than jax.process_index(), which
  # would start the backends here already.
  from jax._src import distributed as _dist
  logging.info("jax.distributed ready: process %s of %s (coordinator %s).",
               _dist.global_state.process_id, _dist.global_state.num_processes,
               _dist.global_state.coordinator_address)


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
  value = env.get(name)
  if value is None or value == "":
    return None
  parsed = _int_or_none(value)
  if parsed is None:
    raise ValueError(f"{name} must be an integer; got {value!r}.")
  return parsed


# --------------------------------------------------------------------------- #
# Flags
# --------------------------------------------------------------------------- #


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --coordinator_address, --num_processes, --process_id, --local_device_ids.

  Safe to call more than once (already-defined flags are left alone).
  """
  def have(name: str) -> bool:
    return name in flag_values

  if not have("coordinator_address"):
    flags.DEFINE_string(
        "coordinator_address", None,
        "host:port of process 0 for jax.distributed (explicit multi-process "
        f"start; also env {ENV_COORDINATOR}). Not needed on Cloud TPU or SLURM.",
        flag_values=flag_values)
  if not have("num_processes"):
    flags.DEFINE_integer(
        "num_processes", None,
        f"Total number of processes (explicit start; also env {ENV_NUM_PROCESSES}).",
        lower_bound=1, flag_values=flag_values)
  if not have("process_id"):
    flags.DEFINE_integer(
        "process_id", None,
        f"Index of this process (explicit start; also env {ENV_PROCESS_ID}).",
        lower_bound=0, flag_values=flag_values)
  if not have("local_device_ids"):
    flags.DEFINE_list(
        "local_device_ids", None,
        "Comma-separated local device ids this process uses (GPU; default all).",
        flag_values=flag_values)


def initialize_from_flags(flag_values: Any = flags.FLAGS) -> None:
  """`initialize_distributed` with the values of the flags from `define_flags`."""
  def get(name: str) -> Any:
    try:
      return getattr(flag_values, name)
    except AttributeError:  # flag not defined; unparsed flags still raise
      return None

  initialize_distributed(
      coordinator_address=get("coordinator_address"),
      num_processes=get("num_processes"),
      process_id=get("process_id"),
      local_device_ids=get("local_device_ids"),
  )


# --------------------------------------------------------------------------- #
# Preemption
# --------------------------------------------------------------------------- #

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
WatcherMode = Literal["auto", "local", "sync_point", "allreduce"]


def _preemption_sync_available() -> bool:
  if not is_initialized():
    return False
  from jax._src import distributed as _dist
  return getattr(_dist.global_state, "preemption_sync_manager", None) is not None


def _distributed_process_count() -> int:
  """Process count without starting a backend when not distributed."""
  if not is_initialized():
    return 1
  return jax.process_count()


class PreemptionWatcher:
  """Turns a preemption signal into a stop decision shared by all processes.

  Strategies (`mode`):

  * 'local' (single process): a Python handler for `signals` sets a flag;
    `should_stop(step)` returns it.
  * 'sync_point' (multi-process, JAX preemption service on; the default
    there): JAX's C++ notifier owns SIGTERM and the coordination service
    picks a step all processes reach (`multihost_utils.
    reached_preemption_sync_point`). SIGTERM is left alone (a Python handler
    would disable JAX's notifier); the other `signals` (SIGUSR1) are forwarded
    to it as SIGTERM. Needs `should_stop` on every process at every step.
  * 'allreduce' (multi-process fallback): Python handlers set a local flag and
    every `check_every` steps all processes gather the flags
    (`multihost_utils.process_allgather`); any raised flag stops everyone at
    that step. `should_stop` must be called by all processes with the same
    steps.
  * 'auto': 'local' for one process, 'sync_point' when available, else
    'allreduce'.

  Once `should_stop` has returned True it keeps returning True. `close()`
  (or leaving the `with` block) restores the previous signal handlers.
  Construct it after `initialize_distributed` and from the main thread.
  """

  def __init__(self,
               signals: Sequence[int] = DEFAULT_SIGNALS,
               mode: WatcherMode = "auto",
               check_every: int = 1):
    if check_every < 1:
      raise ValueError(f"check_every must be >= 1; got {check_every}.")
    if mode not in ("auto", "local", "sync_point", "allreduce"):
      raise ValueError(f"Unknown PreemptionWatcher mode {mode!r}.")
    if mode == "auto":
      if _distributed_process_count() <= 1:
        mode = "local"
      elif _preemption_sync_available():
        mode = "sync_point"
      else:
        mode = "allreduce"
    elif mode == "sync_point" and not _preemption_sync_available():
      raise RuntimeError(
          "mode='sync_point' needs jax.distributed initialised with the "
          "preemption service (jax_enable_preemption_service=True).")
    self.mode: str = mode
    self.check_every = int(check_every)
    self._event = threading.Event()
    self._stop = False
    self._signal_received: Optional[int] = None
    self._previous: dict[int, Any] = {}
    self._closed = False

    for signum in dict.fromkeys(int(s) for s in signals):
      if self.mode == "sync_point" and signum == signal.SIGTERM:
        continue  # owned by JAX's preemption notifier
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError as e:  # not the main thread
        logging.warning("PreemptionWatcher could not install a handler for %s: %s",
                        signal.Signals(signum).name, e)
    logging.info("PreemptionWatcher active (mode=%s, signals=%s).", self.mode,
                 [signal.Signals(s).name for s in signals])

  # -- signal side ---------------------------------------------------------

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    first = not self._event.is_set()
    self._signal_received = signum
    self._event.set()
    if self.mode == "sync_point" and signum != signal.SIGTERM:
      # Hand the notice to JAX's notifier, which listens to SIGTERM only.
      os.kill(os.getpid(), signal.SIGTERM)
    if first:
      # logging in a signal handler is best-effort but fine in CPython.
      logging.warning("Received %s: will stop at the next agreed step.",
                      signal.Signals(signum).name)

  @property
  def received(self) -> bool:
    """Whether *this* process caught one of the watched signals.

    In 'sync_point' mode a SIGTERM goes to JAX's notifier and is not seen here.
    """
    return self._event.is_set()

  @property
  def signal_received(self) -> Optional[int]:
    return self._signal_received

  def request_stop(self) -> None:
    """Marks this process as preempted, as if it had caught a signal."""
    if self.mode == "sync_point":
      os.kill(os.getpid(), signal.SIGTERM)
    self._signal_received = self._signal_received or int(signal.SIGTERM)
    self._event.set()

  # -- decision ------------------------------------------------------------

  def should_stop(self, step: int) -> bool:
    """True at the step where every process should checkpoint and exit.

    Call it on every process, with the same `step`, at every training step.
    """
    if self._stop:
      return True
    if self.mode == "local":
      self._stop = self._event.is_set()
    elif self.mode == "sync_point":
      from jax.experimental import multihost_utils
      self._stop = bool(multihost_utils.reached_preemption_sync_point(int(step)))
    else:  # allreduce
      if int(step) % self.check_every == 0:
        from jax.experimental import multihost_utils
        flags_all = multihost_utils.process_allgather(
            np.asarray(self._event.is_set(), dtype=np.int32))
        self._stop = bool(np.any(np.asarray(flags_all)))
    if self._stop:
      logging.warning("Preemption: stopping at step %d (mode=%s, this process "
                      "signalled=%s).", step, self.mode, self.received)
    return self._stop

  # -- lifetime ------------------------------------------------------------

  def close(self) -> None:
    """Restores the signal handlers that were there before."""
    if self._closed:
      return
    self._closed = True
    for signum, previous in self._previous.items():
      try:
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
      except (ValueError, TypeError) as e:
        logging.warning("Could not restore handler for %s: %s",
                        signal.Signals(signum).name, e)
    self._previous.clear()

  def __enter__(self) -> "PreemptionWatcher":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

"""Tests for debiformer_jax.distributed.

The pure parts (cluster detection, argument validation, flags, the
single-process PreemptionWatcher) run in this process with
`jax.distributed.initialize` replaced by a recorder, so this pytest process
never joins a distributed job. The real thing runs in two child processes
(tests/_distributed_worker.py) on 127.0.0.1 with 2 CPU devices each.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from absl import flags
import jax
import pytest

from debiformer_jax import distributed
from tests import _train_testlib as lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_distributed_worker.py")

_CLUSTER_ENV = (
    "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST", "SLURM_PROCID",
    "SLURM_LOCALID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
    "MEGASCALE_COORDINATOR_ADDRESS", "TPU_SKIP_MDS_QUERY",
    "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_BIND_ADDRESS",
    "JAX_LOCAL_DEVICE_IDS", distributed.ENV_COORDINATOR,
    distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID,
    distributed.ENV_LOCAL_DEVICE_IDS, distributed.ENV_DISABLE,
)


# --------------------------------------------------------------------------- #
# detect_cluster
# --------------------------------------------------------------------------- #

SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8",
              "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_PROCID": "3",
              "SLURM_LOCALID": "3"}


@pytest.mark.parametrize("env, tpu_vm, expected", [
    ({}, False, None),
    ({"HOME": "/root", "PATH": "/usr/bin"}, False, None),
    ({}, True, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t1-w-0,t1-w-1"}, False, "tpu"),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, False, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, False, "tpu"),
    ({"TPU_SKIP_MDS_QUERY": "1"}, True, None),
    (SLURM_STEP, False, "slurm"),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}, False, "slurm"),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, False, None),
    ({"SLURM_JOB_ID": "1"}, False, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "garbage"}, False, None),
    ({"SLURM_NTASKS": "4"}, False, None),
    ({"DEBIFORMER_COORDINATOR": "10.0.0.1:1234"}, False, "explicit"),
    ({"DEBIFORMER_PROCESS_ID": "0"}, False, "explicit"),
    ({"DEBIFORMER_COORDINATOR": "h:1", **SLURM_STEP}, True, "explicit"),
    ({"DEBIFORMER_COORDINATOR": ""}, False, None),
    ({"DEBIFORMER_DISTRIBUTED": "off", **SLURM_STEP}, True, None),
    ({"DEBIFORMER_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "a,b"}, False, None),
    ({"DEBIFORMER_DISTRIBUTED": "auto", **SLURM_STEP}, False, "slurm"),
    ({"DEBIFORMER_DISTRIBUTED": "off", "DEBIFORMER_COORDINATOR": "h:1"}, False,
     "explicit"),
])
def test_detect_cluster(env, tpu_vm, expected):
  assert distributed.detect_cluster(env, tpu_vm=tpu_vm) == expected


def test_detect_cluster_tpu_wins_over_slurm():
  assert distributed.detect_cluster(SLURM_STEP, tpu_vm=True) == "tpu"


# --------------------------------------------------------------------------- #
# initialize_distributed (with jax.distributed.initialize recorded, not run)
# --------------------------------------------------------------------------- #


@pytest.fixture
def recorder(monkeypatch):
  """Clean cluster env, no TPU, and a fake jax.distributed.initialize."""
  for name in _CLUSTER_ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
  monkeypatch.setattr(distributed, "is_initialized", lambda: False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  return calls


def test_single_host_does_nothing(recorder):
  distributed.initialize_distributed()
  assert recorder == []


def test_explicit_arguments(recorder):
  distributed.initialize_distributed(
      coordinator_address="10.1.2.3:9999", num_processes=4, process_id=2)
  assert recorder == [dict(coordinator_address="10.1.2.3:9999",
                           num_processes=4, process_id=2)]


def test_explicit_arguments_with_devices(recorder):
  distributed.initialize_distributed("h:1", 2, 1, local_device_ids="0,1")
  assert recorder == [dict(coordinator_address="h:1", num_processes=2,
                           process_id=1, local_device_ids=[0, 1])]


@pytest.mark.parametrize("kwargs, missing", [
    (dict(coordinator_address="h:1"), ["num_processes", "process_id"]),
    (dict(num_processes=2), ["coordinator_address", "process_id"]),
    (dict(process_id=0), ["coordinator_address", "num_processes"]),
    (dict(coordinator_address="h:1", num_processes=2), ["process_id"]),
    (dict(num_processes=2, process_id=1), ["coordinator_address"]),
])
def test_partial_explicit_arguments_raise(recorder, kwargs, missing):
  with pytest.raises(ValueError) as info:
    distributed.initialize_distributed(**kwargs)
  message = str(info.value)
  for name in missing:
    assert name in message
  for name in {"coordinator_address", "num_processes", "process_id"} - set(missing):
    assert f"missing: {name}" not in message and f", {name} (" not in message
  assert recorder == []


@pytest.mark.parametrize("kwargs", [
    dict(coordinator_address="h:1", num_processes=2, process_id=2),
    dict(coordinator_address="h:1", num_processes=2, process_id=-1),
    dict(coordinator_address="h:1", num_processes=0, process_id=0),
    dict(coordinator_address="no-port", num_processes=2, process_id=0),
])
def test_bad_explicit_arguments_raise(recorder, kwargs):
  with pytest.raises(ValueError):
    distributed.initialize_distributed(**kwargs)
  assert recorder == []


def test_explicit_env(recorder, monkeypatch):
  monkeypatch.setenv("DEBIFORMER_COORDINATOR", "10.0.0.5:1234")
  monkeypatch.setenv("DEBIFORMER_NUM_PROCESSES", "3")
  monkeypatch.setenv("DEBIFORMER_PROCESS_ID", "1")
  distributed.initialize_distributed()
  assert recorder == [dict(coordinator_address="10.0.0.5:1234",
                           num_processes=3, process_id=1)]


def test_arguments_override_env_fieldwise(recorder, monkeypatch):
  monkeypatch.setenv("DEBIFORMER_COORDINATOR", "10.0.0.5:1234")
  monkeypatch.setenv("DEBIFORMER_NUM_PROCESSES", "3")
  distributed.initialize_distributed(process_id=2)
  assert recorder == [dict(coordinator_address="10.0.0.5:1234",
                           num_processes=3, process_id=2)]


def test_partial_env_raises(recorder, monkeypatch):
  monkeypatch.setenv("DEBIFORMER_COORDINATOR", "10.0.0.5:1234")
  with pytest.raises(ValueError, match="DEBIFORMER_NUM_PROCESSES"):
    distributed.initialize_distributed()
  monkeypatch.setenv("DEBIFORMER_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="integer"):
    distributed.initialize_distributed()
  assert recorder == []


def test_tpu_vm_auto(recorder, monkeypatch):
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
  distributed.initialize_distributed()
  assert recorder == [{}]


def test_slurm_auto(recorder, monkeypatch):
  for key, value in SLURM_STEP.items():
    monkeypatch.setenv(key, value)
  distributed.initialize_distributed()
  assert recorder == [{}]


def test_slurm_outside_srun_raises(recorder, monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  with pytest.raises(RuntimeError, match="srun"):
    distributed.initialize_distributed()
  monkeypatch.setenv("DEBIFORMER_DISTRIBUTED", "off")
  distributed.initialize_distributed()
  assert recorder == []


def test_already_initialized_is_noop(recorder, monkeypatch):
  monkeypatch.setattr(distributed, "is_initialized", lambda: True)
  distributed.initialize_distributed("h:1", 2, 0)
  assert recorder == []


def test_cpu_collectives_set_to_gloo():
  # The option initialize_distributed sets for multi-process CPU runs.
  option = "jax_cpu_collectives_implementation"
  assert option in jax.config.values
  original = jax.config.values[option]
  try:
    jax.config.update(option, None)
    distributed._enable_cpu_collectives()
    assert jax.config.values[option] == "gloo"
  finally:
    jax.config.update(option, original)


def test_flags_unparsed_is_an_error():
  fv = flags.FlagValues()
  distributed.define_flags(fv)
  with pytest.raises(flags.UnparsedFlagAccessError):
    distributed.initialize_from_flags(fv)


def test_flags(recorder):
  fv = flags.FlagValues()
  distributed.define_flags(fv)
  distributed.define_flags(fv)  # idempotent
  fv(["prog", "--coordinator_address=127.0.0.1:5555", "--num_processes=2",
      "--process_id=1"])
  distributed.initialize_from_flags(fv)
  assert recorder == [dict(coordinator_address="127.0.0.1:5555",
                           num_processes=2, process_id=1)]


def test_flags_default_single_host(recorder):
  fv = flags.FlagValues()
  distributed.define_flags(fv)
  fv(["prog"])
  distributed.initialize_from_flags(fv)
  assert recorder == []


def test_flags_partial_is_usage_error(recorder):
  fv = flags.FlagValues()
  distributed.define_flags(fv)
  fv(["prog", "--process_id=0"])
  with pytest.raises(ValueError, match="coordinator_address"):
    distributed.initialize_from_flags(fv)


# --------------------------------------------------------------------------- #
# PreemptionWatcher, single process
# --------------------------------------------------------------------------- #


def _wait_for(predicate, timeout=5.0):
  deadline = time.monotonic() + timeout
  while not predicate() and time.monotonic() < deadline:
    time.sleep(0.01)
  return predicate()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_watcher_local_signal(signum):
  assert not distributed.is_initialized()
  before = {s: signal.getsignal(s) for s in distributed.DEFAULT_SIGNALS}
  watcher = distributed.PreemptionWatcher()
  try:
    assert watcher.mode == "local"
    assert not watcher.should_stop(0)
    os.kill(os.getpid(), signum)
    assert _wait_for(lambda: watcher.received)
    assert watcher.signal_received == signum
    assert watcher.should_stop(1)
    assert watcher.should_stop(2)  # latched
  finally:
    watcher.close()
  assert {s: signal.getsignal(s) for s in before} == before
  watcher.close()  # idempotent


def test_watcher_restores_custom_handler():
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
  try:
    with distributed.PreemptionWatcher(signals=[signal.SIGTERM]) as watcher:
      os.kill(os.getpid(), signal.SIGTERM)
      assert _wait_for(lambda: watcher.received)
      assert watcher.should_stop(0)
      assert seen == []  # the watcher's handler ran, not the custom one
    os.kill(os.getpid(), signal.SIGTERM)  # back to the custom handler
    assert _wait_for(lambda: seen == [signal.SIGTERM])
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_watcher_request_stop_and_args():
  with distributed.PreemptionWatcher() as watcher:
    assert not watcher.should_stop(5)
    watcher.request_stop()
    assert watcher.should_stop(6)
  with pytest.raises(ValueError):
    distributed.PreemptionWatcher(check_every=0)
  with pytest.raises(ValueError):
    distributed.PreemptionWatcher(mode="bogus")
  with pytest.raises(RuntimeError):
    distributed.PreemptionWatcher(mode="sync_point")  # not distributed here


# --------------------------------------------------------------------------- #
# Two real processes on 127.0.0.1
# --------------------------------------------------------------------------- #


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env(port: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_ENV}
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=2").strip()
  env["JAX_PLATFORMS"] = "cpu"
  # Keep the coordination service on the loopback interface.
  env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _run_pair(first_signal: str = "TERM", timeout: float = 120.0):
  port = _free_port()
  env = _worker_env(port)
  how = {0: "args", 1: "env"}  # one process per explicit form
  procs = [
      subprocess.Popen([sys.executable, WORKER, str(i), str(port), how[i],
                        first_signal],
                       env=env, cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
      for i in range(2)
  ]
  failed = lib.wait_all(procs, timeout)  # Kills what still runs.
  outputs = [p.communicate(timeout=30)[0] for p in procs]
  if failed:
    pytest.fail(failed + "\n" + "\n".join(
        f"--- worker {i} (rc={p.returncode}) ---\n{out[-4000:]}"
        for i, (p, out) in enumerate(zip(procs, outputs))))
  results = []
  for out in outputs:
    lines = [l for l in out.splitlines() if l.startswith("RESULT=")]
    assert lines, out[-4000:]
    results.append(json.loads(lines[-1][len("RESULT="):]))
  return results


@pytest.fixture(scope="module")
def pair_results():
  return _run_pair()


@pytest.fixture(scope="module")
def pair_results_usr1():
  return _run_pair("USR1")


def test_two_process_global_array(pair_results):
  expected_sum = float(sum(range(24)))  # rows 0..7 of arange(24).reshape(8, 3)
  expected_psum = [sum(range(c, 24, 3)) for c in range(3)]
  for pid, r in enumerate(pair_results):
    assert r["process_index"] == pid
    assert r["process_count"] == 2
    assert r["device_count"] == 4
    assert r["local_device_count"] == 2
    assert r["global_shape"] == [8, 3]
    assert r["jit_sum"] == expected_sum
    assert r["psum"] == expected_psum


def test_two_process_preemption_agreement(pair_results):
  r0, r1 = pair_results
  # JAX's preemption sync point: the default with 2 processes.
  assert r0["auto_mode"] == r1["auto_mode"] == "sync_point"
  assert r0["sync_stop"] is not None
  assert r0["sync_stop"] == r1["sync_stop"]
  assert r0["sync_stop"] > 3  # signal went to process 1 at step 3
  assert r0["usr1_restored"] and r1["usr1_restored"]
  # All-reduce of local flags: only process 1 was signalled, both stop.
  assert r0["allreduce_stop"] == r1["allreduce_stop"] == 5
  assert (r0["allreduce_received"], r1["allreduce_received"]) == (False, True)
  assert r0["allreduce4_stop"] == r1["allreduce4_stop"] == 8
  assert r0["sigterm_restored"] and r1["sigterm_restored"]
  # In sync-point mode SIGTERM belongs to JAX's notifier, not to the watcher.
  assert (r0["sync_received"], r1["sync_received"]) == (False, False)


def test_two_process_sigusr1_is_forwarded_to_sync_point(pair_results_usr1):
  r0, r1 = pair_results_usr1
  assert r0["auto_mode"] == r1["auto_mode"] == "sync_point"
  assert r0["sync_stop"] is not None and r0["sync_stop"] == r1["sync_stop"] > 3
  assert (r0["sync_received"], r1["sync_received"]) == (False, True)

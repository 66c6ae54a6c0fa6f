"""Tests for debiformer_jax.distributed (and the watcher across processes).

The argument handling runs in this process with `jax.distributed.initialize` replaced by a
recorder, so pytest never joins a job. The real thing runs in child processes: one alone on a
bare host, and two (tests/_distributed_worker.py) on 127.0.0.1 with 2 CPU devices each.
"""

import json
import logging
import os
import socket
import subprocess
import sys

import jax
import pytest

from debiformer_jax import distributed
from tests import _distributed_worker as worker
from tests import _train_testlib as lib

WORKER = os.path.join(lib.REPO, 'tests', '_distributed_worker.py')
# What JAX's cluster detection looks at; the children must not find a cluster here.
CLUSTER_ENV = (
    'SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID',
    'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES', 'MEGASCALE_COORDINATOR_ADDRESS',
    'OMPI_MCA_orte_hnp_uri', 'KUBERNETES_SERVICE_HOST', 'JAX_COORDINATOR_ADDRESS',
    'JAX_COORDINATOR_BIND_ADDRESS', 'JAX_LOCAL_DEVICE_IDS')
FLAG_NAMES = ('--coordinator_address', '--num_processes', '--process_id')


class _Recorder:
  """Stands in for jax.distributed.initialize: records its calls, raises `error` if set."""

  def __init__(self):
    self.calls = []
    self.error = None

  def __call__(self, *args, **kwargs):
    self.calls.append((args, kwargs))
    if self.error is not None:
      raise self.error


@pytest.fixture
def recorder(monkeypatch):
  fake = _Recorder()
  monkeypatch.setattr(jax.distributed, 'initialize', fake)
  return fake


def test_nothing_given_lets_jax_detect_the_job(recorder):
  distributed.initialize()
  assert recorder.calls == [((), {})]


def test_nothing_given_and_nothing_detected_runs_alone(recorder, caplog):
  recorder.error = ValueError('coordinator_address should be defined.')
  with caplog.at_level(logging.INFO, logger='absl'):
    distributed.initialize()
  assert recorder.calls == [((), {})]
  assert [r.getMessage() for r in caplog.records if 'one process' in r.getMessage()] == [
      'No multi-process job found (Cloud TPU, SLURM, ...): running as one process.']


def test_half_detected_job_is_an_error(recorder):
  # E.g. JAX_COORDINATOR_ADDRESS set on a host that is in no cluster.
  recorder.error = ValueError('Number of processes must be defined.')
  with pytest.raises(ValueError, match='Number of processes'):
    distributed.initialize()


@pytest.mark.parametrize('address', ['10.1.2.3:9999', 'host0.example.com:1234', '[::1]:1234'])
def test_all_given_are_passed_through(recorder, address):
  distributed.initialize(address, 4, 2)
  assert recorder.calls == [((), dict(coordinator_address=address, num_processes=4,
                                      process_id=2))]


@pytest.mark.parametrize('given', [
    dict(coordinator_address='h:1'),
    dict(num_processes=2),
    dict(process_id=0),
    dict(coordinator_address='h:1', num_processes=2),
    dict(coordinator_address='h:1', process_id=1),
    dict(num_processes=2, process_id=1),
])
def test_some_given_names_the_missing_flags(recorder, given):
  with pytest.raises(ValueError) as info:
    distributed.initialize(**given)
  message = str(info.value)
  missing = [f for f in FLAG_NAMES if f[2:] not in given]
  assert message.startswith(f'missing {", ".join(missing)}:'), message
  assert all(f in message for f in FLAG_NAMES), message  # How to pass them: all three.
  assert recorder.calls == []


@pytest.mark.parametrize('address, num_processes, process_id, match', [
    ('h:1', 2, 2, r'0 <= --process_id < --num_processes; got --process_id=2, --num_processes=2'),
    ('h:1', 2, -1, r'got --process_id=-1'),
    ('h:1', 0, 0, r'--num_processes=0'),
    ('no-port', 2, 0, r"--coordinator_address must be host:port; got 'no-port'"),
    (':1234', 2, 0, r'host:port'),
    ('h:port', 2, 0, r'host:port'),
    ('', 2, 0, r'host:port'),
])
def test_bad_values_are_refused(recorder, address, num_processes, process_id, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(address, num_processes, process_id)
  assert recorder.calls == []


def test_barrier_alone_returns_at_once():
  assert not jax.distributed.is_initialized()
  distributed.barrier('alone')  # Would need a coordination client otherwise.


def _child_env(**extra) -> dict:
  env = lib.subprocess_env(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  for name in CLUSTER_ENV:
    env.pop(name, None)
  env.update(extra)
  return env


def test_bare_host_runs_as_one_process():
  # Real JAX: its words for "no cluster here" must still be the ones initialize expects.
  code = ('from absl import logging; logging.set_verbosity(logging.INFO); '
          'from debiformer_jax import distributed; distributed.initialize(); import jax; '
          'print("RESULT", jax.distributed.is_initialized(), jax.process_count())')
  out = subprocess.run([sys.executable, '-c', code], cwd=lib.REPO, env=_child_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-4000:]
  assert 'RESULT False 1' in out.stdout, out.stdout + out.stderr[-4000:]
  assert 'running as one process' in out.stderr


def test_main_refuses_some_flags():
  out = subprocess.run([sys.executable, '-m', 'debiformer_jax.main', '--config=configs/demo.py',
                        '--process_id=0'], cwd=lib.REPO, env=_child_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert 'missing --coordinator_address, --num_processes:' in out.stderr, out.stderr[-4000:]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_pair(signal_name: str, timeout: float = 120.0) -> list[dict]:
  """Both processes of tests/_distributed_worker.py; their results, by process id."""
  port = _free_port()
  env = _child_env(XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                              ' --xla_force_host_platform_device_count=2').strip(),
                   # Keeps the coordination service on the loopback interface.
                   JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}')
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), signal_name], env=env,
                            cwd=lib.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
           for i in range(2)]
  failed = lib.wait_all(procs, timeout)  # Kills what still runs.
  outputs = [p.communicate(timeout=30)[0] for p in procs]
  if failed:
    pytest.fail(failed + '\n' + '\n'.join(
        f'--- worker {i} (rc={p.returncode}) ---\n{out[-4000:]}'
        for i, (p, out) in enumerate(zip(procs, outputs))))
  results = []
  for out in outputs:
    lines = [line for line in out.splitlines() if line.startswith('RESULT=')]
    assert lines, out[-4000:]
    results.append(json.loads(lines[-1][len('RESULT='):]))
  return results


@pytest.fixture(scope='module')
def sigterm_pair():
  return _run_pair('TERM')


@pytest.fixture(scope='module')
def sigusr1_pair():
  return _run_pair('USR1')


def test_two_process_global_array(sigterm_pair):
  expected_sum = float(sum(range(24)))  # Rows 0..7 of arange(24).reshape(8, 3).
  expected_psum = [sum(range(c, 24, 3)) for c in range(3)]
  for pid, r in enumerate(sigterm_pair):
    assert r['process_index'] == pid
    assert r['process_count'] == 2
    assert r['device_count'] == 4
    assert r['local_device_count'] == 2
    assert r['global_shape'] == [8, 3]
    assert r['jit_sum'] == expected_sum
    assert r['psum'] == expected_psum


def test_two_process_barrier_waits_for_the_late_process(sigterm_pair):
  early, late = sigterm_pair
  assert early['barrier_wait_s'] > 0.5 * worker.BARRIER_SKEW_S
  assert late['barrier_wait_s'] < early['barrier_wait_s']


@pytest.mark.parametrize('pair', ['sigterm_pair', 'sigusr1_pair'])
def test_two_process_preemption_agreement(pair, request):
  # Process 1 alone got the signal (SIGUSR1 forwarded to JAX's notifier as SIGTERM); both
  # processes stop at the same later step and stay stopped.
  r0, r1 = request.getfixturevalue(pair)
  assert r0['stop_step'] is not None and r0['stop_step'] == r1['stop_step']
  assert r0['stop_step'] > worker.SIGNAL_AT_STEP
  assert r0['still_stopped'] and r1['still_stopped']
  assert r0['usr1_restored'] and r1['usr1_restored']

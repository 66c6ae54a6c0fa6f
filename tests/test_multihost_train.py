"""Training in two processes (a CPU stand-in for two hosts), through the command line.

Two `python -m debiformer_jax.main`-equivalent processes (tests/_multihost_worker.py: main.py
with a hook that reports the final state) join one jax.distributed job on 127.0.0.1 through
--coordinator_address/--num_processes/--process_id, each with 2 CPU devices (gloo collectives),
and train the demo model on a generated ImageFolder: 24 train images, batch 8 split over the 4
devices (3 steps per epoch), 9 validation images (an uneven last eval batch).

* run A: 2 epochs straight, eval and checkpoint every epoch. Both processes end with
  bit-identical state (each checks its two local copies, then hashes one); each eval counts
  each of the 9 validation images exactly once; only process 0 writes TensorBoard events.
* run B: a new workdir holding only run A's epoch-1 checkpoint (as if the job had stopped
  there), relaunched in two processes: it starts at step 4, and ends with run A's state and
  losses, bit for bit.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from debiformer_jax import checkpointing
from tests import _train_testlib as lib

lib.use_compilation_cache()

WORKER = os.path.join(lib.REPO, 'tests', '_multihost_worker.py')
NUM_TRAIN, NUM_EVAL, BATCH = 24, 9, 8
STEPS_PER_EPOCH = NUM_TRAIN // BATCH
TIMEOUT = 480.0  # Per run; two processes share 2 cores (a run passed 240 s on a busy machine).

# Cluster detection must not pick up anything from the machine the tests run on.
_CLUSTER_ENV = (
    'SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID',
    'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES', 'MEGASCALE_COORDINATOR_ADDRESS',
    'OMPI_MCA_orte_hnp_uri', 'KUBERNETES_SERVICE_HOST', 'JAX_COORDINATOR_ADDRESS',
    'JAX_COORDINATOR_BIND_ADDRESS', 'JAX_LOCAL_DEVICE_IDS')


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(port: int) -> dict:
  env = lib.subprocess_env()
  for name in _CLUSTER_ENV:
    env.pop(name, None)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=2').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_COORDINATOR_BIND_ADDRESS'] = f'127.0.0.1:{port}'  # Loopback only.
  env['PYTHONUNBUFFERED'] = '1'
  return env


def _run_two_processes(workdir: str, folder: str, out_dir: str) -> list[dict]:
  """Both processes of one training run; their result files, by process index."""
  port = _free_port()
  env = _env(port)
  flags = ['--config=configs/demo.py', f'--workdir={workdir}', '--config.data.prepare=',
           f'--config.data.folder={folder}', f'--config.global_batch_size={BATCH}',
           '--config.data.num_parallel_calls=2', '--config.data.shuffle_buffer=64',
           '--config.num_epochs=2', '--config.eval_every_epochs=1',
           '--config.checkpoint_every_epochs=1', '--config.log_every_steps=1',
           '--config.keep_checkpoints=5', '--config.optimizer.warmup_epochs=1',
           f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
  results = [os.path.join(out_dir, f'result_{i}.json') for i in range(2)]
  logs = [open(os.path.join(out_dir, f'log_{i}.txt'), 'w') for i in range(2)]
  procs = [subprocess.Popen([sys.executable, WORKER, results[i]] + flags + [f'--process_id={i}'],
                            env=env, cwd=lib.REPO, stdout=logs[i], stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    failed = lib.wait_all(procs, TIMEOUT)  # Kills what still runs.
  finally:
    for p in procs:
      p.wait(timeout=30)
    for f in logs:
      f.close()
  if failed is None and not all(os.path.exists(r) for r in results):
    failed = 'a process wrote no result'
  if failed:
    outputs = []
    for i, p in enumerate(procs):
      with open(os.path.join(out_dir, f'log_{i}.txt')) as f:
        outputs.append(f'--- process {i} (rc={p.returncode}) ---\n{f.read()[-4000:]}')
    pytest.fail(failed + '\n' + '\n'.join(outputs))
  loaded = []
  for r in results:
    with open(r) as f:
      loaded.append(json.load(f))
  return loaded


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  folder = lib.write_jpeg_folder(str(tmp_path_factory.mktemp('images')), train_per_class=8,
                                 val_per_class=3)
  dir_a, dir_b = (str(tmp_path_factory.mktemp(n)) for n in ('run_a', 'run_b'))
  run_a = _run_two_processes(dir_a, folder, str(tmp_path_factory.mktemp('out_a')))

  # Run B: the workdir run A had after its first epoch (its epoch-1 checkpoint only).
  ckpt_a, ckpt_b = checkpointing.checkpoint_dir(dir_a), checkpointing.checkpoint_dir(dir_b)
  os.makedirs(ckpt_b)
  shutil.copytree(os.path.join(ckpt_a, str(STEPS_PER_EPOCH)),
                  os.path.join(ckpt_b, str(STEPS_PER_EPOCH)))
  run_b = _run_two_processes(dir_b, folder, str(tmp_path_factory.mktemp('out_b')))
  return dict(a=run_a, b=run_b, dir_a=dir_a, dir_b=dir_b)


def test_two_processes_train_in_lockstep(runs):
  a0, a1 = runs['a']
  assert [a0['process_index'], a1['process_index']] == [0, 1]
  assert a0['process_count'] == a1['process_count'] == 2
  assert a0['device_count'] == 4 and a0['local_device_count'] == 2
  assert a0['first_step'] == 1 and a0['final_step'] == a1['final_step'] == 2 * STEPS_PER_EPOCH
  assert a0['state_sha256'] == a1['state_sha256']
  assert a0['train_loss'] == a1['train_loss']
  assert sorted(map(int, a0['train_loss'])) == list(range(1, 2 * STEPS_PER_EPOCH + 1))


def test_eval_counts_every_example_once(runs):
  a0, a1 = runs['a']
  assert sorted(map(int, a0['eval'])) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  for metrics in list(a0['eval'].values()) + list(a1['eval'].values()):
    assert metrics['eval/num_examples'] == NUM_EVAL
  assert a0['eval'] == a1['eval']
  scalars = lib.read_scalars(runs['dir_a'])  # Written by process 0 only: one value per step.
  assert scalars['eval/num_examples'] == {STEPS_PER_EPOCH: NUM_EVAL,
                                          2 * STEPS_PER_EPOCH: NUM_EVAL}
  assert sorted(scalars['train/loss']) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
  events = [n for n in os.listdir(runs['dir_a']) if n.startswith('events.out.tfevents')]
  assert len(events) == 1, events
  steps = checkpointing.make_manager(checkpointing.checkpoint_dir(runs['dir_a']),
                                     read_only=True).all_steps()
  assert sorted(steps) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_resume_in_two_processes_continues_the_run(runs):
  a0 = runs['a'][0]
  b0, b1 = runs['b']
  assert b0['first_step'] == b1['first_step'] == STEPS_PER_EPOCH + 1
  assert b0['final_step'] == b1['final_step'] == 2 * STEPS_PER_EPOCH
  assert b0['state_sha256'] == b1['state_sha256'] == a0['state_sha256']
  for step, loss in b0['train_loss'].items():
    assert loss == a0['train_loss'][step], step
  assert b0['eval'] == {str(2 * STEPS_PER_EPOCH): a0['eval'][str(2 * STEPS_PER_EPOCH)]}

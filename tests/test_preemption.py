"""Preemption in one process: the watcher itself, then SIGTERM in the middle of training.

A run of the demo model on a generated ImageFolder, with periodic eval and checkpoints far
apart, gets SIGTERM once it has logged a few steps. It must save a checkpoint of the step it
reached, say so, and exit with status 0. Relaunched with the same workdir, it resumes from that
step and finishes: TensorBoard then holds a train loss for every step exactly once.
(Two processes: tests/test_distributed.py.)
"""

import contextlib
import os
import re
import signal
import sys
import time

import pytest

from debiformer_jax import checkpointing, preemption
from tests import _train_testlib as lib

lib.use_compilation_cache()

TOTAL_STEPS = 40
TIMEOUT = 180.0


@contextlib.contextmanager
def _recording_handlers():
  """SIGTERM and SIGUSR1 handlers that record what reaches them; the old ones back afterwards."""
  seen = []
  previous = {s: signal.signal(s, lambda signum, frame: seen.append(signum))
              for s in (signal.SIGTERM, signal.SIGUSR1)}
  try:
    yield seen
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGUSR1])
def test_watcher_stops_after_a_signal_and_stays_stopped(signum):
  with _recording_handlers() as seen:
    with preemption.PreemptionWatcher() as watcher:
      assert not watcher.should_stop(1)
      os.kill(os.getpid(), signum)  # Its Python handler runs before the next line.
      assert watcher.should_stop(2)
      assert watcher.should_stop(3)
    assert seen == []  # The watcher's handler took it, not the one before.


def test_watcher_restores_the_previous_handlers():
  with _recording_handlers() as seen:
    with pytest.raises(RuntimeError):
      with preemption.PreemptionWatcher():
        raise RuntimeError('the loop failed')
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert seen == [signal.SIGTERM, signal.SIGUSR1]


def _command(workdir: str, folder: str) -> list[str]:
  return [sys.executable, '-m', 'debiformer_jax.main', '--config=configs/demo.py',
          f'--workdir={workdir}', '--config.data.prepare=', f'--config.data.folder={folder}',
          '--config.global_batch_size=8', '--config.data.num_parallel_calls=2',
          '--config.data.shuffle_buffer=64', f'--config.num_train_steps={TOTAL_STEPS}',
          '--config.log_every_steps=1',
          # Periodic eval and checkpoints only at the end: a checkpoint mid-run is the one
          # the preemption wrote.
          '--config.eval_every_epochs=1000', '--config.checkpoint_every_epochs=1000']


def _wait(proc, log_path: str, until=None, timeout: float = TIMEOUT) -> str:
  """Polls the log until `until(log)` holds (or, without `until`, until `proc` exits)."""
  deadline = time.monotonic() + timeout
  while True:
    with open(log_path) as f:
      log = f.read()
    if until is not None and until(log):
      return log
    if proc.poll() is not None:
      return log
    if time.monotonic() > deadline:
      proc.kill()
      proc.wait(timeout=30)
      pytest.fail(f'timed out after {timeout:.0f}s\n{log[-4000:]}')
    time.sleep(0.05)


def _launched(workdir: str, folder: str, log_path: str):
  """The job as a child process writing to `log_path`; killed if still running at the end."""
  return lib.launched(_command(workdir, folder), log_path)


def test_sigterm_saves_the_current_step_and_the_relaunch_resumes(tmp_path):
  folder = lib.write_jpeg_folder(str(tmp_path / 'images'), train_per_class=8, val_per_class=3)
  workdir = str(tmp_path / 'workdir')
  first_log, second_log = str(tmp_path / 'first.log'), str(tmp_path / 'second.log')

  with _launched(workdir, folder, first_log) as proc:
    log = _wait(proc, first_log, until=lambda log: re.search(rf'\(2/{TOTAL_STEPS}\)', log))
    assert proc.poll() is None, f'exited early (rc={proc.returncode})\n{log[-4000:]}'
    proc.send_signal(signal.SIGTERM)
    log = _wait(proc, first_log)
    proc.wait(timeout=30)
  assert proc.returncode == 0, log[-4000:]
  saved = re.search(r'Preempted: saved a checkpoint of step (\d+)/(\d+) in (\S+);', log)
  assert saved, log[-4000:]
  stopped_at = int(saved.group(1))
  assert 2 <= stopped_at < TOTAL_STEPS, log[-4000:]
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  assert saved.group(3) == ckpt_dir
  manager = checkpointing.make_manager(ckpt_dir, read_only=True)
  assert manager.all_steps() == [stopped_at]

  with _launched(workdir, folder, second_log) as proc:
    log = _wait(proc, second_log)
    proc.wait(timeout=30)
  assert proc.returncode == 0, log[-4000:]
  assert re.search(rf'Resumed from {re.escape(ckpt_dir)} at step {stopped_at}\.', log), log[-4000:]
  assert re.search(rf'\({TOTAL_STEPS}/{TOTAL_STEPS}\)', log), log[-4000:]
  assert 'Preempted' not in log
  assert checkpointing.make_manager(ckpt_dir, read_only=True).latest_step() == TOTAL_STEPS

  # No step lost, none repeated: one train loss per step, from the two runs together.
  assert _steps_logged(workdir, 'train/loss') == list(range(1, TOTAL_STEPS + 1))
  assert _steps_logged(workdir, 'eval/num_examples') == [TOTAL_STEPS]


def _steps_logged(workdir: str, tag: str) -> list[int]:
  """The steps of every `tag` value in the TensorBoard events of `workdir`, repeats kept."""
  import tensorflow as tf

  steps = []
  for name in sorted(os.listdir(workdir)):
    if name.startswith('events.out.tfevents'):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
        steps += [event.step for value in event.summary.value if value.tag == tag]
  return sorted(steps)

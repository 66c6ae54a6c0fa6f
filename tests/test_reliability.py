"""Fault injection: every mistake or fault of docs/reliability.md, and what it must end in.

Nothing lost (converter output, checkpoints that cannot be written or read, a changed config,
Ctrl-C) and one sentence instead of a traceback. Root ignores directory permissions, so faults
are injected with a file where a directory must be, truncated files and signals to a child
process; the one permission test is skipped as root.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import convert_torch_weights
from debiformer_jax import benchmark, checkpointing, preemption, train, weights
from debiformer_jax import config as config_lib
from debiformer_jax.convert import convert_state_dict, verify
from debiformer_jax.models import DeBiFormer, get_architecture
from debiformer_jax.reference.torch_debiformer import build_torch_model, randomize_
from tests import _train_testlib as lib

lib.use_compilation_cache()

TIMEOUT = 180.0
REDUCED = dict(depths=(1, 1, 1, 1))
REDUCED_ARGS = ['--model', 'debiformer_tiny', '--model-override', 'depths=(1,1,1,1)']


# ---------------------------------------------------------------------------------------------
# Converter output.

def _converted(directory: str) -> str:
  """A small earlier conversion in `directory` (weights.save of a two-stage model)."""
  small = dict(depths=(1, 1), widths=(32, 64), mlp_ratios=(2, 2), dbra_mlp_ratios=(2, 2),
               n_win=4, attn1_deformable=(False, True), topk1=(4, -1), topk2=(4, -1),
               offset_groups=(1, 2), offset_kernels=(5, 3), offset_strides=(2, 1),
               rpe_sizes=(8, 4), num_classes=10)
  model = DeBiFormer(get_architecture('debiformer_tiny', **small))
  variables = jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype),
                           weights.abstract_variables(model))
  return weights.save(directory, variables, model_name='debiformer_tiny', architecture=small)


def test_overwrite_refuses_the_checkpoints_own_folder_and_foreign_directories(tmp_path, capsys):
  folder = tmp_path / 'downloads'
  folder.mkdir()
  ckpt = folder / 'debi_tiny.pth'
  ckpt.write_bytes(b'the checkpoint being converted')
  (folder / 'notes.txt').write_text('something else')
  # The checkpoint's own folder, even when it also holds an earlier conversion's metadata.
  (folder / weights.METADATA_FILE).write_text('{}')
  for output in (folder, tmp_path):
    code = convert_torch_weights.main(REDUCED_ARGS + ['--checkpoint', str(ckpt), '--output',
                                                      str(output), '--overwrite'])
    assert code == 2
    assert 'which is being converted' in capsys.readouterr().err
  assert ckpt.read_bytes() == b'the checkpoint being converted'
  # A directory that is not an earlier conversion ('--output .').
  other = tmp_path / 'project'
  other.mkdir()
  (other / 'train.py').write_text('precious')
  code = convert_torch_weights.main(REDUCED_ARGS + ['--checkpoint', str(ckpt), '--output',
                                                    str(other), '--overwrite'])
  assert code == 2
  assert 'is not an earlier conversion' in capsys.readouterr().err
  assert sorted(os.listdir(other)) == ['train.py']


def test_overwrite_replaces_an_earlier_conversion_only_once_the_new_one_is_complete(
    tmp_path, monkeypatch):
  out = _converted(str(tmp_path / 'converted'))
  before = weights.read(out)[0]
  os.chmod(out, 0o755)

  def broken_write(directory, *args, **kwargs):
    os.makedirs(os.path.join(directory, weights.VARIABLES_DIR))
    raise OSError('disk full (injected)')

  monkeypatch.setattr(weights, '_write', broken_write)
  with pytest.raises(OSError, match='injected'):
    weights.save(out, before, model_name='debiformer_tiny', architecture={}, overwrite=True)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ['converted']  # No staging directory left behind.
  for got, want in zip(jax.tree.leaves(weights.read(out)[0]), jax.tree.leaves(before)):
    np.testing.assert_array_equal(got, want)

  changed = jax.tree.map(lambda a: a + 1, before)
  weights.save(out, changed, model_name='debiformer_tiny', architecture={}, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['converted']
  assert os.stat(out).st_mode & 0o055 == 0o055 & ~_umask()  # Not mkdtemp's owner-only 0700.
  for got, want in zip(jax.tree.leaves(weights.read(out)[0]), jax.tree.leaves(changed)):
    np.testing.assert_array_equal(got, want)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@pytest.fixture(scope='module')
def reduced_checkpoint(tmp_path_factory):
  """A reduced tiny model's state dict (our reference) saved as a .pth, and the dict."""
  cfg = get_architecture('debiformer_tiny', **REDUCED)
  state_dict = {k: v.numpy() for k, v in randomize_(build_torch_model(cfg), 5).state_dict().items()
                if not k.endswith('num_batches_tracked')}
  return tmp_path_factory.mktemp('pth'), state_dict


def test_verify_names_a_non_finite_tensor_instead_of_blaming_the_converter(reduced_checkpoint,
                                                                           capsys):
  folder, state_dict = reduced_checkpoint
  broken = dict(state_dict)
  broken['stages.2.0.attn2.rpe_table'] = broken['stages.2.0.attn2.rpe_table'].copy()
  broken['stages.2.0.attn2.rpe_table'].flat[[0, 3]] = np.nan
  ckpt = folder / 'nan.pth'
  torch.save({k: torch.from_numpy(v) for k, v in broken.items()}, ckpt)
  out = folder / 'out'
  code = convert_torch_weights.main(REDUCED_ARGS + ['--checkpoint', str(ckpt), '--output',
                                                    str(out), '--verify'])
  err = capsys.readouterr().err
  assert code == 1
  assert re.search(r'NaN or inf values, in stages\.2\.0\.attn2\.rpe_table \(2 of \d+ values\)',
                   err), err
  assert 'conversion is not at fault' in err and not out.exists()


# ---------------------------------------------------------------------------------------------
# Parity on the accelerator: the verdict at 'highest', the default precision reported.

def test_verify_judges_at_highest_precision_and_reports_default_and_bfloat16():
  two_stages = dict(depths=(1, 1), widths=(32, 64), mlp_ratios=(2, 2),
                    attn1_deformable=(False, True), topk1=(2, 9), topk2=(3, 9),
                    offset_groups=(1, 2), offset_kernels=(5, 3), offset_strides=(2, 1),
                    dbra_mlp_ratios=(2, 1), rpe_sizes=(14, 7), num_classes=10)
  cfg = get_architecture('debi_tiny', auto_pad=True, **two_stages)
  torch_model = randomize_(build_torch_model(cfg), 61).eval()
  variables = convert_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()},
                                 cfg)
  seen = []  # (matmul precision, compute dtype) of each Flax run, read while it is traced.

  class Recording(DeBiFormer):

    def __call__(self, x, train=False):
      seen.append((jax.config.jax_default_matmul_precision, jnp.dtype(self.dtype).name))
      return super().__call__(x, train)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(verify, 'DeBiFormer', Recording)
    with jax.default_matmul_precision('float32'):  # Whatever the caller had set.
      report = verify.compare_logits(torch_model, variables, cfg, batch=2, image_size=72,
                                     seed=61, dtype='bfloat16')
  assert seen == [('highest', 'float32'), ('default', 'float32'), ('default', 'bfloat16')]
  assert report.ok and report.top1_agreement == 1.0, str(report)
  lines = str(report).splitlines()
  assert len(lines) == 3, lines
  assert lines[0].startswith(f"parity OK ({jax.default_backend()}, matmul precision 'highest')")
  assert re.match(r'  default matmul precision \(reported, not judged\): max \|difference\| '
                  r'\S+, top-1 agreement \d+%$', lines[1]), lines[1]
  assert lines[2].startswith('  bfloat16 compute (reported, not judged)')
  bf16 = report.unjudged[1]
  assert 0 < bf16.max_abs_diffs[0] < 1.0  # bfloat16 is measurably off, and not wildly.


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints.

def _state(value):
  return {'params': {'w': jnp.full((16, 8), value, jnp.float32)}, 'step': jnp.int32(value)}


def _abstract():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      _state(0))


def _truncate(path: str) -> None:
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _saved_steps(directory: str, steps) -> None:
  manager = checkpointing.make_manager(directory, keep=5, keep_best=0)
  for step in steps:
    checkpointing.save(manager, step, _state(step))
  checkpointing.check_saved(manager)
  manager.close()


def _array_files(step_dir: str) -> list[str]:
  data = os.path.join(step_dir, checkpointing.STATE_ITEM, 'd')
  return [os.path.join(data, name) for name in os.listdir(data)]


@pytest.mark.parametrize('damage', ['array file', 'metadata file'])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_restores(tmp_path,
                                                                                 damage):
  directory = str(tmp_path / 'checkpoints')
  _saved_steps(directory, (1, 2, 3))
  step3 = os.path.join(directory, '3')
  files = (_array_files(step3) if damage == 'array file'
           else [os.path.join(step3, checkpointing.STATE_ITEM, '_METADATA')])
  for path in files:
    _truncate(path)
  manager = checkpointing.make_manager(directory, keep=5, keep_best=0)
  state = checkpointing.restore(manager, _abstract())
  assert int(state['step']) == 2
  np.testing.assert_array_equal(state['params']['w'], np.full((16, 8), 2.0))
  assert manager.all_steps() == [1, 2]
  assert os.path.isdir(step3 + checkpointing.DAMAGED_SUFFIX)  # Kept, under another name.
  # The resumed run saves step 3 again, without the damaged one in the way.
  assert checkpointing.save(manager, 3, _state(3))
  checkpointing.check_saved(manager)
  assert manager.all_steps() == [1, 2, 3]
  manager.close()


def test_no_checkpoint_restores_a_message_names_the_directory_and_nothing_moves(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  _saved_steps(directory, (1, 2))
  for step in ('1', '2'):
    for path in _array_files(os.path.join(directory, step)):
      _truncate(path)
  manager = checkpointing.make_manager(directory, read_only=True)
  with pytest.raises(checkpointing.CheckpointRestoreError,
                     match=rf'no checkpoint in {re.escape(directory)} restores; nothing was '
                           rf'moved or deleted: step 2: ValueError: .*; step 1: ValueError'):
    checkpointing.restore(manager, _abstract())
  assert sorted(os.listdir(directory)) == ['1', '2']


# ---------------------------------------------------------------------------------------------
# Config mistakes, before anything is prepared, compiled or written.

def _folder_config(folder: str, **overrides):
  return lib.small_config(**{'data.prepare': '', 'data.folder': folder, **overrides})


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return lib.write_jpeg_folder(str(tmp_path_factory.mktemp('images')), train_per_class=8,
                               val_per_class=3)


def test_workdir_that_is_a_file_or_cannot_be_created(tmp_path, folder):
  a_file = tmp_path / 'file'
  a_file.write_text('')
  with pytest.raises(config_lib.ConfigError, match=r'workdir \S+ is a file: give a directory'):
    config_lib.finalize(_folder_config(folder), str(a_file))
  with pytest.raises(config_lib.ConfigError, match=r'cannot be created: \S+/file is a file'):
    config_lib.finalize(_folder_config(folder), str(a_file / 'run'))


def test_unwritable_workdir(tmp_path, folder, monkeypatch):
  parent = tmp_path / 'locked'
  parent.mkdir()
  parent.chmod(0o555)
  if os.geteuid() == 0:  # Root writes into read-only directories; os.access answers as for a user.
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode: (False if os.fspath(p) == str(parent)
                                                      else real_access(p, mode)))
  try:
    with pytest.raises(config_lib.ConfigError, match='not writable by this user'):
      config_lib.finalize(_folder_config(folder), str(parent / 'run'))
  finally:
    parent.chmod(0o755)


def test_init_from_that_is_not_a_checkpoint_fails_first_and_leaves_nothing(tmp_path, folder,
                                                                          monkeypatch):
  empty = tmp_path / 'not_weights'
  empty.mkdir()
  workdir = tmp_path / 'run'
  # Nothing of the job may run before the check: no data preparation, no model.
  monkeypatch.setattr(train.input_pipeline, 'dataset_info', _must_not_run)
  with pytest.raises(config_lib.ConfigError, match=r"init_from='\S+not_weights': \S+ holds no "
                                                   r'training checkpoint'):
    train.train_and_evaluate(_folder_config(folder, init_from=str(empty)), str(workdir))
  assert not workdir.exists()


def _must_not_run(*args, **kwargs):
  raise AssertionError('reached after a config error')


def test_global_batch_larger_than_the_dataset(tmp_path, folder):
  workdir = tmp_path / 'run'
  with pytest.raises(config_lib.ConfigError, match=r'global_batch_size=32 is larger than the 24 '
                                                   r'training examples .* at most 24'):
    train.train_and_evaluate(_folder_config(folder, global_batch_size=32), str(workdir))
  assert not (workdir / 'checkpoints').exists()


def test_unknown_config_field_is_one_sentence_with_the_suggestion(tmp_path):
  result = subprocess.run(
      [lib.python(), '-m', 'debiformer_jax.main', '--config=configs/demo.py',
       f'--workdir={tmp_path}', '--config.global_bach_size=16'],
      cwd=lib.REPO, env=lib.subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 1
  assert result.stderr.strip() == (
      "error: unknown config field 'global_bach_size' (in --config.global_bach_size=16); did "
      "you mean 'global_batch_size'? Every field is declared in debiformer_jax/config.py "
      "defaults().")


def test_benchmark_refuses_zero_steps_before_compiling(monkeypatch, capsys):
  monkeypatch.setattr(benchmark, 'compile_step', _must_not_run)
  assert benchmark.main(['--steps', '0']) == 2
  assert capsys.readouterr().err.strip() == 'error: --steps 0 must be at least 1.'


# ---------------------------------------------------------------------------------------------
# Resuming with a changed config.

def test_config_changes_split_meaningful_from_harmless():
  config = lib.small_config()
  saved = json.loads(config.to_json_best_effort())
  config.global_batch_size = 16
  config.model.widths = (32, 64)
  config.log_every_steps = 7
  config.impl.remat = True
  meaningful, harmless = config_lib.config_changes(saved, config)
  assert meaningful == ['global_batch_size: 8 -> 16', 'model.widths: [64, 128] -> [32, 64]']
  assert harmless == ['impl.remat: False -> True', 'log_every_steps: 1 -> 7']


def test_resume_with_a_changed_config_stops_unless_allowed(tmp_path, folder):
  workdir = str(tmp_path / 'run')
  config = _folder_config(folder, num_train_steps=6, eval_every_epochs=1000.0,
                          checkpoint_every_epochs=1000.0)
  assert train.train_and_evaluate(config, workdir, stop_at_step=1)['preempted_at'] is None
  changed = _folder_config(folder, num_train_steps=6, eval_every_epochs=1000.0,
                           checkpoint_every_epochs=1000.0, global_batch_size=16)
  changed.model.widths = (32, 64)
  changed.optimizer.base_lr = 1e-3
  with pytest.raises(config_lib.ConfigError) as raised:
    train.train_and_evaluate(changed, workdir)
  message = str(raised.value)
  for line in ('global_batch_size: 8 -> 16', 'model.widths: [64, 128] -> [32, 64]',
               'optimizer.base_lr: 0.002 -> 0.001'):
    assert f'\n  - {line}' in message, message
  assert 'Use a new workdir for a new run, or pass --allow_config_change' in message
  assert checkpointing.make_manager(checkpointing.checkpoint_dir(workdir),
                                    read_only=True).all_steps() == [1]

  # Harmless changes resume; a meaningful one resumes only when allowed, keeping the old file.
  relaxed = _folder_config(folder, num_train_steps=6, eval_every_epochs=1000.0,
                           checkpoint_every_epochs=1000.0, log_every_steps=2)
  relaxed.optimizer.base_lr = 1e-3
  with pytest.raises(config_lib.ConfigError, match='optimizer.base_lr'):
    train.train_and_evaluate(relaxed, workdir)
  run = train.train_and_evaluate(relaxed, workdir, allow_config_change=True, stop_at_step=2)
  assert sorted(run['train_loss']) == [2]
  with open(os.path.join(workdir, 'config.until_step_1.json')) as f:
    assert json.load(f)['optimizer']['base_lr'] == 2e-3
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['optimizer']['base_lr'] == 1e-3


# ---------------------------------------------------------------------------------------------
# A training child process: a checkpoint that cannot be written; Ctrl-C.

TOTAL_STEPS = 40


def _command(workdir: str, folder: str, checkpoint_every_epochs: float) -> list[str]:
  return [sys.executable, '-m', 'debiformer_jax.main', '--config=configs/demo.py',
          f'--workdir={workdir}', '--config.data.prepare=', f'--config.data.folder={folder}',
          '--config.global_batch_size=8', '--config.data.num_parallel_calls=2',
          '--config.data.shuffle_buffer=64', f'--config.num_train_steps={TOTAL_STEPS}',
          '--config.log_every_steps=1', '--config.eval_every_epochs=1000',
          f'--config.checkpoint_every_epochs={checkpoint_every_epochs}']


def _wait(proc, log_path: str, until=None, timeout: float = TIMEOUT) -> str:
  deadline = time.monotonic() + timeout
  while True:
    with open(log_path) as f:
      log = f.read()
    if (until is not None and until(log)) or proc.poll() is not None:
      return log
    if time.monotonic() > deadline:
      pytest.fail(f'still running after {timeout:.0f}s\n{log[-4000:]}')
    time.sleep(0.02)


def _last_step(log: str) -> int:
  steps = [int(s) for s in re.findall(rf'\((\d+)/{TOTAL_STEPS}\)', log)]
  return max(steps) if steps else 0


def test_a_checkpoint_that_cannot_be_written_stops_training_at_once(tmp_path, folder):
  """The checkpoint directory turns into a file after the first step; the first save (step 12:
  every 4 epochs of 3 steps) fails in orbax's background thread. The run must stop at the next
  steps with one message naming the directory and the cause, and exit without orbax's
  five-minute wait."""
  workdir = tmp_path / 'run'
  log_path = str(tmp_path / 'log')
  with lib.launched(_command(str(workdir), folder, 4), log_path) as proc:
    log = _wait(proc, log_path, until=lambda log: _last_step(log) >= 1)
    assert proc.poll() is None, log[-4000:]
    ckpt_dir = workdir / 'checkpoints'
    os.rename(ckpt_dir, tmp_path / 'moved')
    ckpt_dir.write_text('not a directory')
    with open(log_path) as f:
      assert _last_step(f.read()) < 12, 'injected too late: the first save had happened'
    log = _wait(proc, log_path, timeout=120)  # Orbax alone would wait 300 s.
    proc.wait(timeout=30)
  assert proc.returncode == 1, log[-4000:]
  assert re.search(rf'could not write a checkpoint in {re.escape(str(ckpt_dir))} '
                   rf'\(NotADirectoryError: .*Not a directory.*\); training stopped\. The last '
                   rf'complete checkpoint there: none\.', log), log[-4000:]
  assert 12 <= _last_step(log) <= 14, log[-4000:]  # Noticed right after the failed save.


def test_background_saves_are_waited_for_once_each_not_on_every_step(tmp_path, folder,
                                                                   monkeypatch):
  """Each wait on orbax logs an INFO line on every process. Four background saves in 40 steps
  (every 4 epochs of 3 steps, and the last step) may wait a few times each (orbax's save waits
  for the previous one), never once a step."""
  waits = []
  real_wait = checkpointing.ocp.CheckpointManager.wait_until_finished

  def counted_wait(manager):
    waits.append(1)
    return real_wait(manager)

  monkeypatch.setattr(checkpointing.ocp.CheckpointManager, 'wait_until_finished', counted_wait)
  config = _folder_config(folder, num_train_steps=TOTAL_STEPS, eval_every_epochs=1000,
                          checkpoint_every_epochs=4, async_checkpoints=True)
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(str(tmp_path / 'run')),
                                       read_only=True)
  assert manager.all_steps()[-1] == TOTAL_STEPS
  assert 4 <= len(waits) <= 3 * 4, f'{len(waits)} waits in {TOTAL_STEPS} steps'


def test_first_ctrl_c_saves_the_step_and_exits_cleanly(tmp_path, folder):
  workdir = tmp_path / 'run'
  log_path = str(tmp_path / 'log')
  with lib.launched(_command(str(workdir), folder, 1000), log_path) as proc:
    log = _wait(proc, log_path, until=lambda log: _last_step(log) >= 2)
    assert proc.poll() is None, log[-4000:]
    proc.send_signal(signal.SIGINT)
    log = _wait(proc, log_path)
    proc.wait(timeout=30)
  assert proc.returncode == 0, log[-4000:]
  assert 'press Ctrl-C again to stop at once' in log
  saved = re.search(r'Preempted: saved a checkpoint of step (\d+)/', log)
  assert saved and 'KeyboardInterrupt' not in log, log[-4000:]
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(str(workdir)),
                                       read_only=True)
  assert manager.all_steps() == [int(saved.group(1))]


def test_second_ctrl_c_stops_at_once():
  with preemption.PreemptionWatcher() as watcher:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert watcher.should_stop(2)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # The handler runs at the next bytecode; this is never reached in full.

"""The whole training loop, end to end, with the real (demo-sized) DeBiFormer.

* imagenet2012 through tfds.testing.mock_data: train with periodic eval and checkpoints;
  a run of 2N steps equals a run of N steps, an interrupted save, and a resume (losses and
  every array of the final state bit for bit); TensorBoard scalars; eval counts each of the
  10 validation examples once with a batch of 8.
* converted weights (weights.save) evaluated in 'eval' mode give the metrics
  the training run reported.
* an ImageFolder of generated JPEGs through the command line: fine-tuning from the ImageNet
  run at a larger size with auto_pad (its 1000-class head dropped with a warning), then 'eval'
  mode on the workdir.
"""

import os
import re
import shutil
import subprocess

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from debiformer_jax import checkpointing, train, weights
from debiformer_jax import config as config_lib
from tests import _train_testlib as lib

lib.use_compilation_cache()

NUM_TRAIN, NUM_EVAL, BATCH = 24, 10, 8  # 3 steps per epoch; eval batches 8 + 2 (+6 padding).
STEPS_PER_EPOCH = NUM_TRAIN // BATCH


def imagenet_config(data_dir):
  return lib.mock_imagenet_config(
      data_dir, num_epochs=2, eval_every_epochs=1.0, checkpoint_every_epochs=1.0,
      keep_checkpoints=1, keep_best=1,
      # mock_data patches file access process-wide while it builds a dataset, which would
      # capture a background save's writes: save synchronously here.
      async_checkpoints=False)


@pytest.fixture(scope='module')
def imagenet_runs(tmp_path_factory):
  """Run A: 2 epochs straight. Run B: 1 epoch, a save that died, then resume to 2 epochs."""
  root = str(tmp_path_factory.mktemp('tfds'))
  lib.write_imagenet_metadata(root, NUM_TRAIN, NUM_EVAL)
  config = imagenet_config(root)
  dir_a, dir_b = (str(tmp_path_factory.mktemp(n)) for n in ('run_a', 'run_b'))
  with tfds.testing.mock_data(num_examples=NUM_TRAIN, data_dir=root,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    run_a = train.train_and_evaluate(config, dir_a)
    run_b1 = train.train_and_evaluate(config, dir_b, stop_at_step=STEPS_PER_EPOCH)
    # A save of a later step interrupted half-way: orbax's temporary directory, incomplete.
    ckpt_dir = checkpointing.checkpoint_dir(dir_b)
    partial = os.path.join(ckpt_dir, f'{2 * STEPS_PER_EPOCH}.orbax-checkpoint-tmp-1234')
    shutil.copytree(os.path.join(ckpt_dir, str(STEPS_PER_EPOCH)), partial)
    shutil.rmtree(os.path.join(partial, 'state'))
    assert checkpointing.make_manager(ckpt_dir, read_only=True).latest_step() == STEPS_PER_EPOCH
    run_b2 = train.train_and_evaluate(config, dir_b)
    yield dict(config=config, dir_a=dir_a, dir_b=dir_b, a=run_a, b1=run_b1, b2=run_b2,
               partial=partial)


def test_resume_after_interruption_is_bit_exact(imagenet_runs):
  r = imagenet_runs
  total = 2 * STEPS_PER_EPOCH
  assert sorted(r['a']['train_loss']) == list(range(1, total + 1))
  assert sorted(r['b1']['train_loss']) == list(range(1, STEPS_PER_EPOCH + 1))
  assert sorted(r['b2']['train_loss']) == list(range(STEPS_PER_EPOCH + 1, total + 1))
  assert {**r['b1']['train_loss'], **r['b2']['train_loss']} == r['a']['train_loss']
  assert all(np.isfinite(list(r['a']['train_loss'].values())))

  state_a, state_b = r['a']['state'], r['b2']['state']
  assert int(state_a.step) == int(state_b.step) == total
  assert state_a.ema_params is not None
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert r['a']['eval'][total] == r['b2']['eval'][total]
  assert not os.path.exists(r['partial'])  # Cleaned up; never taken for a checkpoint.


def test_remat_from_the_config_trains_the_same_steps(imagenet_runs, tmp_path):
  """--config.impl.remat=True recomputes every block in the backward pass: the same training."""
  r = imagenet_runs
  config = r['config'].copy_and_resolve_references()
  config.impl.remat = True
  assert train.build_model(config_lib.finalize(config, str(tmp_path)), 1000).impl.remat
  with tfds.testing.mock_data(num_examples=NUM_TRAIN, data_dir=config.data.data_dir,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    run = train.train_and_evaluate(config, str(tmp_path), stop_at_step=2)
  assert sorted(run['train_loss']) == [1, 2]
  for step, loss in run['train_loss'].items():
    assert loss == pytest.approx(r['a']['train_loss'][step], rel=1e-5)


def test_eval_counts_every_example_once(imagenet_runs):
  evals = imagenet_runs['a']['eval']
  assert sorted(evals) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  for metrics in evals.values():
    assert metrics['eval/num_examples'] == NUM_EVAL
    assert 0 <= metrics['eval/top1'] <= metrics['eval/top5'] <= 1
    assert np.isfinite(metrics['eval/loss'])
    assert metrics['eval/top1'] * NUM_EVAL == pytest.approx(round(metrics['eval/top1'] * NUM_EVAL))


def test_metrics_and_checkpoints_on_disk(imagenet_runs):
  workdir = imagenet_runs['dir_a']
  scalars = lib.read_scalars(workdir)
  for tag in ('train/loss', 'train/lr', 'train/images_per_sec', 'train/grad_norm', 'eval/top1',
              'eval/top5', 'eval/loss', 'eval/num_examples'):
    assert tag in scalars, f'{tag} missing from {sorted(scalars)}'
  assert sorted(scalars['train/loss']) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
  assert scalars['eval/num_examples'][2 * STEPS_PER_EPOCH] == NUM_EVAL
  losses = imagenet_runs['a']['train_loss']
  for step, value in scalars['train/loss'].items():
    assert value == pytest.approx(losses[step], rel=1e-6)
  lr = scalars['train/lr']
  assert lr[1] == pytest.approx(1e-6, rel=1e-4)  # Warm-up starts at warmup_lr.
  # keep_checkpoints=1 and keep_best=1: the last step, and the best step if another one.
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdir), read_only=True)
  steps = manager.all_steps()
  evals = imagenet_runs['a']['eval']
  best = max(evals, key=lambda s: (evals[s]['eval/top1'], s))  # Ties: the later step.
  assert set(steps) == {best, 2 * STEPS_PER_EPOCH}
  assert os.path.isfile(os.path.join(workdir, 'config.json'))


def test_converted_weights_evaluate_like_training(imagenet_runs, tmp_path):
  r = imagenet_runs
  state = r['a']['state']
  variables = jax.device_get(train.eval_variables(state))  # EMA params: what eval used.
  converted = weights.save(str(tmp_path / 'converted'), variables, model_name='debiformer_tiny',
                           architecture=config_lib.model_overrides(r['config']))
  config = r['config'].copy_and_resolve_references()
  config.mode = 'eval'
  config.init_from = converted
  root = config.data.data_dir
  with tfds.testing.mock_data(num_examples=NUM_TRAIN, data_dir=root,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    metrics = train.evaluate_checkpoint(config, str(tmp_path / 'eval_workdir'))
  expected = r['a']['eval'][2 * STEPS_PER_EPOCH]
  assert metrics['eval/num_examples'] == NUM_EVAL
  assert metrics['eval/top1'] == expected['eval/top1']
  assert metrics['eval/top5'] == expected['eval/top5']
  assert metrics['eval/loss'] == pytest.approx(expected['eval/loss'], rel=1e-5)


def _main(args, **kwargs):
  return subprocess.run([lib.python(), '-m', 'debiformer_jax.main', *args], cwd=lib.REPO,
                        env=lib.subprocess_env(), capture_output=True, text=True, timeout=900,
                        **kwargs)


def test_imagefolder_finetune_and_eval_from_the_command_line(imagenet_runs, tmp_path):
  """Fine-tuning at another resolution (48, from the run at 32, as 384 from 224): with
  auto_pad the same parameter tree loads and both stage maps and the stage-0 deformable grid
  pad; without it the config stops before anything compiles and names the fix."""
  with pytest.raises(config_lib.ConfigError, match=r'image_size=48: .*auto_pad=True'):
    config_lib.finalize(lib.small_config(image_size=48), str(tmp_path / 'refused'))
  folder = lib.write_jpeg_folder(str(tmp_path / 'images'), train_per_class=8, val_per_class=3)
  broken = os.path.join(folder, 'train', 'cat', '0.jpg')
  with open(broken, 'wb') as f:  # Skipped, named once, counted.
    f.write(b'not a jpeg' * 10)
  workdir = str(tmp_path / 'workdir')
  common = ['--config=configs/demo.py', f'--workdir={workdir}', '--config.data.prepare=',
            f'--config.data.folder={folder}', '--config.global_batch_size=8',
            '--config.data.num_parallel_calls=2', '--config.image_size=48',
            '--config.model.auto_pad=True', '--config.data.max_undecodable_fraction=0.1']
  result = _main(common + ['--config.num_train_steps=4', '--config.log_every_steps=2',
                           '--config.eval_every_epochs=1',
                           f'--config.init_from={imagenet_runs["dir_a"]}'])
  assert result.returncode == 0, result.stderr[-4000:]
  log = result.stderr
  # 1000 ImageNet classes -> 3 folder classes: the head is dropped, with its shapes named.
  warning = re.search(r'dropping the checkpoint head \((.*)\)', log)
  assert warning, log[-4000:]
  assert 'head/kernel (128, 1000) -> (128, 3)' in warning.group(1)
  assert 'head/bias (1000,) -> (3,)' in warning.group(1)
  assert re.search(r'\(4/4\), ETA', log), log[-4000:]
  # Every metric line once (our logger and clu's do not both print it).
  assert len(re.findall(r'\[4\] .*train/loss=', log)) == 1, log[-4000:]
  scalars = lib.read_scalars(workdir)
  assert scalars['eval/num_examples'] == {3: 9.0, 4: 9.0}  # 24 train / 8 = 3 steps per epoch.
  assert sorted(scalars['train/loss']) == [2, 3, 4]  # Every 2 steps, and before each eval.
  assert log.count(f'Skipping image {broken}') == 1, log[-4000:]
  assert scalars['train/skipped_images'][4] >= 1  # 32 examples drawn from 24: once or twice.
  assert checkpointing.make_manager(checkpointing.checkpoint_dir(workdir),
                                    read_only=True).latest_step() == 4

  result = _main(common + ['--config.mode=eval'])
  assert result.returncode == 0, result.stderr[-4000:]
  match = re.findall(r'eval/loss=([0-9.e+-]+), eval/num_examples=(\d+), eval/top1=([0-9.e+-]+)',
                     result.stderr)
  assert len(match) == 1, result.stderr[-4000:]
  loss, num_examples, top1 = match[0]
  assert int(num_examples) == 9
  assert float(top1) == pytest.approx(scalars['eval/top1'][4], abs=1e-4)
  assert float(loss) == pytest.approx(scalars['eval/loss'][4], rel=1e-4)


"""The shipped configs, and config mistakes caught with a message before anything compiles."""

import subprocess

import jax
import pytest

from debiformer_jax import sharding, train
from tests import _train_testlib as lib


@pytest.mark.parametrize('name,model,drop_path', [('tiny', 'debiformer_tiny', 0.0),
                                                  ('small', 'debiformer_small', 0.3),
                                                  ('base', 'debiformer_base', 0.4)])
def test_imagenet_configs_are_the_official_recipe(name, model, drop_path):
  c = lib.load_config_file(name)
  train.validate_config(c)
  assert (c.model_name, c.model.drop_path_rate) == (model, drop_path)
  assert (c.mode, c.image_size, c.global_batch_size, c.num_epochs) == ('train', 224, 1024, 300)
  o = c.optimizer
  assert (o.base_lr, o.lr_base_batch_size) == (5e-4, 512)
  assert (o.weight_decay, o.grad_clip_norm) == (0.05, 5.0)
  assert (o.warmup_epochs, o.warmup_lr, o.min_lr) == (5.0, 1e-6, 5e-6)
  d = c.data
  assert d.name == 'imagenet2012'
  assert (d.mixup, d.cutmix, d.mixup_switch_prob, d.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
  assert (d.randaugment, d.random_erase, d.hflip) == ('rand-m9-mstd0.5-inc1', 0.25, True)
  assert (c.eval_every_epochs, c.ema_decay) == (1.0, 0.0)
  # The schedule in steps: 1e-6 -> peak 1e-3 (5e-4 x 1024 / 512) after 5 epochs -> 5e-6.
  schedule = train.make_schedule(c, steps_per_epoch=1251, total_steps=300 * 1251)
  assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-4)
  assert float(schedule(5 * 1251)) == pytest.approx(1e-3, rel=1e-5)
  assert float(schedule(300 * 1251)) == pytest.approx(5e-6, rel=1e-4)


def test_demo_config_is_valid_and_has_no_flip_or_mixup(tmp_path):
  c = lib.load_config_file('demo')
  train.validate_config(c, str(tmp_path))
  resolved = train.resolve_config(c, str(tmp_path))
  assert resolved.data.folder == str(tmp_path / 'digits')
  assert c.data.folder is None  # Resolving makes a copy.
  assert (c.data.hflip, c.data.mixup, c.data.cutmix, c.data.randaugment) == (False, 0, 0, '')
  assert c.data.prepare == 'sklearn_digits' and c.data.name == 'imagefolder'


def test_weight_decay_mask_skips_1d_params_and_rpe_table():
  params = {'dense': {'kernel': jax.numpy.ones((3, 4)), 'bias': jax.numpy.ones(4)},
            'attn': {'rpe_table': jax.numpy.ones((2, 5, 5)), 'norm': {'scale': jax.numpy.ones(3)}}}
  mask = train.decay_mask(params)
  assert mask == {'dense': {'kernel': True, 'bias': False},
                  'attn': {'rpe_table': False, 'norm': {'scale': False}}}


BAD = [
    ('mode', 'predict', "mode='predict' is not one of"),
    ('num_epochs', -1, 'num_epochs=-1 must be positive'),
    ('num_train_steps', -5, 'num_train_steps=-5 must be > 0, or -1'),
    ('global_batch_size', 0, 'global_batch_size=0 must be a positive integer'),
    ('model_name', 'debiformer_huge', "unknown model name 'debiformer_huge'"),
    ('model.drop_path_rate', 1.5, 'drop_path_rate=1.5 must be in [0, 1)'),
    ('image_size', 33, 'image_size=33: input 33x33 does not split into 4x4 regions'),
    ('dtype', 'float16', "dtype='float16' is not one of"),
    ('data.name', 'cifar10', "data.name='cifar10' is invalid"),
    ('sharding', 'tp', "sharding='tp' is not one of"),
    ('ema_decay', 1.5, 'ema_decay=1.5 must be in [0, 1)'),
    ('optimizer.base_lr', -1e-3, 'optimizer.base_lr=-0.001 must be > 0'),
    ('optimizer.weight_decay', -0.05, 'optimizer.weight_decay=-0.05 must be >= 0'),
    ('log_every_steps', 0, 'log_every_steps=0 must be an integer >= 1'),
    ('eval_every_epochs', 0.0, 'eval_every_epochs=0.0 must be > 0'),
    ('init_from', '/nonexistent/weights', "init_from='/nonexistent/weights' is not a directory"),
]


@pytest.mark.parametrize('key,value,message', BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_refused_before_anything_compiles(key, value, message, tmp_path,
                                                        monkeypatch):
  config = lib.small_config(**{key: value})

  def must_not_run(*args, **kwargs):
    raise AssertionError('got past validation')

  monkeypatch.setattr(sharding, 'make_mesh', must_not_run)
  monkeypatch.setattr(jax, 'jit', must_not_run)
  with pytest.raises(ValueError, match='invalid config') as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert message in str(error.value)


def test_batch_must_split_over_devices(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  with pytest.raises(ValueError, match=r'global_batch_size=12 must be divisible by the number '
                     r'of devices \(8\)'):
    train.validate_config(lib.small_config(global_batch_size=12), str(tmp_path))


def test_all_problems_are_listed_together(tmp_path):
  config = lib.small_config(num_epochs=-2, sharding='tp', image_size=36)
  with pytest.raises(ValueError) as error:
    train.validate_config(config, str(tmp_path))
  text = str(error.value)
  assert 'num_epochs=-2' in text and "sharding='tp'" in text and 'image_size=36' in text
  assert 'Square sizes that work with this model include 32' in text


def test_eval_mode_needs_a_checkpoint(tmp_path):
  with pytest.raises(ValueError, match="mode='eval' needs a checkpoint"):
    train.validate_config(lib.small_config(mode='eval'), str(tmp_path / 'empty'))


def test_command_line_reports_a_bad_config_and_fails(tmp_path):
  result = subprocess.run(
      [lib.python(), '-m', 'debiformer_jax.main', '--config=configs/demo.py',
       f'--workdir={tmp_path}', '--config.global_batch_size=-8', '--config.num_epochs=-1'],
      cwd=lib.REPO, env=lib.subprocess_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'global_batch_size=-8 must be a positive integer' in result.stderr
  assert 'num_epochs=-1 must be positive' in result.stderr
  assert 'configs/demo.py' in result.stderr
  assert not (tmp_path / 'checkpoints').exists()

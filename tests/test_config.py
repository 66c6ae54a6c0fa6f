"""The training config: the paper's recipe per variant, the official weight-decay rule, and
config mistakes caught with a message before anything compiles."""

import subprocess

import jax
import pytest

from debiformer_jax import config, sharding, train
from debiformer_jax.convert import name_map
from debiformer_jax.models import DeBiFormer, get_architecture
from tests import _train_testlib as lib

# The paper's supplementary Table 10, per variant: (global batch, peak lr, drop path).
TABLE_10 = {'tiny': ('debiformer_tiny', 1024, 1e-3, 0.0),
            'small': ('debiformer_small', 512, 5e-4, 0.2),
            'base': ('debiformer_base', 512, 5e-4, 0.4)}


@pytest.mark.parametrize('name', sorted(TABLE_10))
def test_imagenet_configs_are_the_papers_table_10(name, tmp_path):
  model, batch, peak_lr, drop_path = TABLE_10[name]
  c = lib.load_config_file(name)
  c.data.data_dir = str(tmp_path)
  c = config.finalize(c, str(tmp_path))
  assert (c.model_name, c.model.drop_path_rate, c.global_batch_size) == (model, drop_path, batch)
  assert (c.mode, c.image_size, c.num_epochs, c.dtype) == ('train', 224, 300, 'bfloat16')
  o = c.optimizer
  assert o.base_lr * c.global_batch_size / o.lr_base_batch_size == pytest.approx(peak_lr)
  assert (o.weight_decay, o.grad_clip_norm, o.warmup_epochs) == (0.05, 5.0, 20.0)
  assert (o.warmup_lr, o.min_lr, o.b1, o.b2, o.eps) == (1e-6, 5e-6, 0.9, 0.999, 1e-8)
  assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.mixup.switch_prob) == (0.8, 1.0, 0.5)
  assert c.label_smoothing == 0.1
  d = c.data
  assert (d.name, d.eval_split, d.eval_crop_pct) == ('imagenet2012', 'validation', 0.875)
  assert (d.randaugment, d.random_erase, d.hflip) == ('rand-m9-mstd0.5-inc1', 0.25, True)
  assert tuple(d.rrc_scale) == (0.08, 1.0)
  assert (c.eval_every_epochs, c.ema_decay) == (1.0, 0.0)
  # The schedule in steps: 1e-6 -> the peak after 20 epochs -> 5e-6 at the end.
  steps = 1_281_167 // batch
  schedule = train.make_schedule(c, steps_per_epoch=steps, total_steps=300 * steps)
  assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-4)
  assert float(schedule(20 * steps)) == pytest.approx(peak_lr, rel=1e-5)
  assert float(schedule(300 * steps)) == pytest.approx(5e-6, rel=1e-4)
  # The model the job builds carries the drop path of the config, not the builder's.
  assert train.build_model(c, 1000).config.drop_path_rate == drop_path


@pytest.mark.parametrize('model_name', ['debiformer_tiny', 'debiformer_small', 'debiformer_base'])
def test_weight_decay_mask_is_the_official_rule_for_every_parameter(model_name):
  """The official main.py builds AdamW with timm's create_optimizer: no decay for parameters
  of at most one dimension, for names ending in '.bias', and for the model's no_weight_decay()
  set {'pos_embed', 'cls_token'}. Checked on our reference's official names and shapes,
  mapped through the converter's name map onto our parameters."""
  from debiformer_jax import weights
  from debiformer_jax.reference.torch_debiformer import build_torch_model

  arch = get_architecture(model_name)
  official = {name: not (p.ndim <= 1 or name.endswith('.bias')
                         or name in {'pos_embed', 'cls_token'})
              for name, p in build_torch_model(arch).named_parameters()}
  params = weights.abstract_variables(DeBiFormer(arch))['params']
  ours = weights.flatten(train.decay_mask(params))
  mapped = {'/'.join(e.path): official[e.torch_key] for e in name_map(arch)
            if e.collection == 'params'}
  assert sorted(mapped) == sorted(ours)
  assert mapped == ours
  assert any(k.endswith('rpe_table') and v for k, v in ours.items())  # decayed, as officially


def test_demo_config_is_valid_and_has_no_flip_or_mixup(tmp_path):
  c = lib.load_config_file('demo')
  resolved = config.finalize(c, str(tmp_path))
  assert resolved.data.folder == str(tmp_path / 'digits')
  assert c.data.folder == '{workdir}/digits'  # Finalizing makes a copy.
  assert (c.data.hflip, c.mixup.mixup_alpha, c.mixup.cutmix_alpha) == (False, 0, 0)
  assert c.data.randaugment == '' and resolved.data.eval_split == 'val'
  assert c.data.prepare == 'sklearn_digits' and c.data.name == 'imagefolder'


def test_eval_split_defaults_to_the_datasets_own(tmp_path):
  c = lib.small_config(**{'data.eval_split': ''})
  assert config.finalize(c, str(tmp_path)).data.eval_split == 'val'
  c = lib.load_config_file('small')
  assert c.data.eval_split == ''
  assert config.finalize(c, str(tmp_path)).data.eval_split == 'validation'


BAD = [
    ('mode', 'predict', "mode='predict' is not one of"),
    ('num_epochs', -1, 'num_epochs=-1 must be positive'),
    ('num_train_steps', -5, 'num_train_steps=-5 must be > 0, or -1'),
    ('global_batch_size', 0, 'global_batch_size=0 must be a positive integer'),
    ('model_name', 'debiformer_huge', "unknown model name 'debiformer_huge'"),
    ('model.drop_path_rate', 1.5, 'drop_path_rate=1.5 must be in [0, 1)'),
    ('model.widths', (64, 100), 'not a multiple of head_dim'),
    ('image_size', 33, 'image_size=33: input 33x33 does not split into 4x4 regions'),
    ('dtype', 'float16', "dtype='float16' is not one of"),
    ('impl.dwconv', 'winograd', "impl: Implementation.dwconv='winograd'"),
    ('impl.dense_routing', 'lots', "impl: Implementation.dense_routing='lots'"),
    ('impl.remat_policy', 'everything', "Implementation.remat_policy='everything'"),
    ('sharding', 'tp', "sharding='tp' is not one of"),
    ('ema_decay', 1.5, 'ema_decay=1.5 must be in [0, 1)'),
    ('optimizer.base_lr', -1e-3, 'optimizer.base_lr=-0.001 must be > 0'),
    ('optimizer.weight_decay', -0.05, 'optimizer.weight_decay=-0.05 must be >= 0'),
    ('mixup.mixup_alpha', -1.0, 'mixup.mixup_alpha=-1.0 must be a Beta alpha >= 0'),
    ('mixup.cutmix_alpha', -0.5, 'mixup.cutmix_alpha=-0.5 must be a Beta alpha >= 0'),
    ('mixup.switch_prob', 2.0, 'mixup.switch_prob=2.0 must be a probability in [0, 1]'),
    ('label_smoothing', 1.0, 'label_smoothing=1.0 must be in [0, 1)'),
    ('log_every_steps', 0, 'log_every_steps=0 must be an integer >= 1'),
    ('eval_every_epochs', 0.0, 'eval_every_epochs=0.0 must be > 0'),
    ('init_from', '/nonexistent/weights', "init_from='/nonexistent/weights': no weights at "
     "/nonexistent/weights: the directory does not exist."),
    ('data.name', 'cifar10', "one of ['imagenet2012', 'imagefolder']"),
    ('data.prepare', 'mnist', "one of ['', 'sklearn_digits']"),
    ('data.randaugment', 'rand-m9-bogus', 'rand-m9-mstd0.5-inc1'),
    ('data.randaugment', 'autoaug', 'must start with "rand"'),
    ('data.random_erase', 1.5, 'data.random_erase=1.5 is invalid: must be a probability'),
    ('data.rrc_scale', (0.5, 0.1), '0 < lo <= hi <= 1'),
    ('data.eval_crop_pct', 0.0, 'data.eval_crop_pct=0.0 is invalid: must be a number in (0, 1]'),
    ('data.shuffle_buffer', -3, 'integer >= 0'),
    ('data.num_parallel_calls', 0, 'AUTOTUNE'),
    ('data.train_split', '', 'non-empty'),
    ('data.folder', None, "data.folder=None is invalid: data.name=imagefolder needs"),
]


@pytest.mark.parametrize('key,value,message', BAD, ids=[f'{b[0]}={b[1]}' for b in BAD])
def test_bad_config_is_refused_before_anything_compiles(key, value, message, tmp_path,
                                                        monkeypatch):
  c = lib.small_config(**{key: value})

  def must_not_run(*args, **kwargs):
    raise AssertionError('got past validation')

  monkeypatch.setattr(sharding, 'make_mesh', must_not_run)
  monkeypatch.setattr(jax, 'jit', must_not_run)
  with pytest.raises(config.ConfigError, match='invalid config') as error:
    train.train_and_evaluate(c, str(tmp_path))
  assert message in str(error.value)


def test_data_cross_field_rules(tmp_path):
  c = lib.small_config(**{'data.name': 'imagenet2012'})
  with pytest.raises(config.ConfigError, match="data.prepare=.*needs data.name='imagefolder'"):
    config.finalize(c, str(tmp_path))
  c = lib.small_config(**{'data.prepare': '', 'data.name': 'imagenet2012', 'data.download': True})
  with pytest.raises(config.ConfigError, match='data.manual_dir=None'):
    config.finalize(c, str(tmp_path))


def test_implementation_comes_from_the_config(tmp_path):
  c = config.finalize(lib.small_config(**{'impl.remat': True, 'impl.dense_routing': '4096',
                                          'impl.sampling': 'matmul'}), str(tmp_path))
  impl = train.build_model(c, 10).impl
  assert (impl.remat, impl.dense_routing, impl.sampling) == (True, 4096, 'matmul')
  assert 'auto' not in (impl.dwconv, impl.region_gather)


def test_batch_must_split_over_devices(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  with pytest.raises(config.ConfigError, match=r'global_batch_size=12 must be divisible by the '
                     r'number of devices \(8\)'):
    config.finalize(lib.small_config(global_batch_size=12), str(tmp_path))


def test_all_problems_are_listed_together(tmp_path):
  c = lib.small_config(num_epochs=-2, sharding='tp', image_size=36)
  with pytest.raises(config.ConfigError) as error:
    config.finalize(c, str(tmp_path))
  text = str(error.value)
  assert 'num_epochs=-2' in text and "sharding='tp'" in text and 'image_size=36' in text
  assert 'Square sizes that work with this model include 32' in text


def test_eval_mode_needs_a_checkpoint(tmp_path):
  with pytest.raises(config.ConfigError, match="mode='eval' needs a checkpoint"):
    config.finalize(lib.small_config(mode='eval'), str(tmp_path / 'empty'))


def test_command_line_reports_a_bad_config_and_fails(tmp_path):
  result = subprocess.run(
      [lib.python(), '-m', 'debiformer_jax.main', '--config=configs/demo.py',
       f'--workdir={tmp_path}', '--config.global_batch_size=-8', '--config.num_epochs=-1',
       '--config.impl.remat=True', '--config.impl.sampling=bilinear',
       '--config.model.n_win=3'],
      cwd=lib.REPO, env=lib.subprocess_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'global_batch_size=-8 must be a positive integer' in result.stderr
  assert 'num_epochs=-1 must be positive' in result.stderr
  assert "Implementation.sampling='bilinear'" in result.stderr
  assert 'does not split into 3x3 regions' in result.stderr
  assert 'configs/demo.py' in result.stderr
  assert not (tmp_path / 'checkpoints').exists()

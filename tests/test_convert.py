"""Converter: the official fixture, full-size variants through our reference, and its errors."""

import importlib
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import convert_torch_weights
from debiformer_jax import weights
from debiformer_jax.convert import convert_state_dict, load_torch_checkpoint, name_map
from debiformer_jax.convert.verify import compare_logits
from debiformer_jax.models import DeBiFormer, get_architecture
from debiformer_jax.reference.torch_debiformer import build_torch_model, randomize_

FIXTURE = (Path(__file__).resolve().parents[1].parent / 'shared' / 'fixtures'
           / 'official_debi_reduced')
REDUCED = dict(depths=(1, 1, 1, 1))


def tol(ref):
  return 1e-4 * max(1.0, float(np.abs(ref).max()))


def needs_fixture():
  if not (FIXTURE / 'debi_reduced_seed7.pth').exists():
    pytest.skip(f'official fixture not found at {FIXTURE} (the ../shared folder beside the '
                f'repository); it holds outputs of the official code')


def test_official_fixture_stages_and_logits():
  needs_fixture()
  variables = load_torch_checkpoint(str(FIXTURE / 'debi_reduced_seed7.pth'), 'debi_tiny',
                                    **REDUCED)
  model = DeBiFormer(get_architecture('debiformer_tiny', **REDUCED))
  x = np.load(FIXTURE / 'input_nchw.npy').transpose(0, 2, 3, 1)
  logits, stages = jax.jit(lambda v, x: (model.apply(v, x), model.apply(
      v, x, method='forward_features')))(variables, x)
  for i, got in enumerate(stages):
    ref = np.load(FIXTURE / f'stage{i}_nchw.npy').transpose(0, 2, 3, 1)
    assert np.abs(np.asarray(got) - ref).max() <= tol(ref), f'stage {i}'
  ref = np.load(FIXTURE / 'logits.npy')
  assert np.abs(np.asarray(logits) - ref).max() <= tol(ref)


@pytest.mark.parametrize('name,seed', [('debiformer_tiny', 11), ('debiformer_small', 12),
                                       ('debiformer_base', 13)])
def test_full_size_variants_match_the_reference(name, seed):
  cfg = get_architecture(name)
  torch_model = randomize_(build_torch_model(cfg), seed).eval()
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  variables = convert_state_dict(state_dict, cfg)
  report = compare_logits(torch_model, variables, cfg, batch=1, seed=seed)
  assert report.ok, str(report)
  assert report.top1_agreement == 1.0


@pytest.fixture(scope='module')
def reduced_state_dict():
  """A reduced tiny model's state dict from our reference, as the reader returns it."""
  cfg = get_architecture('debiformer_tiny', **REDUCED)
  model = randomize_(build_torch_model(cfg), 3)
  return {k: v.numpy() for k, v in model.state_dict().items()
          if not k.endswith('num_batches_tracked')}


def test_name_map_is_one_to_one_and_covers_every_tensor(reduced_state_dict):
  cfg = get_architecture('debiformer_tiny', **REDUCED)
  keys = [e.torch_key for e in name_map(cfg)]
  assert sorted(keys) == sorted(reduced_state_dict)
  variables = convert_state_dict(reduced_state_dict, cfg)
  n = sum(v.size for v in jax.tree.leaves(variables))
  assert n == sum(v.size for v in reduced_state_dict.values())


def test_another_variant_is_an_error_naming_it(reduced_state_dict):
  with pytest.raises(ValueError,
                     match=r'depths=\(1, 1, 1, 1\).*requested model has depths=\(2, 2, 9, 3\)'):
    convert_state_dict(reduced_state_dict, get_architecture('debiformer_small'))
  with pytest.raises(ValueError, match='shape mismatch'):
    convert_state_dict(reduced_state_dict, get_architecture('debiformer_base', **REDUCED))


def test_missing_and_extra_keys_are_named(reduced_state_dict):
  cfg = get_architecture('debiformer_tiny', **REDUCED)
  sd = dict(reduced_state_dict)
  del sd['stages.1.0.attn2.rpe_table']
  with pytest.raises(ValueError, match=r'missing: stages\.1\.0\.attn2\.rpe_table'):
    convert_state_dict(sd, cfg)
  sd = dict(reduced_state_dict, **{'stages.1.0.attn2.extra_thing': np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r'not used: stages\.1\.0\.attn2\.extra_thing'):
    convert_state_dict(sd, cfg)
  sd = dict(reduced_state_dict)
  sd['head.weight'] = sd['head.weight'][:10]
  with pytest.raises(ValueError,
                     match=r'head\.weight \(10, 512\) -> head/kernel needs \(512, 1000\)'):
    convert_state_dict(sd, cfg)


def test_cli_writes_a_checkpoint_that_loads_and_refuses_to_overwrite(tmp_path, reduced_state_dict,
                                                                     capsys):
  ckpt = tmp_path / 'reduced.pth'
  torch.save({'model': {f'module.{k}': torch.from_numpy(v).half()
                        for k, v in reduced_state_dict.items()}, 'epoch': 3}, ckpt)
  out = tmp_path / 'converted'
  args = ['--model', 'debiformer_tiny', '--model-override', 'depths=(1,1,1,1)',
          '--checkpoint', str(ckpt), '--output', str(out)]
  assert convert_torch_weights.main(args) == 0
  assert 'into debiformer_tiny: 15,422,422 parameters' in capsys.readouterr().out
  cfg = get_architecture('debiformer_tiny', **REDUCED)
  variables, meta = weights.read(str(out))
  assert meta['model_name'] == 'debiformer_tiny'
  expected = convert_state_dict({k: v.astype(np.float16).astype(np.float32)
                                 for k, v in reduced_state_dict.items()}, cfg)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  before = sorted(os.listdir(out))
  assert convert_torch_weights.main(args) == 2
  assert 'not empty' in capsys.readouterr().err
  assert sorted(os.listdir(out)) == before


def test_cli_reports_a_corrupt_file_and_a_wrong_variant(tmp_path, reduced_state_dict, capsys):
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'this is not a checkpoint')
  out = tmp_path / 'out'
  assert convert_torch_weights.main(['--model', 'debi_tiny', '--checkpoint', str(bad),
                                     '--output', str(out)]) == 2
  assert 'bad.pth' in capsys.readouterr().err
  ckpt = tmp_path / 'reduced.pth'
  torch.save({k: torch.from_numpy(v) for k, v in reduced_state_dict.items()}, ckpt)
  assert convert_torch_weights.main(['--model', 'debi_small', '--checkpoint', str(ckpt),
                                     '--output', str(out)]) == 2
  assert 'checkpoint has depths=(1, 1, 1, 1)' in capsys.readouterr().err
  assert not out.exists()


def test_cli_verify_fails_and_writes_nothing_when_parity_breaks(tmp_path, reduced_state_dict,
                                                                monkeypatch, capsys):
  ckpt = tmp_path / 'reduced.pth'
  torch.save({k: torch.from_numpy(v) for k, v in reduced_state_dict.items()}, ckpt)
  name_map_module = importlib.import_module('debiformer_jax.convert.name_map')
  # Break the map the converter uses: the rpe table is transposed on the way in.
  original = name_map_module.TRANSFORMS['copy']
  monkeypatch.setitem(name_map_module.TRANSFORMS, 'copy',
                      lambda w: np.ascontiguousarray(np.swapaxes(w, -1, -2)) if w.ndim == 3
                      else original(w))
  out = tmp_path / 'out'
  code = convert_torch_weights.main(['--model', 'debi_tiny', '--model-override',
                                     'depths=(1,1,1,1)', '--checkpoint', str(ckpt),
                                     '--output', str(out), '--verify', '--verify-batch', '1'])
  captured = capsys.readouterr()
  assert code == 1, captured
  assert 'parity FAILED' in captured.out and not out.exists()


def test_main_eval_path_loads_converted_weights_with_the_converter_logits(tmp_path, capsys):
  """The weights `main --config.mode=eval --config.init_from=DIR` evaluates give the logits
  the converter's --verify measured (and the official fixture's)."""
  needs_fixture()
  from debiformer_jax import sharding, train
  out = tmp_path / 'converted'
  assert convert_torch_weights.main(
      ['--model', 'debi_tiny', '--model-override', 'depths=(1,1,1,1)', '--checkpoint',
       str(FIXTURE / 'debi_reduced_seed7.pth'), '--output', str(out), '--verify']) == 0
  assert 'parity OK' in capsys.readouterr().out
  model = DeBiFormer(get_architecture('debiformer_tiny', **REDUCED))
  abstract = weights.abstract_variables(model)
  shardings = sharding.state_shardings(abstract, sharding.make_mesh(), 'dp', 2 ** 18)
  placed = weights.load(str(out), train.with_shardings(abstract, shardings))
  direct = load_torch_checkpoint(str(FIXTURE / 'debi_reduced_seed7.pth'), 'debi_tiny', **REDUCED)
  for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(np.asarray(a), b)
  x = np.load(FIXTURE / 'input_nchw.npy').transpose(0, 2, 3, 1)
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(placed, x))
  ref = np.load(FIXTURE / 'logits.npy')
  assert np.abs(logits - ref).max() <= tol(ref)

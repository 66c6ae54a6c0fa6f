"""DeBiFormer as a backbone: the official dense fixture, full-size parity through our reference,
auto_pad, the three checkpoint kinds a backbone is converted from, and bad input."""

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import convert_torch_weights
from debiformer_jax import weights
from debiformer_jax.convert import (backbone_state_dict, convert_state_dict,
                                    load_torch_checkpoint, read_torch_state_dict)
from debiformer_jax.convert.verify import compare_features, compare_logits
from debiformer_jax.models import create_model, get_architecture
from debiformer_jax.reference.torch_debiformer import build_torch_model, randomize_

FIXTURES = Path(__file__).resolve().parents[1].parent / 'shared' / 'fixtures'
DENSE = FIXTURES / 'official_dense_reduced'
DENSE_CKPT = DENSE / 'debi_reduced_dense_seed7.pth'
CLASSIFIER_CKPT = FIXTURES / 'official_debi_reduced' / 'debi_reduced_seed7.pth'
REDUCED = dict(depths=(1, 1, 1, 1))

torch.set_num_threads(2)


def tol(ref):
  return 1e-4 * max(1.0, float(np.abs(ref).max()))


def needs(path):
  if not path.exists():
    pytest.skip(f'official fixture not found at {path} (the ../shared folder beside the '
                f'repository); it holds outputs of the official code')


def test_official_dense_fixture_all_four_maps():
  """The official segmentation backbone at 2x3x200x328: every attention pads, every
  deformable grid pads again."""
  needs(DENSE_CKPT)
  variables = load_torch_checkpoint(str(DENSE_CKPT), 'debi_tiny', features_only=True, **REDUCED)
  model = create_model('debi_tiny', features_only=True, **REDUCED)
  x = np.load(DENSE / 'input_nchw.npy').transpose(0, 2, 3, 1)
  maps = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  assert len(maps) == 4
  for i, (got, info) in enumerate(zip(maps, model.feature_info)):
    ref = np.load(DENSE / f'feat{i}_nchw.npy').transpose(0, 2, 3, 1)
    assert got.shape == ref.shape == (2, -(-200 // info['reduction']),
                                      -(-328 // info['reduction']), info['num_chs'])
    assert np.abs(np.asarray(got) - ref).max() <= tol(ref), f'stage {i}'


def test_full_size_backbone_matches_the_reference():
  """Full-size tiny, batch 2, 256x384: stage maps 0-2 split into regions, stage 3 and the
  stage-0 deformable grid pad. (Small and base, other sizes and batches: measured in the
  README's parity paragraph; each costs a minute or two here.)"""
  cfg = get_architecture('debi_tiny', backbone=True)
  torch_model = randomize_(build_torch_model(cfg, features_only=True), 21).eval()
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  variables = convert_state_dict(backbone_state_dict(state_dict, cfg).state_dict, cfg,
                                 features_only=True)
  report = compare_features(torch_model, variables, cfg, batch=2, size=(256, 384), seed=21)
  assert report.ok, str(report)


# A two-stage classifier that compiles in seconds; BRA and DBRA blocks, routing that picks.
TWO_STAGES = dict(depths=(1, 1), widths=(32, 64), mlp_ratios=(2, 2),
                  attn1_deformable=(False, True), topk1=(2, 9), topk2=(3, 9),
                  offset_groups=(1, 2), offset_kernels=(5, 3), offset_strides=(2, 1),
                  dbra_mlp_ratios=(2, 1), rpe_sizes=(14, 7), num_classes=10)


def test_classifier_with_auto_pad_matches_the_reference():
  """The classifier with auto_pad at 72 (n_win 7: maps 18 and 9 and the 9x9 stage-0 grid pad)
  against our reference of the official classifier with auto_pad=True. (Full-size tiny, small
  and base at 256-384: measured in the README's parity paragraph.)"""
  cfg = get_architecture('debi_tiny', auto_pad=True, **TWO_STAGES)
  torch_model = randomize_(build_torch_model(cfg), 61).eval()
  variables = convert_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()},
                                 cfg)
  assert len(cfg.input_size_problems(72, 72)) == 3  # both maps and the stage-0 grid pad
  report = compare_logits(torch_model, variables, cfg, batch=2, image_size=72, seed=61)
  assert report.ok and report.top1_agreement == 1.0, str(report)


def test_auto_pad_changes_nothing_where_nothing_pads():
  """At 224 (n_win 7) auto_pad lowers to the very program of the default: no pad, no crop."""
  lowered = []
  for auto_pad in (False, True):
    model = create_model('debi_tiny', auto_pad=auto_pad, **REDUCED)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    lowered.append(jax.jit(lambda v, x: model.apply(v, x)).lower(
        weights.abstract_variables(model), x).as_text())
  assert lowered[0] == lowered[1]


def test_out_indices_feature_info_and_shapes_at_any_size():
  model = create_model('debi_small', features_only=True, out_indices=(1, 3), **REDUCED)
  assert model.config.n_win == 8 and model.config.auto_pad and model.config.norm_outputs
  assert model.feature_info.channels() == [128, 512]
  assert model.feature_info.reduction() == [8, 32]
  variables = weights.abstract_variables(model)
  x = jax.ShapeDtypeStruct((3, 97, 61, 3), jnp.float32)
  maps = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert [m.shape for m in maps] == [(3, 13, 8, 128), (3, 4, 2, 512)]
  # The backbone's tree: per-stage norms, no final norm or head; overridable.
  assert {'extra_norm0', 'extra_norm3'} <= set(variables['params'])
  assert not {'norm', 'head'} & set(variables['params'])
  plain = create_model('debi_small', features_only=True, norm_outputs=False, n_win=16,
                       **REDUCED)
  assert plain.config.n_win == 16
  assert not any(k.startswith('extra_norm') for k in weights.abstract_variables(plain)['params'])
  # The classifier's stage maps, from the same network.
  classifier = create_model('debi_small', **REDUCED)
  stages = jax.eval_shape(lambda v, x: classifier.apply(v, x, method='forward_features'),
                          weights.abstract_variables(classifier),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert [s.shape for s in stages] == [(1, 56, 56, 64), (1, 28, 28, 128), (1, 14, 14, 256),
                                       (1, 7, 7, 512)]


def _init_error(model, x):
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)


@pytest.mark.parametrize('shape,dtype,message', [
    ((2, 3, 224, 224), jnp.float32, r'looks like NCHW .* x\.transpose\(0, 2, 3, 1\)'),
    ((224, 224, 3), jnp.float32, r'one image\? add a batch axis'),
    ((0, 224, 224, 3), jnp.float32, r'batch of 0 images .* at least one image'),
    ((1, 224, 224, 3), jnp.uint8, r'expected float images normalised .* got uint8'),
    ((1, 224, 224, 3), jnp.int32, r'raw 0-255 pixels'),
    ((1, 0, 224, 3), jnp.float32, r'is empty'),
])
def test_bad_images_say_what_to_do(shape, dtype, message):
  model = create_model('debi_tiny', features_only=True, **REDUCED)
  with pytest.raises((ValueError, TypeError), match=message):
    _init_error(model, jax.ShapeDtypeStruct(shape, dtype))


def test_too_small_an_image_and_bad_out_indices_say_what_to_do():
  classifier = create_model('debi_tiny', **REDUCED)
  with pytest.raises(ValueError, match=r'112x112 is smaller than .* at least 224x224\. '
                                       r'Square sizes .* 224, 448, 672.*auto_pad=True'):
    _init_error(classifier, jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32))
  # With auto_pad the same image is taken: every map pads.
  padded = create_model('debi_tiny', auto_pad=True, **REDUCED)
  assert _init_error(padded, jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32))
  with pytest.raises(ValueError, match=r'out_indices=\(1, 4\): .* out of \(0, 1, 2, 3\)'):
    create_model('debi_tiny', features_only=True, out_indices=(1, 4))
  with pytest.raises(ValueError, match='must be increasing'):
    create_model('debi_tiny', features_only=True, out_indices=(2, 1))
  with pytest.raises(ValueError, match='use it with features_only=True'):
    create_model('debi_tiny', out_indices=(0,))


@pytest.fixture(scope='module')
def dense_state_dict():
  needs(DENSE_CKPT)
  return read_torch_state_dict(DENSE_CKPT)


def _mmseg_checkpoint(path, state_dict):
  """An mmsegmentation-style checkpoint: meta, `state_dict` with backbone.* and head tensors."""
  tensors = {f'backbone.{k}': torch.from_numpy(v) for k, v in state_dict.items()}
  tensors['decode_head.conv_seg.weight'] = torch.zeros(150, 512, 1, 1)
  tensors['auxiliary_head.conv_seg.bias'] = torch.zeros(150)
  torch.save({'meta': {'mmseg_version': '0.30.0', 'iter': 160000, 'CLASSES': ('wall', 'sky')},
              'state_dict': tensors}, path)


def test_cli_converts_an_mmseg_checkpoint_lists_what_it_ignores_and_verifies(
    tmp_path, dense_state_dict, capsys):
  ckpt, out = tmp_path / 'upernet.pth', tmp_path / 'converted'
  _mmseg_checkpoint(ckpt, dense_state_dict)
  code = convert_torch_weights.main(
      ['--model', 'debi_tiny', '--features-only', '--model-override', 'depths=(1,1,1,1)',
       '--checkpoint', str(ckpt), '--output', str(out), '--verify', '--verify-batch', '1'])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert 'mmsegmentation / mmdetection' in captured.out
  assert ('ignored 2 tensor(s) that are not part of the backbone: '
          'auxiliary_head.conv_seg.bias, decode_head.conv_seg.weight') in captured.out
  assert "matmul precision 'highest'): max |feature difference| stage 0:" in captured.out
  assert 'parity OK' in captured.out
  variables, meta = weights.read(str(out))
  assert meta['features_only'] and meta['ignored'] == ['auxiliary_head.conv_seg.bias',
                                                       'decode_head.conv_seg.weight']
  assert len(meta['verified_max_abs_feature_diffs']) == 4
  direct = load_torch_checkpoint(str(DENSE_CKPT), 'debi_tiny', features_only=True, **REDUCED)
  flat_got, flat_want = weights.flatten(variables), weights.flatten(direct)
  assert flat_got.keys() == flat_want.keys()
  for k in flat_want:
    np.testing.assert_array_equal(flat_got[k], flat_want[k])


def test_a_classifier_checkpoint_becomes_a_backbone_saying_what_was_dropped_and_initialised(
    caplog):
  needs(CLASSIFIER_CKPT)
  with caplog.at_level(logging.WARNING):
    variables = load_torch_checkpoint(str(CLASSIFIER_CKPT), 'debi_tiny', features_only=True,
                                      **REDUCED)
  log = caplog.text
  assert 'read as an ImageNet classifier checkpoint' in log
  assert ('unused 6 classifier tensor(s) (final norm and head): head.bias, head.weight, '
          'norm.bias, norm.running_mean, norm.running_var, norm.weight') in log
  assert 'initialised 8 tensor(s)' in log and 'extra_norms.3.ln.weight' in log
  for s, width in enumerate((64, 128, 256, 512)):
    np.testing.assert_array_equal(variables['params'][f'extra_norm{s}']['scale'],
                                  np.ones(width, np.float32))
    np.testing.assert_array_equal(variables['params'][f'extra_norm{s}']['bias'],
                                  np.zeros(width, np.float32))
  classifier = load_torch_checkpoint(str(CLASSIFIER_CKPT), 'debi_tiny', **REDUCED)
  np.testing.assert_array_equal(variables['params']['stage3_block0']['attn2']['rpe_table'],
                                classifier['params']['stage3_block0']['attn2']['rpe_table'])
  assert 'head' not in variables['params'] and 'norm' not in variables['params']


def test_backbone_conversion_names_missing_and_unknown_tensors(dense_state_dict):
  cfg = get_architecture('debi_tiny', backbone=True, **REDUCED)
  mmseg = {f'backbone.{k}': v for k, v in dense_state_dict.items()
           if k != 'stages.2.0.attn2.rpe_table'}
  mmseg['backbone.stages.2.0.attn2.extra'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r'missing: stages\.2\.0\.attn2\.rpe_table.*not used: '
                                       r'stages\.2\.0\.attn2\.extra'):
    convert_state_dict(backbone_state_dict(mmseg, cfg).state_dict, cfg, features_only=True)
  # A dense checkpoint into a backbone asked to have no per-stage norms: its norms are named.
  plain = get_architecture('debi_tiny', backbone=True, norm_outputs=False, **REDUCED)
  with pytest.raises(ValueError, match=r'not used: extra_norms\.0\.ln\.bias'):
    convert_state_dict(backbone_state_dict(dense_state_dict, plain).state_dict, plain,
                       features_only=True)

"""The benchmark command end to end on a small model, and the analytic FLOP counter.

Speed is measured by `python -m debiformer_jax.benchmark`, not here: nothing below asserts a
timing.
"""

import json

import jax
import pytest

from debiformer_jax import benchmark
from debiformer_jax.models import get_architecture
from debiformer_jax.models.flops import forward_macs, train_flops

# One stage with a BRA and a DBRA, 28x28 input (a 7x7 map): compiles in seconds.
ONE_STAGE = ['--override', 'depths=(1,)', '--override', 'widths=(32,)',
             '--override', 'mlp_ratios=(2,)', '--override', 'attn1_deformable=(False,)',
             '--override', 'topk1=(2,)', '--override', 'topk2=(3,)',
             '--override', 'offset_groups=(1,)', '--override', 'offset_kernels=(3,)',
             '--override', 'offset_strides=(1,)', '--override', 'dbra_mlp_ratios=(2,)',
             '--override', 'rpe_sizes=(7,)', '--override', 'num_classes=10',
             '--resolution', '28', '--batch', '2', '--steps', '2', '--warmup', '1']


@pytest.mark.parametrize('name,official', [('debiformer_tiny', 2.64), ('debiformer_small', 5.40),
                                           ('debiformer_base', 11.69)])
def test_analytic_macs_reproduce_the_official_gmacs(name, official):
  macs = forward_macs(get_architecture(name), 224)
  assert abs(macs['total'] / 1e9 - official) <= 0.01 * official, macs
  assert macs['total'] == sum(v for k, v in macs.items() if k != 'total')
  assert train_flops(get_architecture(name), 224) == 6 * macs['total']


def run(capsys, argv):
  assert benchmark.main(argv) == 0
  out = capsys.readouterr().out.strip().splitlines()
  return out, json.loads(out[-1])


def test_inference_with_torch_comparison_prints_every_field(capsys, tmp_path):
  lines, result = run(capsys, ONE_STAGE + ['--mode', 'inference', '--compare-torch',
                                           '--profile', str(tmp_path)])
  table = '\n'.join(lines[:-1])
  for field in ('images/s (median)', 'compile time', 'GFLOPs/image, XLA', 'GFLOPs/image, analytic',
                'XLA / analytic', 'peak memory', 'MFU', 'PyTorch reference',
                'speed-up vs PyTorch', 'implementation'):
    assert field in table, field
  assert result['mode'] == 'inference' and result['batch'] == 2 and result['size'] == [28, 28]
  assert result['images_per_s'] > 0 and result['torch_images_per_s'] > 0
  assert result['speedup_vs_torch'] == pytest.approx(
      result['images_per_s'] / result['torch_images_per_s'])
  assert result['speedup_vs_torch_best'] > 0 and result['residual_bytes'] is None
  assert result['compile_s'] > 0 and result['memory']['peak'] > 0
  assert result['xla_flops_per_image'] > 0 and result['analytic_flops_per_image'] > 0
  assert len(result['times']['steps']) == 2
  assert 'auto' not in result['implementation'].values()  # resolved for the backend
  if jax.default_backend() == 'cpu':
    assert result['mfu'] is None and 'MFU' in table and 'n/a' in table
  assert {direction for _, direction, _, _ in result['profile']['parts']} == {'forward'}


def test_train_with_remat_compare_reports_both_memories_and_the_profile(capsys, tmp_path):
  lines, result = run(capsys, ONE_STAGE + ['--mode', 'train', '--remat', '--remat-compare',
                                           '--sampling', 'matmul', '--dense-routing', '0',
                                           '--profile', str(tmp_path)])
  assert result['mode'] == 'train' and result['implementation']['remat'] is True
  assert result['implementation']['sampling'] == 'matmul'
  assert result['implementation']['dense_routing'] == 0
  assert result['remat_other']['remat'] is False
  assert result['remat_other']['memory']['peak'] > 0
  assert result['analytic_flops_per_image'] == 3 * 2 * result['analytic_macs']
  table = '\n'.join(lines[:-1])
  assert 'peak memory, remat=False' in table and 'saved activations, remat=False' in table
  assert 0 < result['residual_bytes'] < result['remat_other']['residual_bytes']
  # The profile: a trace on disk, op time per (part, direction) that adds up to the total.
  prof = result['profile']
  assert prof['trace'].startswith(str(tmp_path)) and 'time per step by part' in table
  parts = {(part, direction) for part, direction, _, _ in prof['parts']}
  for part in ('attention (BRA / DBRA)', 'MLP', 'depthwise conv'):
    assert (part, 'forward') in parts and (part, 'backward') in parts, parts
  assert sum(ms for _, _, ms, _ in prof['parts']) == pytest.approx(prof['total_ms'])
  assert 0 < prof['matmul_ms'] < prof['total_ms']


def test_backbone_at_a_non_square_size_with_torch_comparison(capsys):
  """--features-only --size HxW: the dense backbone (auto_pad, n_win 8: the 7x9 map pads)."""
  lines, result = run(capsys, ONE_STAGE + ['--features-only', '--size', '28x36',
                                           '--compare-torch'])
  assert result['features_only'] and result['size'] == [28, 36]
  assert result['mode'] == 'inference' and result['torch_images_per_s'] > 0
  assert 'debiformer_tiny (backbone)' in lines[0] and '2 x 28x36' in '\n'.join(lines)
  overrides = dict(benchmark.build_parser().parse_args(ONE_STAGE).override)
  cfg = get_architecture('debiformer_tiny', backbone=True, **overrides)
  assert result['analytic_macs'] == forward_macs(cfg, 28, 36, head=False)['total']
  assert result['analytic_macs'] < forward_macs(cfg, 28, 36)['total']  # no head
  assert benchmark.main(ONE_STAGE + ['--features-only', '--mode', 'train']) == 2
  assert "use --mode inference" in capsys.readouterr().err


def test_bad_arguments_are_reported(capsys):
  assert benchmark.main(ONE_STAGE + ['--resolution', '30']) == 2
  assert 'does not split' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    benchmark.main(['--override', 'depths'])
  with pytest.raises(SystemExit):
    benchmark.main(['--size', '512by512'])
  assert 'HEIGHTxWIDTH' in capsys.readouterr().err


def test_peak_flops_table():
  assert benchmark.peak_flops('TPU v5 lite', 'bfloat16') == 197e12
  assert benchmark.peak_flops('TPU v4', 'float32') == 275e12
  assert benchmark.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert benchmark.peak_flops('NVIDIA A100-SXM4-40GB', 'float32') == 156e12
  assert benchmark.peak_flops('cpu', 'float32') is None

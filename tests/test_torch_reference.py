"""The PyTorch reference model against the official fixture, and the checkpoint reader."""

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from debiformer_jax.convert.reader import read_torch_state_dict
from debiformer_jax.models.architecture import BASE, SMALL, TINY, get_architecture
from debiformer_jax.reference import (build_torch_model, clear_routing_input,
                                      min_routing_margin, randomize_)
from debiformer_jax.reference.torch_debiformer import TopkRouter

FIXTURE = (Path(__file__).resolve().parents[1] / '..' / 'shared' / 'fixtures' /
           'official_debi_reduced').resolve()
CHECKPOINT = FIXTURE / 'debi_reduced_seed7.pth'
REDUCED = dataclasses.replace(TINY, depths=(1, 1, 1, 1))
# Small enough for quick forward/backward checks; every block kind still appears.
MINI = dataclasses.replace(REDUCED, widths=(32, 64, 64, 64), offset_groups=(1, 1, 2, 2),
                           num_classes=10)

torch.set_num_threads(2)


def _close(actual: np.ndarray, expected: np.ndarray) -> float:
  """max|actual - expected|, asserting it is within 1e-4 * max(1, max|expected|)."""
  assert actual.shape == expected.shape
  diff = float(np.abs(actual - expected).max())
  assert diff <= 1e-4 * max(1.0, float(np.abs(expected).max())), diff
  return diff


@pytest.fixture(scope='module')
def reduced_model():
  if not CHECKPOINT.exists():
    pytest.skip(f'official fixture not found at {FIXTURE} (expected ../shared beside the repo)')
  model = build_torch_model(REDUCED).eval()
  state = {k: torch.from_numpy(v) for k, v in read_torch_state_dict(CHECKPOINT).items()}
  for name, buffer in model.state_dict().items():
    if name.endswith('num_batches_tracked'):
      state[name] = buffer
  model.load_state_dict(state, strict=True)
  return model


def test_fixture_state_dict_names_and_shapes_match():
  if not CHECKPOINT.exists():
    pytest.skip(f'official fixture not found at {FIXTURE}')
  ours = build_torch_model(REDUCED).state_dict()
  with torch.serialization.safe_globals([argparse.Namespace]):
    official = torch.load(CHECKPOINT, map_location='cpu', weights_only=True)['model']
  assert list(ours) == list(official)
  assert {k: tuple(v.shape) for k, v in ours.items()} == \
         {k: tuple(v.shape) for k, v in official.items()}
  build_torch_model(REDUCED).load_state_dict(official, strict=True)


def test_fixture_stages_and_logits(reduced_model):
  x = torch.from_numpy(np.load(FIXTURE / 'input_nchw.npy'))
  with torch.no_grad():
    stages = reduced_model.forward_features(x)
    logits = reduced_model(x)
  for i, stage in enumerate(stages):
    _close(stage.numpy(), np.load(FIXTURE / f'stage{i}_nchw.npy'))
  _close(logits.numpy(), np.load(FIXTURE / 'logits.npy'))


def test_fixture_input_has_clear_routing(reduced_model):
  x = torch.from_numpy(np.load(FIXTURE / 'input_nchw.npy'))
  assert min_routing_margin(reduced_model, x) >= 5e-6


DENSE = FIXTURE.parent / 'official_dense_reduced'
DENSE_CHECKPOINT = DENSE / 'debi_reduced_dense_seed7.pth'
DENSE_REDUCED = get_architecture('debi_tiny', backbone=True, depths=(1, 1, 1, 1))


def test_dense_backbone_reproduces_the_official_dense_fixture():
  """The official segmentation backbone (n_win 8, auto_pad) at 200x328: names, order, shapes
  of its state dict, and all four normalised stage maps."""
  if not DENSE_CHECKPOINT.exists():
    pytest.skip(f'official fixture not found at {DENSE}')
  model = build_torch_model(DENSE_REDUCED, features_only=True).eval()
  with torch.serialization.safe_globals([argparse.Namespace]):
    official = torch.load(DENSE_CHECKPOINT, map_location='cpu', weights_only=True)['model']
  assert list(model.state_dict()) == list(official)
  model.load_state_dict(official, strict=True)
  x = torch.from_numpy(np.load(DENSE / 'input_nchw.npy'))
  with torch.no_grad():
    maps = model(x)
  assert len(maps) == 4
  for i, got in enumerate(maps):
    _close(got.numpy(), np.load(DENSE / f'feat{i}_nchw.npy'))
  # Regions of pure padding tie exactly; the margin is taken to the next strictly smaller score.
  assert min_routing_margin(model, x) >= 5e-6


def test_margin_is_measured_to_the_next_strictly_smaller_score():
  router = TopkRouter(qk_dim=1, topk=2)
  router.margins = []
  key = torch.tensor([[[3.0], [2.0], [2.0], [1.0]]])  # scores 3, 2, 2, 1 for query 1
  router(torch.ones(1, 1, 1), key)
  assert router.margins == [pytest.approx(1.0 / 3.0)]  # (2 - 1) / 3, not the tie's 0


def _count(cfg) -> int:
  with torch.device('meta'):
    return sum(p.numel() for p in build_torch_model(cfg).parameters())


@pytest.mark.parametrize('cfg, expected', [(TINY, 21_495_598), (SMALL, 44_008_028),
                                           (BASE, 95_501_926), (REDUCED, 15_422_422)])
def test_parameter_counts(cfg, expected):
  assert _count(cfg) == expected


def test_other_input_sizes():
  model = randomize_(build_torch_model(REDUCED), seed=0).eval()
  with torch.no_grad():
    assert model(torch.randn(1, 3, 448, 448)).shape == (1, 1000)
  with pytest.raises(ValueError, match='256x256'):
    model(torch.randn(1, 3, 256, 256))
  with pytest.raises(ValueError, match='channels'):
    model(torch.randn(1, 4, 224, 224))
  mini = randomize_(build_torch_model(MINI), seed=0).eval()
  with torch.no_grad():
    stages = mini.forward_features(torch.randn(1, 3, 224, 448))
  assert [tuple(s.shape[2:]) for s in stages] == [(56, 112), (28, 56), (14, 28), (7, 14)]


def test_drop_path_only_in_training():
  model = randomize_(build_torch_model(dataclasses.replace(MINI, drop_path_rate=0.5)), seed=1)
  x = torch.randn(2, 3, 224, 224)
  model.eval()
  with torch.no_grad():
    assert torch.equal(model(x), model(x))
  model.train()
  torch.manual_seed(0)
  a = model(x)
  b = model(x)
  assert not torch.allclose(a, b)
  a.sum().backward()
  assert all(p.grad is not None for p in model.parameters())


def test_randomize_is_deterministic():
  a = randomize_(build_torch_model(MINI), seed=3).state_dict()
  b = randomize_(build_torch_model(MINI), seed=3).state_dict()
  c = randomize_(build_torch_model(MINI), seed=4).state_dict()
  assert all(torch.equal(a[k], b[k]) for k in a)
  assert not torch.equal(a['head.weight'], c['head.weight'])
  var = a['norm.running_var']
  assert bool(((var >= 0.5) & (var <= 1.5)).all())
  assert abs(float(a['stages.0.0.norm1.weight'].mean()) - 1.0) < 0.1


def test_clear_routing_input():
  model = randomize_(build_torch_model(MINI), seed=5)
  x = clear_routing_input(model, (1, 3, 224, 224), seed=0)
  assert x.shape == (1, 3, 224, 224)
  assert model.training
  margin = min_routing_margin(model, x)
  assert 5e-6 <= margin < math.inf
  again = clear_routing_input(model, (1, 3, 224, 224), seed=0)
  assert torch.equal(x, again)
  with pytest.raises(RuntimeError, match='routing margin'):
    clear_routing_input(model, (1, 3, 224, 224), seed=0, margin=2.0, max_tries=2)


def test_margin_skips_routers_that_keep_every_region():
  every = dataclasses.replace(MINI, topk1=(-1,) * 4, topk2=(-1,) * 4)
  model = randomize_(build_torch_model(every), seed=6)
  assert min_routing_margin(model, torch.randn(1, 3, 224, 224)) == math.inf


# Reader.

def _state_dict():
  return {'conv.weight': torch.randn(4, 3, 1, 1), 'bn.running_mean': torch.randn(4),
          'bn.num_batches_tracked': torch.tensor(7)}


def _check(read, expected):
  assert set(read) == {'conv.weight', 'bn.running_mean'}
  for k, v in read.items():
    assert isinstance(v, np.ndarray) and v.dtype == np.float32
    np.testing.assert_array_equal(v, expected[k].float().numpy())


def test_reader_training_format(tmp_path):
  sd, ema = _state_dict(), _state_dict()
  param = torch.nn.Parameter(torch.zeros(3))
  opt = torch.optim.AdamW([param], lr=1e-3)
  param.grad = torch.ones(3)
  opt.step()
  path = tmp_path / 'ckpt.pth'
  torch.save({'model': sd, 'model_ema': ema, 'optimizer': opt.state_dict(),
              'lr_scheduler': {'last_epoch': 3}, 'epoch': 3, 'scaler': {'scale': 65536.0},
              'args': argparse.Namespace(model='debi_tiny', lr=5e-4, input_size=224)}, path)
  _check(read_torch_state_dict(path), sd)
  _check(read_torch_state_dict(str(path), ema=True), ema)


def test_reader_bare_prefix_and_fp16(tmp_path):
  sd = _state_dict()
  path = tmp_path / 'bare.pth'
  torch.save({'module.' + k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()},
             path)
  _check(read_torch_state_dict(path), {k: v.half() for k, v in sd.items()})
  torch.save({'state_dict': {k: v.bfloat16() for k, v in sd.items()}}, path)
  _check(read_torch_state_dict(path), {k: v.bfloat16() for k, v in sd.items()})


def test_reader_errors(tmp_path):
  path = tmp_path / 'bare.pth'
  torch.save(_state_dict(), path)
  with pytest.raises(ValueError, match='model_ema'):
    read_torch_state_dict(path, ema=True)

  with pytest.raises(FileNotFoundError, match='missing.pth'):
    read_torch_state_dict(tmp_path / 'missing.pth')

  data = path.read_bytes()
  corrupt = tmp_path / 'truncated.pth'
  corrupt.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='truncated.pth'):
    read_torch_state_dict(corrupt)
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='junk.pth'):
    read_torch_state_dict(junk)

  unsafe = tmp_path / 'unsafe.pth'
  torch.save({'model': _state_dict(), 'args': argparse.Namespace(out=Path('/tmp'))}, unsafe)
  with pytest.raises(ValueError, match='Path'):
    read_torch_state_dict(unsafe)

  mixed = tmp_path / 'mixed.pth'
  torch.save({'weights': _state_dict(), 'epoch': 3}, mixed)
  with pytest.raises(ValueError, match="'weights'"):
    read_torch_state_dict(mixed)


def test_reader_fixture():
  if not CHECKPOINT.exists():
    pytest.skip(f'official fixture not found at {FIXTURE}')
  state = read_torch_state_dict(CHECKPOINT)
  expected = [k for k in build_torch_model(REDUCED).state_dict()
              if not k.endswith('num_batches_tracked')]
  assert list(state) == expected
  assert state['stages.0.0.attn2.rpe_table'].shape == (2, 111, 111)

"""visualize: the --dump arrays against the PyTorch reference and the full captured attention,
the figure, and the errors a user can make."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from debiformer_jax import classifier, visualize, weights
from debiformer_jax.convert import convert_state_dict
from debiformer_jax.models import DeBiFormer
from debiformer_jax.models.architecture import TINY
from debiformer_jax.reference import build_torch_model, clear_routing_input, randomize_
from debiformer_jax.reference.torch_debiformer import routing_internals

# Every kind of attention (BRA, routed DBRA, unrouted DBRA as attn1 and attn2) on a 64x64
# input: stage maps 16, 8, 4, 2 and deformable grids 2x2, split into 2x2 regions.
SMALL = dataclasses.replace(TINY, depths=(1, 1, 1, 1), widths=(32, 64, 64, 64), n_win=2,
                            topk1=(1, 2, 3, -1), topk2=(2, 3, 3, -1), offset_groups=(1, 1, 2, 2),
                            rpe_sizes=(16, 8, 4, 2), num_classes=10)
SIZE = 64

torch.set_num_threads(2)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """(PyTorch reference model, a converted directory of the same weights)."""
  torch_model = randomize_(build_torch_model(SMALL), seed=3).eval()
  variables = convert_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()},
                                 SMALL)
  directory = weights.save(str(tmp_path_factory.mktemp('vis') / 'converted'), variables,
                           model_name='debiformer_tiny', architecture=dataclasses.asdict(SMALL),
                           metadata={'image_size': SIZE, 'crop_pct': 1.0,
                                     'class_names': [f'class {i}' for i in range(10)]})
  return torch_model, directory


def _captured(directory, images):
  """{'stages.{s}.{b}.attn{k}': {'r_idx'|'pos'|'attn': array}} of a plain Flax forward."""
  clf = classifier.load(directory)
  _, state = jax.jit(lambda v, x: clf.model.apply(v, x, mutable=['intermediates']))(
      clf.variables, images)
  out = {}
  for block, modules in state['intermediates'].items():
    stage, index = block[len('stage'):].split('_block')
    for name, values in modules.items():
      out[f'stages.{stage}.{index}.{name}'] = {k: np.asarray(v[0]) for k, v in values.items()}
  return out


def test_dump_matches_the_reference_and_the_full_attention(converted, tmp_path):
  torch_model, directory = converted
  x = clear_routing_input(torch_model, (2, 3, SIZE, SIZE), seed=0)
  images = x.numpy().transpose(0, 2, 3, 1).astype(np.float32)
  np.save(tmp_path / 'x.npy', images)
  pixel = (37, 21)
  assert visualize.main(['--weights', directory, '--array', str(tmp_path / 'x.npy'),
                         '--out', str(tmp_path / 'fig.png'), '--dump', str(tmp_path / 'd.npz'),
                         '--pixel', f'{pixel[0]},{pixel[1]}']) == 0
  dump = dict(np.load(tmp_path / 'd.npz'))

  expected = routing_internals(torch_model, x)
  assert {k for k in dump if not k.endswith('/attn')} == set(expected)
  for key, want in expected.items():
    assert dump[key].shape == want.shape, key
    if key.endswith('/r_idx'):
      assert np.issubdtype(dump[key].dtype, np.integer), key
      np.testing.assert_array_equal(dump[key], want, err_msg=key)
    else:
      np.testing.assert_allclose(dump[key], want, atol=1e-5, rtol=0, err_msg=key)

  full = _captured(directory, images)
  dbras = {k for k, v in full.items() if 'pos' in v}
  assert {k[:-len('/attn')] for k in dump if k.endswith('/attn')} == dbras
  assert len(dbras) == 5  # attn2 of every stage, attn1 of the last.
  for name in dbras:
    stage = int(name.split('.')[1])
    attn, r = dump[f'{name}/attn'], 2 ** (stage + 2)
    assert attn.shape == (2, SMALL.num_heads[stage], 2, 2), name
    np.testing.assert_allclose(attn.sum(axis=(2, 3)), 1.0, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(attn, full[name]['attn'][:, :, pixel[0] // r, pixel[1] // r],
                               atol=1e-6, rtol=0, err_msg=name)

  with Image.open(tmp_path / 'fig.png') as fig:
    fig.verify()
    assert fig.format == 'PNG' and min(fig.size) > 100


def test_an_image_file_goes_through_the_eval_transform(converted, tmp_path):
  _, directory = converted
  photo = tmp_path / 'photo.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), np.uint8)).save(photo)
  assert visualize.main(['--weights', directory, '--image', str(photo), '--query', '0,1',
                         '--out', str(tmp_path / 'fig.png'),
                         '--dump', str(tmp_path / 'd.npz')]) == 0
  dump = dict(np.load(tmp_path / 'd.npz'))
  clf = classifier.load(directory)
  full = _captured(directory, classifier.preprocess([classifier.read_image(str(photo))],
                                                    clf.preprocessing))
  pixel = (16, 48)  # The centre of region (0, 1) of the 2x2 grid over 64x64.
  for name, values in full.items():
    stage = int(name.split('.')[1])
    for key, value in values.items():
      if key == 'attn':
        value = value[:, :, pixel[0] // 2 ** (stage + 2), pixel[1] // 2 ** (stage + 2)]
      np.testing.assert_allclose(dump[f'{name}/{key}'], value, atol=1e-6, err_msg=name)
  with Image.open(tmp_path / 'fig.png') as fig:
    fig.verify()


@pytest.mark.parametrize('args, message', [
    (['--query', '2,0'], 'outside the 2x2 region grid'),
    (['--query', '0,-1'], 'outside the 2x2 region grid'),
    (['--pixel', '10,64'], 'outside the 64x64 input'),
])
def test_a_query_off_the_grid_is_refused(converted, tmp_path, capsys, args, message):
  _, directory = converted
  np.save(tmp_path / 'x.npy', np.zeros((1, SIZE, SIZE, 3), np.float32))
  out = tmp_path / 'fig.png'
  assert visualize.main(['--weights', directory, '--array', str(tmp_path / 'x.npy'),
                         '--out', str(out)] + args) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and message in err and not out.exists()


@pytest.mark.parametrize('array, message', [
    (np.zeros((1, SIZE, SIZE, 3), np.float64), 'float64'),
    (np.zeros((SIZE, SIZE, 3), np.float32), 'add a batch axis'),
    (np.zeros((1, 3, SIZE, SIZE), np.float32), 'transpose NCHW'),
])
def test_an_array_of_another_kind_is_refused(converted, tmp_path, capsys, array, message):
  _, directory = converted
  np.save(tmp_path / 'x.npy', array)
  assert visualize.main(['--weights', directory, '--array', str(tmp_path / 'x.npy'),
                         '--out', str(tmp_path / 'fig.png')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and message in err


def test_a_file_that_is_not_an_image_is_refused(converted, tmp_path, capsys):
  _, directory = converted
  notes = tmp_path / 'notes.jpg'
  notes.write_text('not a picture')
  assert visualize.main(['--weights', directory, '--image', str(notes),
                         '--out', str(tmp_path / 'fig.png')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and str(notes) in err


def test_an_export_cannot_be_visualised(tmp_path, capsys):
  (tmp_path / 'export').mkdir()
  (tmp_path / 'export' / classifier.ARTIFACT_FILE).write_text(json.dumps(
      {'format': 'debiformer-jax-export', 'version': 1}))
  assert visualize.main(['--weights', str(tmp_path / 'export'), '--image', 'any.png',
                         '--out', str(tmp_path / 'fig.png')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'exported artifact' in err

"""predict: image files of every mode classified as model.apply does on the eval transform, bad
files reported one line each while the others are classified, the output formats, an export."""

import csv
import dataclasses
import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from debiformer_jax import classifier, export, predict, weights
from debiformer_jax.models import DeBiFormer
from debiformer_jax.models.architecture import TINY

# Two narrow stages (BRA then DBRA), 32x32 input, 10 classes: the demo's shape of network.
ARCH = dataclasses.replace(
    TINY, depths=(1, 1), widths=(32, 64), mlp_ratios=(2, 2), dbra_mlp_ratios=(2, 2), n_win=4,
    attn1_deformable=(False, True), topk1=(4, -1), topk2=(4, -1), offset_groups=(1, 2),
    offset_kernels=(5, 3), offset_strides=(2, 1), rpe_sizes=(8, 4), num_classes=10)
NAMES = [f'digit {i}' for i in range(10)]


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  variables = weights.init_variables(DeBiFormer(ARCH), jax.random.PRNGKey(1))
  return weights.save(str(tmp_path_factory.mktemp('predict') / 'converted'), variables,
                      model_name='debiformer_tiny', architecture=dataclasses.asdict(ARCH),
                      metadata={'image_size': 32, 'crop_pct': 0.875, 'class_names': NAMES})


def _pixels(seed, h=40, w=52):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """Good files of every mode issue 13 names, and three that are not images."""
  d = tmp_path_factory.mktemp('images')
  Image.fromarray(_pixels(0)).save(d / 'a_rgb.png')
  Image.fromarray(_pixels(1)[:, :, 0]).save(d / 'b_gray.png')
  Image.fromarray(np.dstack([_pixels(2), np.full((40, 52), 90, np.uint8)])).save(d / 'c_rgba.png')
  Image.fromarray(_pixels(3)).convert('CMYK').save(d / 'd_cmyk.jpg', quality=95)
  Image.fromarray((_pixels(4)[:, :, 0].astype(np.uint16) * 257).astype(np.uint16)).save(
      d / 'e_16bit.png')
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  Image.fromarray(_pixels(5)).save(d / 'f_exif.jpg', quality=95, exif=exif)
  (d / 'x_text.png').write_text('not an image')
  (d / 'y_empty.jpg').write_bytes(b'')
  buf = io.BytesIO()
  Image.fromarray(_pixels(6)).save(buf, format='JPEG')
  (d / 'z_truncated.jpg').write_bytes(buf.getvalue()[:200])
  return d


def test_image_modes_are_read_as_rgb(images):
  shapes = {p.name: classifier.read_image(str(p)).shape for p in sorted(images.iterdir())
            if p.name[0] < 'x'}
  assert shapes == {'a_rgb.png': (40, 52, 3), 'b_gray.png': (40, 52, 3),
                    'c_rgba.png': (40, 52, 3), 'd_cmyk.jpg': (40, 52, 3),
                    'e_16bit.png': (40, 52, 3), 'f_exif.jpg': (52, 40, 3)}  # EXIF rotated.
  gray = classifier.read_image(str(images / 'b_gray.png'))
  np.testing.assert_array_equal(gray[:, :, 0], _pixels(1)[:, :, 0])
  np.testing.assert_array_equal(classifier.read_image(str(images / 'e_16bit.png'))[:, :, 0],
                                _pixels(4)[:, :, 0])  # High byte of v * 257 is v.
  np.testing.assert_array_equal(classifier.read_image(str(images / 'c_rgba.png')), _pixels(2))


def test_predict_classifies_good_files_and_reports_bad_ones(converted, images, capsys):
  assert predict.main(['--weights', converted, str(images), '--format', 'json', '--topk', '3',
                       '--batch', '4']) == 1
  captured = capsys.readouterr()
  results = {r['file'].split('/')[-1]: r['predictions'] for r in
             json.loads(captured.out)['results']}
  assert sorted(results) == ['a_rgb.png', 'b_gray.png', 'c_rgba.png', 'd_cmyk.jpg',
                             'e_16bit.png', 'f_exif.jpg']
  errors = [line for line in captured.err.splitlines() if line.startswith('error: ')]
  assert len(errors) == 3
  for name in ('x_text.png', 'y_empty.jpg', 'z_truncated.jpg'):
    assert sum(name in line for line in errors) == 1, (name, errors)

  # The same numbers as model.apply on the eval transform of the same pixels.
  clf = classifier.load(converted)
  files = sorted(str(p) for p in images.iterdir() if p.name in results)
  x = classifier.preprocess([classifier.read_image(f) for f in files], clf.preprocessing)
  logits = np.asarray(clf.model.apply(clf.variables, x, train=False), np.float64)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  for f, p in zip(files, probs):
    got = results[f.split('/')[-1]]
    assert [g['rank'] for g in got] == [1, 2, 3]
    assert [g['class_id'] for g in got] == list(np.argsort(-p, kind='stable')[:3])
    assert [g['class_name'] for g in got] == [NAMES[g['class_id']] for g in got]
    np.testing.assert_allclose([g['probability'] for g in got], np.sort(p)[::-1][:3],
                               atol=1e-5)


def test_csv_and_table_formats(converted, images, capsys):
  good = [str(images / 'a_rgb.png'), str(images / 'b_gray.png')]
  assert predict.main(['--weights', converted, *good, '--format', 'csv', '--topk', '2']) == 0
  rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
  assert [(r['file'], r['rank']) for r in rows] == [(good[0], '1'), (good[0], '2'),
                                                   (good[1], '1'), (good[1], '2')]
  assert all(r['class_name'] == NAMES[int(r['class_id'])] for r in rows)
  assert predict.main(['--weights', converted, good[0]]) == 0
  table = capsys.readouterr().out
  assert good[0] in table and sum(name in table for name in NAMES) == 5


def test_bad_weights_and_missing_inputs(converted, tmp_path, capsys):
  assert predict.main(['--weights', str(tmp_path / 'nothing'), 'a.png']) == 2
  assert capsys.readouterr().err.startswith('error: ')
  assert predict.main(['--weights', converted, str(tmp_path / 'missing.png')]) == 1
  assert 'missing.png' in capsys.readouterr().err


def test_an_export_predicts_what_its_weights_predict(converted, images, tmp_path, capsys):
  out = export.write(classifier.load(converted), str(tmp_path / 'exported'))
  good = [str(images / n) for n in ('a_rgb.png', 'd_cmyk.jpg', 'f_exif.jpg')]
  runs = []
  for source in (converted, out):
    assert predict.main(['--weights', source, *good, '--format', 'json']) == 0
    runs.append(json.loads(capsys.readouterr().out)['results'])
  for a, b in zip(*runs):
    assert [p['class_id'] for p in a['predictions']] == [p['class_id'] for p in b['predictions']]
    np.testing.assert_allclose([p['probability'] for p in a['predictions']],
                               [p['probability'] for p in b['predictions']], atol=1e-5)


def test_predict_on_a_trained_demo_workdir_gives_its_eval_accuracy(tmp_path, capsys):
  """The demo trained briefly on the digits; predict on its held-out PNGs (the val split) from
  the workdir scores the top-1 accuracy eval reported for that checkpoint."""
  from debiformer_jax import train
  from tests import _train_testlib as lib
  lib.use_compilation_cache()
  workdir = str(tmp_path / 'demo')
  run = train.train_and_evaluate(lib.small_config(num_train_steps=40), workdir)
  assert list(run['eval']) == [40]
  eval_top1 = run['eval'][40]['eval/top1']
  val = tmp_path / 'demo' / 'digits' / 'val'
  assert predict.main(['--weights', workdir, str(val), '--format', 'json', '--topk', '1']) == 0
  doc = json.loads(capsys.readouterr().out)
  assert 'step 40' in doc['weights']
  labels = [r['file'].split('/')[-2] for r in doc['results']]
  guesses = [r['predictions'][0]['class_name'] for r in doc['results']]
  assert len(labels) == run['eval'][40]['eval/num_examples'] == 359
  assert 0.2 < eval_top1 < 1.0  # Trained, not yet perfect: predictions that can disagree.
  assert np.mean(np.array(labels) == np.array(guesses)) == pytest.approx(eval_top1, abs=1e-6)

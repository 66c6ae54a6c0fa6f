"""Export: the stablehlo artifact and the SavedModel reproduce model.apply at any batch and
reload without our code, the SavedModel serves encoded images as predict classifies them, and
the CLI refuses a non-empty output, an unknown weights directory or a bad --topk."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from debiformer_jax import classifier, export, predict, weights
from debiformer_jax.models import DeBiFormer, get_architecture

DEMO = dict(depths=(1, 1), widths=(32, 64), mlp_ratios=(2, 2), dbra_mlp_ratios=(2, 2), n_win=4,
            attn1_deformable=(False, True), topk1=(4, -1), topk2=(4, -1), offset_groups=(1, 2),
            offset_kernels=(5, 3), offset_strides=(2, 1), rpe_sizes=(8, 4), num_classes=10)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  model = DeBiFormer(get_architecture('debiformer_tiny', **DEMO))
  variables = weights.init_variables(model, jax.random.PRNGKey(0))
  clf = classifier.Classifier(
      class_names=tuple('abcdefghij'), preprocessing=classifier.Preprocessing(32, 1.0),
      logits_fn=None, model=model, variables=variables, model_name='debiformer_tiny',
      description='test')
  out = export.write(clf, str(tmp_path_factory.mktemp('x') / 'out'))
  return model, variables, out


def _images(n):
  return np.random.RandomState(n).randn(n, 32, 32, 3).astype(np.float32)


def test_reloaded_artifact_matches_model_apply(exported):
  model, variables, out = exported
  loaded = export.load_artifact(out)
  assert loaded.model is None and loaded.class_names == tuple('abcdefghij')
  assert loaded.preprocessing.image_size == 32
  for n in (1, 3, 8):
    want = np.asarray(model.apply(variables, _images(n), train=False))
    np.testing.assert_allclose(loaded.logits_fn(_images(n)), want, atol=1e-5, rtol=0)


def test_artifact_runs_with_jax_alone(exported, tmp_path):
  model, variables, out = exported
  np.save(tmp_path / 'x.npy', _images(3))
  script = ('import sys, jax, numpy as np\n'
            f'e = jax.export.deserialize(bytearray(open({out!r} + "/model.jax_export", "rb")'
            '.read()))\n'
            f'np.save({str(tmp_path / "y.npy")!r}, np.asarray(e.call(np.load('
            f'{str(tmp_path / "x.npy")!r}))))\n'
            'assert not [m for m in sys.modules if m.startswith(("flax", "debiformer_jax"))]\n')
  subprocess.run([sys.executable, '-c', script], check=True, cwd=str(tmp_path))
  want = np.asarray(model.apply(variables, _images(3), train=False))
  np.testing.assert_allclose(np.load(tmp_path / 'y.npy'), want, atol=1e-5, rtol=0)


def test_cli_refuses_a_non_empty_output_and_unknown_weights(exported, tmp_path, capsys):
  _, _, out = exported
  assert export.main(['--weights', str(tmp_path), '--out', str(tmp_path / 'new')]) == 2
  assert 'error: ' in capsys.readouterr().err and not os.path.exists(tmp_path / 'new')
  with pytest.raises(FileExistsError, match='not empty'):
    export.write(_fake(), out)


def _fake():
  model = DeBiFormer(get_architecture('debiformer_tiny', **DEMO))
  return classifier.Classifier(class_names=(), preprocessing=classifier.Preprocessing(32, 1.0),
                               logits_fn=None, model=model, variables=None, model_name='m',
                               description='fake')


# ---------------------------------------------------------------------------------------------
# SavedModel.

@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  model = DeBiFormer(get_architecture('debiformer_tiny', **DEMO))
  variables = weights.init_variables(model, jax.random.PRNGKey(3))
  clf = classifier.Classifier(
      class_names=tuple(f'class {c}' for c in 'abcdefghij'),
      preprocessing=classifier.Preprocessing(32, 0.875),
      logits_fn=lambda x: np.asarray(model.apply(variables, x, train=False)), model=model,
      variables=variables, model_name='debiformer_tiny', description='test')
  return clf, export.write(clf, str(tmp_path_factory.mktemp('sm') / 'out'), kind='savedmodel',
                           topk=3)


def test_savedmodel_logits_match_model_apply(saved):
  clf, out = saved
  loaded = export.load_artifact(out)
  assert loaded.model is None and loaded.class_names == clf.class_names
  assert loaded.preprocessing == clf.preprocessing and 'savedmodel export' in loaded.description
  for n in (1, 3, 8):
    want = np.asarray(clf.model.apply(clf.variables, _images(n), train=False))
    np.testing.assert_allclose(loaded.logits_fn(_images(n)), want, atol=1e-5, rtol=0)


def test_savedmodel_serves_image_bytes_as_predict_classifies_them(saved, tmp_path):
  """The serving signature, run by TensorFlow without our code on encoded files, gives
  predict's top-k (EXIF rotation aside: tf.io does not apply it)."""
  clf, out = saved
  rng = np.random.default_rng(0)
  pixels = [rng.integers(0, 256, (40 + 3 * i, 52 - 2 * i, 3), dtype=np.uint8) for i in range(5)]
  files = [tmp_path / n for n in ('rgb.png', 'gray.png', 'rgba.png', 'big16.png', 'rgb.jpg')]
  Image.fromarray(pixels[0]).save(files[0])
  Image.fromarray(pixels[1][:, :, 0]).save(files[1])
  Image.fromarray(np.dstack([pixels[2], pixels[2][:, :, 0]])).save(files[2])
  Image.fromarray(pixels[3][:, :, 0].astype(np.uint16) * 257).save(files[3])
  Image.fromarray(pixels[4]).save(files[4], quality=95)
  script = ('import sys, numpy as np, tensorflow as tf\n'
            f'serve = tf.saved_model.load({out!r}).signatures["serving_default"]\n'
            f'files = {[str(f) for f in files]!r}\n'
            'r = serve(image_bytes=tf.constant([open(f, "rb").read() for f in files]))\n'
            'r = {k: v.numpy() for k, v in r.items()}\n'
            'r["class_names"] = r["class_names"].astype("S")\n'
            f'np.savez({str(tmp_path / "r.npz")!r}, **r)\n'
            'assert not [m for m in sys.modules if m.startswith(("flax", "debiformer_jax"))]\n')
  subprocess.run([sys.executable, '-c', script], check=True, cwd=str(tmp_path))
  served = np.load(tmp_path / 'r.npz')
  assert served['class_ids'].shape == (5, 3) and served['class_ids'].dtype == np.int32
  for f, (path, probs) in zip(files, predict.classify(clf, [str(f) for f in files], batch=8)):
    assert path == str(f)
    ids, p = zip(*predict.top_k(probs, 3))
    i = files.index(f)
    np.testing.assert_array_equal(served['class_ids'][i], ids)
    assert [n.decode() for n in served['class_names'][i]] == [clf.class_names[j] for j in ids]
    np.testing.assert_allclose(served['probabilities'][i], p, atol=1e-5)


def test_export_cli_writes_a_savedmodel_predict_takes(saved, tmp_path, capsys):
  clf, _ = saved
  source = weights.save(str(tmp_path / 'converted'), clf.variables, model_name='debiformer_tiny',
                        architecture=dataclasses.asdict(clf.model.config),
                        metadata={'image_size': 32, 'crop_pct': 0.875,
                                  'class_names': list(clf.class_names)})
  out = str(tmp_path / 'sm')
  assert export.main(['--weights', source, '--out', out, '--format', 'savedmodel',
                      '--topk', '2']) == 0
  assert capsys.readouterr().out.strip() == f'wrote {out}'
  with open(os.path.join(out, classifier.ARTIFACT_FILE)) as f:
    meta = json.load(f)
  assert meta['kind'] == 'savedmodel' and meta['topk'] == 2
  image = tmp_path / 'x.png'
  Image.fromarray(np.full((36, 30, 3), 77, np.uint8)).save(image)
  runs = []
  for weights_dir in (source, out):
    assert predict.main(['--weights', weights_dir, str(image), '--format', 'json']) == 0
    runs.append(json.loads(capsys.readouterr().out)['results'][0]['predictions'])
  assert [p['class_id'] for p in runs[0]] == [p['class_id'] for p in runs[1]]
  assert export.main(['--weights', source, '--out', str(tmp_path / 'k0'), '--format',
                      'savedmodel', '--topk', '0']) == 2
  assert 'topk must be a positive' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'k0')

"""Export: the stablehlo artifact reproduces model.apply at any batch, reloads without our
code, and the CLI refuses a non-empty output or an unknown weights directory."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from debiformer_jax import classifier, export, weights
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

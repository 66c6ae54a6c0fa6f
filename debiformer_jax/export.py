r"""Export a trained DeBiFormer as a self-contained `jax.export` artifact.

  python -m debiformer_jax.export --weights DIR --out OUT [--image-size N]

OUT (new or empty) receives `model.jax_export`, the serialised `jax.export.Exported` of the
forward with the weights baked in as constants: input (b, S, S, 3) float32 normalised NHWC
images with a symbolic batch b, output (b, classes) float32 logits, lowered for CPU, TPU and
CUDA. It reloads with jax alone:

  exported = jax.export.deserialize(open('OUT/model.jax_export', 'rb').read())
  logits = exported.call(images)

`artifact.json` holds the model name, class names and preprocessing. `load_artifact` turns OUT
back into a `classifier.Classifier` (without model or variables), so `predict` takes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from debiformer_jax import classifier
from debiformer_jax.data import augment

FORMAT = 'debiformer-jax-export'
MODEL_FILE = 'model.jax_export'
PLATFORMS = ('cpu', 'tpu', 'cuda')


def export_stablehlo(clf: classifier.Classifier, image_size: int) -> jax.export.Exported:
  """The forward of `clf` (weights as constants) for (b, image_size, image_size, 3) float32."""
  model, variables = clf.model, clf.variables
  model.config.check_input_size(image_size, image_size)
  batch, = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((batch, image_size, image_size, model.config.in_chans),
                              jnp.float32)
  forward = jax.jit(lambda x: model.apply(variables, x, train=False).astype(jnp.float32))
  return jax.export.export(forward, platforms=PLATFORMS)(spec)


def write(clf: classifier.Classifier, out: str, image_size: int | None = None) -> str:
  """Exports `clf` into the new or empty directory `out` (via a temporary sibling renamed
  into place when complete); returns `out` made absolute."""
  if clf.model is None:
    raise ValueError(f'{clf.description} is already an export; export the weights it came '
                     f'from instead.')
  out = os.path.abspath(out)
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise FileExistsError(f'{out} exists and is not empty; choose a new or empty output '
                          f'directory.')
  size = image_size or clf.preprocessing.image_size
  exported = export_stablehlo(clf, size)
  meta = {'format': FORMAT, 'version': 1, 'model_name': clf.model_name,
          'class_names': list(clf.class_names), 'kind': 'stablehlo',
          'preprocessing': {'image_size': size, 'crop_pct': clf.preprocessing.crop_pct,
                            'mean': list(augment.MEAN_RGB), 'std': list(augment.STD_RGB)},
          'platforms': list(exported.platforms), 'source': clf.description}
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{name}.writing-', dir=parent)
  try:
    with open(os.path.join(staging, MODEL_FILE), 'wb') as f:
      f.write(exported.serialize())
    with open(os.path.join(staging, classifier.ARTIFACT_FILE), 'w') as f:
      json.dump(meta, f, indent=2)
    if os.path.isdir(out):
      os.rmdir(out)
    os.replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out


def load_artifact(directory: str) -> classifier.Classifier:
  """The export in `directory` as a Classifier (model=None, variables=None)."""
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, classifier.ARTIFACT_FILE)) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT or meta.get('kind') != 'stablehlo':
    raise ValueError(f'{directory}/{classifier.ARTIFACT_FILE} is not a stablehlo export of '
                     f'this version (format {meta.get("format")!r}, kind {meta.get("kind")!r}).')
  with open(os.path.join(directory, MODEL_FILE), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  prep = meta['preprocessing']

  def logits_fn(images: np.ndarray) -> np.ndarray:
    return np.asarray(exported.call(jnp.asarray(images, jnp.float32)))

  return classifier.Classifier(
      class_names=tuple(meta['class_names']),
      preprocessing=classifier.Preprocessing(image_size=prep['image_size'],
                                             crop_pct=prep['crop_pct']),
      logits_fn=logits_fn, model=None, variables=None, model_name=meta['model_name'],
      description=f'export {directory} of {meta["source"]}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m debiformer_jax.export',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--weights', required=True,
                      help='training workdir or converted weights directory')
  parser.add_argument('--out', required=True, help='new or empty output directory')
  parser.add_argument('--image-size', type=int, default=None,
                      help="square input side (default: the weights' own)")
  args = parser.parse_args(argv)
  try:
    clf = classifier.load(args.weights)
    out = write(clf, args.out, args.image_size)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

r"""Export a trained DeBiFormer for serving: a `jax.export` artifact or a TensorFlow SavedModel.

  python -m debiformer_jax.export --weights DIR --out OUT [--format stablehlo|savedmodel]
      [--image-size N] [--topk K]

Both formats bake the weights in as constants, take a symbolic batch and are lowered for CPU,
TPU and CUDA; `artifact.json` in OUT records the model name, class names and preprocessing, and
`load_artifact` turns OUT back into a `classifier.Classifier` (without model or variables), so
`predict` takes either.

`stablehlo` (default): OUT/model.jax_export, the serialised `jax.export.Exported` of the forward,
(b, S, S, 3) float32 normalised NHWC images -> (b, classes) float32 logits. It reloads with jax
alone:

  exported = jax.export.deserialize(open('OUT/model.jax_export', 'rb').read())
  logits = exported.call(images)

`savedmodel`: a TensorFlow SavedModel in OUT (for TF Serving: copy it to `MODEL/1/`) with two
signatures:
  serving_default  image_bytes: string (b,) encoded JPEG/PNG/GIF/BMP files ->
                   class_ids int32 (b, K), class_names string (b, K), probabilities float32
                   (b, K), most probable first; decoding and the eval pipeline's resize and
                   centre crop (`augment.eval_image`) are inside.
  logits           images: float32 (b, S, S, 3) normalised NHWC -> logits float32 (b, classes).
The forward runs as one XlaCallModule op (the same StableHLO, written at a version TensorFlow
reads).
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
KINDS = ('stablehlo', 'savedmodel')
MODEL_FILE = 'model.jax_export'
PLATFORMS = ('cpu', 'tpu', 'cuda')
# The newest StableHLO the pinned TensorFlow's XlaCallModule deserialises (tensorflow 2.21
# names it when given newer bytecode); older versions of a portable artifact stay readable.
TF_STABLEHLO_VERSION = '1.13.7'


def export_stablehlo(clf: classifier.Classifier, image_size: int) -> jax.export.Exported:
  """The forward of `clf` (weights as constants) for (b, image_size, image_size, 3) float32."""
  model, variables = clf.model, clf.variables
  model.config.check_input_size(image_size, image_size)
  batch, = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((batch, image_size, image_size, model.config.in_chans),
                              jnp.float32)
  forward = jax.jit(lambda x: model.apply(variables, x, train=False).astype(jnp.float32))
  return jax.export.export(forward, platforms=PLATFORMS)(spec)


def _tensorflow_module(exported: jax.export.Exported) -> bytes:
  """`exported`'s StableHLO as TensorFlow's XlaCallModule reads it.

  JAX wraps chlo.erf (GELU) and chlo.top_k (routing) in stablehlo.composite ops, whose bodies
  XlaCallModule's shape refinement does not reach: with a symbolic batch they stay dynamic
  and it refuses the module. They are replaced by calls to their decompositions and inlined,
  and the module is written as StableHLO TF_STABLEHLO_VERSION.
  """
  from jax.extend import mlir as jax_mlir  # pylint: disable=g-import-not-at-top
  from jax.extend.mlir import passmanager  # pylint: disable=g-import-not-at-top
  from jax.extend.mlir.dialects import stablehlo  # pylint: disable=g-import-not-at-top
  # JAX's own IR context (every dialect an export holds); jax.extend offers none with `func`.
  from jax._src.interpreters import mlir as jax_ir  # pylint: disable=g-import-not-at-top
  stablehlo.register_stablehlo_passes()
  with jax_ir.make_ir_context():
    module = jax_mlir.deserialize_portable_artifact(exported.mlir_module_serialized)
    passmanager.PassManager.parse(
        'builtin.module(func.func(stablehlo-legalize-composite-to-call), inline, symbol-dce)'
    ).run(module.operation)
    text = module.operation.get_asm(enable_debug_info=True)
  return jax_mlir.serialize_portable_artifact(text, TF_STABLEHLO_VERSION)


def _tensorflow_forward(exported: jax.export.Exported):
  """`exported` (one float32 input, one float32 output) as a TensorFlow function of tensors,
  one XlaCallModule op running `_tensorflow_module(exported)`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.compiler.tf2xla.python import xla as tfxla  # pylint: disable=g-import-not-at-top
  (out_aval,) = exported.out_avals
  module = _tensorflow_module(exported)
  out_shape = tuple(d if isinstance(d, int) else None for d in out_aval.shape)

  def forward(images):
    (logits,) = tfxla.call_module(
        [images], version=exported.calling_convention_version, module=module,
        Tout=[tf.float32], Sout=[out_shape], function_list=[], has_token_input_output=False,
        platforms=[p.upper() for p in exported.platforms],
        disabled_checks=[str(c) for c in exported.disabled_safety_checks],
        use_shardy_partitioner=jax.config.jax_use_shardy_partitioner)
    return logits

  return forward


def _save_savedmodel(clf: classifier.Classifier, exported: jax.export.Exported, out: str,
                     k: int) -> None:
  """Writes the SavedModel of the module doc (top `k` classes) into the empty directory
  `out`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  size, crop_pct = exported.in_avals[0].shape[1], clf.preprocessing.crop_pct
  forward = _tensorflow_forward(exported)
  names = tf.constant(list(clf.class_names))

  def prepare(data):
    return augment.eval_image(augment.decode_image(data), size, crop_pct)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='image_bytes')])
  def serve(image_bytes):
    images = tf.map_fn(prepare, image_bytes,
                       fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
    top = tf.math.top_k(tf.nn.softmax(forward(images)), k=k)
    return {'class_ids': top.indices, 'class_names': tf.gather(names, top.indices),
            'probabilities': top.values}

  @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32,
                                              name='images')])
  def logits(images):
    return {'logits': forward(images)}

  module = tf.Module()
  module.serve, module.logits = serve, logits
  tf.saved_model.save(module, out, signatures={'serving_default': serve, 'logits': logits})


def write(clf: classifier.Classifier, out: str, image_size: int | None = None, *,
          kind: str = 'stablehlo', topk: int = 5) -> str:
  """Exports `clf` as `kind` (KINDS; `topk` classes per image for a SavedModel) into the new
  or empty directory `out`, via a temporary sibling renamed into place when complete;
  returns `out` made absolute."""
  if clf.model is None:
    raise ValueError(f'{clf.description} is already an export; export the weights it came '
                     f'from instead.')
  if kind not in KINDS:
    raise ValueError(f'unknown export format {kind!r}; choose one of {", ".join(KINDS)}.')
  if topk < 1:
    raise ValueError(f'topk must be a positive number of classes, not {topk}.')
  out = os.path.abspath(out)
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise FileExistsError(f'{out} exists and is not empty; choose a new or empty output '
                          f'directory.')
  size = image_size or clf.preprocessing.image_size
  exported = export_stablehlo(clf, size)
  meta = {'format': FORMAT, 'version': 1, 'model_name': clf.model_name,
          'class_names': list(clf.class_names), 'kind': kind,
          'preprocessing': {'image_size': size, 'crop_pct': clf.preprocessing.crop_pct,
                            'mean': list(augment.MEAN_RGB), 'std': list(augment.STD_RGB)},
          'platforms': list(exported.platforms), 'source': clf.description}
  if kind == 'savedmodel':
    meta['topk'] = min(topk, len(clf.class_names))  # The serving signature's k.
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{name}.writing-', dir=parent)
  try:
    if kind == 'savedmodel':
      _save_savedmodel(clf, exported, staging, meta['topk'])
    else:
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
  """The export in `directory` as a Classifier (model=None, variables=None); its logits come
  from the jax artifact or the SavedModel's `logits` signature."""
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, classifier.ARTIFACT_FILE)) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT or meta.get('kind') not in KINDS:
    raise ValueError(f'{directory}/{classifier.ARTIFACT_FILE} is not an export of this '
                     f'version (format {meta.get("format")!r}, kind {meta.get("kind")!r}).')
  if meta['kind'] == 'savedmodel':
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    signature = tf.saved_model.load(directory).signatures['logits']

    def logits_fn(images: np.ndarray) -> np.ndarray:
      return signature(images=tf.constant(images, tf.float32))['logits'].numpy()
  else:
    with open(os.path.join(directory, MODEL_FILE), 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))

    def logits_fn(images: np.ndarray) -> np.ndarray:
      return np.asarray(exported.call(jnp.asarray(images, jnp.float32)))

  prep = meta['preprocessing']
  return classifier.Classifier(
      class_names=tuple(meta['class_names']),
      preprocessing=classifier.Preprocessing(image_size=prep['image_size'],
                                             crop_pct=prep['crop_pct']),
      logits_fn=logits_fn, model=None, variables=None, model_name=meta['model_name'],
      description=f'{meta["kind"]} export {directory} of {meta["source"]}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m debiformer_jax.export',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--weights', required=True,
                      help='training workdir or converted weights directory')
  parser.add_argument('--out', required=True, help='new or empty output directory')
  parser.add_argument('--format', choices=KINDS, default='stablehlo',
                      help='a jax.export artifact (default) or a TensorFlow SavedModel')
  parser.add_argument('--image-size', type=int, default=None,
                      help="square input side (default: the weights' own)")
  parser.add_argument('--topk', type=int, default=5,
                      help='classes per image in the SavedModel serving signature (default 5)')
  args = parser.parse_args(argv)
  try:
    clf = classifier.load(args.weights)
    out = write(clf, args.out, args.image_size, kind=args.format, topk=args.topk)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""A trained DeBiFormer as a classifier of images: weights, class names and preprocessing.

`load(directory)` accepts
  - a training workdir: its best checkpoint by eval top-1 (else the latest; `step` chooses),
    the EMA params when the run kept them; the model, its overrides, compute dtype, image size
    and `data.eval_crop_pct` from the workdir's config.json, the names from class_names.json;
  - converted weights (a directory holding debiformer.json, written by convert_torch_weights.py
    or `weights.save`): the architecture and class names from debiformer.json, the recipe's
    eval size (224) and crop (0.875) unless it says 'image_size' / 'crop_pct';
  - an exported artifact (a directory holding artifact.json): `export.load_artifact`.
Images go in as uint8 RGB (`read_image`: PIL, EXIF rotation applied, every mode made RGB),
through the eval pipeline's own transform (`preprocess` -> `augment.eval_image`), to
`logits_fn`: float32 normalised NHWC (N, S, S, 3) -> float32 logits (N, classes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from debiformer_jax import config as config_lib
from debiformer_jax import weights
from debiformer_jax.data import class_names as class_names_lib
from debiformer_jax.models import DeBiFormer, get_architecture

ARTIFACT_FILE = 'artifact.json'
CONFIG_FILE = 'config.json'


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How an image becomes the model's input: the eval pipeline's transform. The shorter side
  is resized (bicubic) to floor(image_size / crop_pct), then centre-cropped to image_size, and
  normalised with augment.MEAN_RGB / STD_RGB (0..255 scale)."""
  image_size: int
  crop_pct: float


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A loaded classifier. `model` and `variables` are None for an exported artifact."""
  class_names: tuple[str, ...]
  preprocessing: Preprocessing
  logits_fn: Callable[[np.ndarray], np.ndarray]  # (N, S, S, 3) float32 -> (N, classes).
  model: DeBiFormer | None
  variables: dict | None  # {'params', 'batch_stats'} on the default device.
  model_name: str
  description: str  # Where it came from, in one line.


def load(directory: str, *, step: int | None = None,
         model_name: str | None = None) -> Classifier:
  """The classifier in `directory` (see the module doc); `model_name` replaces the model its
  metadata names. FileNotFoundError / ValueError saying what was expected otherwise."""
  directory = os.path.abspath(os.path.expanduser(directory))
  if os.path.isfile(os.path.join(directory, ARTIFACT_FILE)):
    if step is not None or model_name is not None:
      raise ValueError(f'{directory} is an exported artifact: it has one fixed model, so a '
                       f'step or model name cannot be chosen.')
    from debiformer_jax import export  # pylint: disable=g-import-not-at-top
    return export.load_artifact(directory)
  if os.path.isfile(os.path.join(directory, weights.METADATA_FILE)):
    if step is not None:
      raise ValueError(f'{directory} holds converted weights (one set): a step cannot be '
                       f'chosen; steps exist only in training workdirs.')
    return _load_converted(directory, model_name)
  if os.path.isfile(os.path.join(directory, CONFIG_FILE)):
    return _load_workdir(directory, step, model_name)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory} does not exist: give a training workdir, converted '
                            f'weights or an exported artifact.')
  raise FileNotFoundError(
      f'{directory} is not a trained model: expected a training workdir (with {CONFIG_FILE} '
      f'and checkpoints/), converted weights (with {weights.METADATA_FILE}, written by '
      f'convert_torch_weights.py) or an exported artifact (with {ARTIFACT_FILE}).')


def _load_workdir(directory: str, step: int | None, model_name: str | None) -> Classifier:
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if model_name:
    config.model_name = model_name
  chosen, how = _choose_step(directory, step)
  variables, _ = weights.read(directory, chosen)
  num_classes = _head_classes(variables, directory)
  arch = get_architecture(config.model_name, num_classes=num_classes,
                          **config_lib.model_overrides(config))
  model = DeBiFormer(arch, config_lib.implementation(config), config_lib.DTYPES[config.dtype])
  return _build(model, variables, config.model_name, class_names_lib.read(directory),
                Preprocessing(int(config.image_size), float(config.data.eval_crop_pct)),
                f'training workdir {directory}, step {chosen} ({how})', directory)


def _choose_step(directory: str, step: int | None) -> tuple[int, str]:
  """(checkpoint step, why that one): `step`, else the best by eval top-1, else the latest."""
  steps = weights.workdir_steps(directory)
  if step is not None:
    if step not in steps:
      raise ValueError(f'{directory} has no checkpoint of step {step}; its steps are '
                       f'{", ".join(map(str, steps))}.')
    top1 = steps[step]
    return step, 'chosen' + ('' if top1 is None else f', eval top-1 {top1:.4f}')
  scored = {s: v for s, v in steps.items() if v is not None}
  if scored:
    best = max(scored, key=lambda s: (scored[s], s))
    return best, f'best eval top-1 {scored[best]:.4f} of {len(steps)} checkpoints'
  return max(steps), f'latest of {len(steps)} checkpoints; none has eval metrics'


def _load_converted(directory: str, model_name: str | None) -> Classifier:
  variables, meta = weights.read(directory)
  if meta.get('features_only'):
    raise ValueError(f'{directory} holds a converted backbone (features_only): it has no '
                     f'classifier head to predict with. Convert an ImageNet classifier '
                     f'checkpoint instead.')
  num_classes = _head_classes(variables, directory)
  fields = {k: tuple(v) if isinstance(v, list) else v
            for k, v in meta.get('model_config', {}).items()}
  # The preset, with the fields debiformer.json records unless another model is asked for.
  arch = get_architecture(model_name or meta['model_name'],
                          **{**({} if model_name else fields), 'num_classes': num_classes})
  recipe = config_lib.defaults()
  preprocessing = Preprocessing(int(meta.get('image_size', recipe.image_size)),
                                float(meta.get('crop_pct', recipe.data.eval_crop_pct)))
  names = meta.get('class_names')
  return _build(DeBiFormer(arch), variables, model_name or meta['model_name'],
                None if names is None else tuple(names), preprocessing,
                f'converted weights {directory}' + (f' (from {meta["source_checkpoint"]})'
                                                    if meta.get('source_checkpoint') else ''),
                directory)


def _head_classes(variables: dict, directory: str) -> int:
  head = variables['params'].get('head')
  if head is None:
    raise ValueError(f'the weights in {directory} have no classifier head.')
  return int(np.shape(head['kernel'])[-1])


def _build(model: DeBiFormer, variables: dict, model_name: str,
           names: tuple[str, ...] | None, preprocessing: Preprocessing, description: str,
           directory: str) -> Classifier:
  """Checks the weights and names against `model`, places the weights on the default device
  and jits the forward (compiled once per batch shape)."""
  problems = weights.tree_mismatches(variables, weights.abstract_variables(model))
  if problems:
    raise ValueError(f'the weights in {directory} do not fit {model_name}: '
                     + '; '.join(problems) + '. Are they of another variant (--model)?')
  model.config.check_input_size(preprocessing.image_size, preprocessing.image_size)
  num_classes = model.config.num_classes
  if names is None:
    names = tuple(str(i) for i in range(num_classes))
  elif len(names) != num_classes:
    raise ValueError(f'{directory} names {len(names)} classes but its head has {num_classes}.')
  variables = jax.device_put({'params': variables['params'],
                              'batch_stats': variables.get('batch_stats', {})})
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False).astype(jnp.float32))

  def logits_fn(images: np.ndarray) -> np.ndarray:
    return np.asarray(forward(variables, jnp.asarray(images, jnp.float32)))

  return Classifier(class_names=tuple(names), preprocessing=preprocessing,
                    logits_fn=logits_fn, model=model, variables=variables,
                    model_name=model_name, description=description)


# ---------------------------------------------------------------------------------------------
# Images.

def read_image(path: str) -> np.ndarray:
  """The image file at `path` as uint8 RGB (H, W, 3), the pixels training decoded.

  EXIF orientation is applied. Grayscale becomes RGB; palette images their colours; CMYK
  PIL's RGB. 16-bit samples (grey 'I;16', or 'I' holding 0..65535) keep their high byte
  (v >> 8), as PIL does for 16-bit RGB and `tf.io.decode_image` for every 16-bit PNG. Alpha is
  dropped (the colour under it is kept, nothing is composited), as the training pipeline's and
  the SavedModel's `tf.io.decode_image(channels=3)` do, so all of them see the same pixels.
  ValueError naming the file when it is not a readable image.
  """
  from PIL import Image, ImageOps, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    raise ValueError(f'{path}: an empty file, not an image.')
  try:
    with Image.open(path) as image:
      image.load()
      image = ImageOps.exif_transpose(image)
      if image.mode.startswith('I'):
        high = np.right_shift(np.clip(np.asarray(image, np.int64), 0, 65535), 8)
        return np.repeat(high.astype(np.uint8)[:, :, None], 3, axis=2)
      return np.asarray(image.convert('RGB'), dtype=np.uint8)
  except FileNotFoundError:
    raise ValueError(f'{path}: no such file.') from None
  except IsADirectoryError:
    raise ValueError(f'{path}: a directory, not an image file.') from None
  except UnidentifiedImageError:
    raise ValueError(f'{path}: not an image file PIL can read (JPEG, PNG, GIF, BMP, TIFF, '
                     f'WebP, ...).') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'{path}: cannot decode the image, truncated or corrupt ({e}).') from None


def preprocess(images: Sequence[np.ndarray], preprocessing: Preprocessing) -> np.ndarray:
  """uint8 RGB images (H_i, W_i, 3) -> float32 normalised (N, S, S, 3), through the eval
  pipeline's transform (`augment.eval_image`)."""
  transform = _eval_transform(preprocessing.image_size, preprocessing.crop_pct)
  size = preprocessing.image_size
  out = np.empty((len(images), size, size, 3), np.float32)
  for i, image in enumerate(images):
    out[i] = transform(np.asarray(image, np.uint8)).numpy()
  return out


@functools.lru_cache(maxsize=8)
def _eval_transform(size: int, crop_pct: float):
  """`augment.eval_image` as a tf.function traced once for any image size."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from debiformer_jax.data import augment  # pylint: disable=g-import-not-at-top
  return tf.function(lambda image: augment.eval_image(image, size, crop_pct),
                     input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])

"""Evaluation counts: every example once, padding never, top-1 / top-5 / loss exact.

A stand-in model looks its logits up by example index (stored in the first uint8 pixel, which
the eval step normalises on the way in), so the
expected numbers are computed independently in numpy. train.evaluate runs exactly as in
training, on batches shaped like create_eval_iterator's (last one padded and masked).
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debiformer_jax import sharding, train
from debiformer_jax.data import input_pipeline
from debiformer_jax.data.augment import MEAN_RGB, STD_RGB
from tests import _train_testlib as lib


class LookupModel(nn.Module):
  logits: tuple  # Nested tuples [num_examples][num_classes] (hashable).

  @property
  def config(self):  # What eval_step reads of a model's architecture.
    return types.SimpleNamespace(num_classes=len(self.logits[0]))

  @nn.compact
  def __call__(self, x, train=False):
    index = jnp.round(x[:, 0, 0, 0] * STD_RGB[0] + MEAN_RGB[0]).astype(jnp.int32)
    return jnp.asarray(self.logits, jnp.float32)[index]


def _padded_batches(num_examples, batch, labels, size=4):
  """Like create_eval_iterator: fixed-size batches, the last padded (label 0, mask 0)."""
  out = []
  for start in range(0, num_examples, batch):
    idx = np.arange(start, min(start + batch, num_examples))
    pad = batch - len(idx)
    image = np.zeros((batch, size, size, 3), np.uint8)
    image[:len(idx), 0, 0, 0] = idx
    out.append({'image': image,
                'label': np.concatenate([labels[idx], np.zeros(pad, np.int32)]),
                'mask': np.concatenate([np.ones(len(idx)), np.zeros(pad)]).astype(np.float32)})
  return out


@pytest.mark.parametrize('num_examples,batch,num_classes', [(10, 4, 7), (9, 8, 3), (5, 8, 6)])
def test_evaluate_counts_each_example_once(num_examples, batch, num_classes, monkeypatch):
  rng = np.random.default_rng(num_examples)
  logits = rng.normal(size=(num_examples, num_classes)).astype(np.float32)
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  logits[0, 0] = 10.0  # Example 0 predicts class 0: padding (index 0, label 0) would score.
  config = lib.small_config(global_batch_size=batch)
  batches = _padded_batches(num_examples, batch, labels)
  monkeypatch.setattr(input_pipeline, 'create_eval_iterator', lambda *a, **k: iter(batches))

  model = LookupModel(tuple(map(tuple, logits.tolist())))
  step = jax.jit(lambda v, b, t: train.eval_step(v, b, t, model=model))
  mesh = sharding.make_mesh(devices=jax.devices()[:1])  # Batches of 4 or 5 on any host.
  metrics = train.evaluate(step, {'params': {}}, config, mesh)

  order = np.argsort(-logits, axis=1)
  top1 = np.mean(order[:, 0] == labels)
  top5 = np.mean([labels[i] in order[i, :5] for i in range(num_examples)])
  log_probs = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
  loss = -np.mean(log_probs[np.arange(num_examples), labels])
  assert metrics['eval/num_examples'] == num_examples
  assert metrics['eval/top1'] == pytest.approx(top1)
  assert metrics['eval/top5'] == pytest.approx(top5)
  assert metrics['eval/loss'] == pytest.approx(loss, rel=1e-5)
  if num_classes <= 5:
    assert metrics['eval/top5'] == 1.0

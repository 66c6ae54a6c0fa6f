"""One process of a multi-process training run (run by test_multihost_train.py).

    python tests/_multihost_worker.py RESULT_FILE MAIN_FLAGS...

Runs `debiformer_jax.main` with MAIN_FLAGS (--coordinator_address etc. included), with
train.train_and_evaluate wrapped so that, when it returns, this process writes RESULT_FILE
(JSON): its process index/count, the first step it trained, its train losses and eval metrics,
and a SHA-256 of every leaf of the final state (params, batch_stats, optimizer state, rng) taken
from this process's own device buffers, after checking that all its local copies agree.
"""

import hashlib
import json
import os
import sys

import numpy as np


def state_digest(state) -> str:
  import jax

  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if not isinstance(leaf, jax.Array):
      continue
    assert leaf.is_fully_replicated, (jax.tree_util.keystr(path), leaf.sharding)
    copies = [np.asarray(s.data) for s in leaf.addressable_shards]
    for other in copies[1:]:
      np.testing.assert_array_equal(copies[0], other, err_msg=jax.tree_util.keystr(path))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(copies[0]).tobytes())
  return digest.hexdigest()


def main() -> None:
  result_file = sys.argv[1]
  sys.argv = [sys.argv[0]] + sys.argv[2:]

  from absl import app
  import jax

  from debiformer_jax import main as entry
  from debiformer_jax import train

  original = train.train_and_evaluate

  def wrapped(config, workdir, **kwargs):
    history = original(config, workdir, **kwargs)
    result = {
        'process_index': jax.process_index(),
        'process_count': jax.process_count(),
        'device_count': jax.device_count(),
        'local_device_count': jax.local_device_count(),
        'train_loss': {str(k): v for k, v in history['train_loss'].items()},
        'eval': {str(k): v for k, v in history['eval'].items()},
        'first_step': min(history['train_loss']) if history['train_loss'] else None,
        'final_step': int(jax.device_get(history['state'].step)),
        'state_sha256': state_digest(history['state']),
    }
    tmp = result_file + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(result, f)
    os.replace(tmp, result_file)
    return history

  train.train_and_evaluate = wrapped
  app.run(entry.main)


if __name__ == '__main__':
  main()

"""One process of the 2-process CPU stand-in for a pod (run by test_distributed.py).

    python tests/_distributed_worker.py PROCESS_ID PORT SIGNAL

Process PROCESS_ID joins a 2-process job whose coordinator is 127.0.0.1:PORT through
distributed.initialize. After a global array, its collectives and a barrier that process 0
reaches 2 s before process 1, both run steps under a PreemptionWatcher, and process 1 sends
itself SIGNAL (TERM or USR1) at step 3. It prints one JSON line starting with RESULT= and exits
0; anything else is a failure.
"""

import json
import os
import signal
import sys
import time

import numpy as np

BARRIER_SKEW_S = 2.0
SIGNAL_AT_STEP = 3


def main() -> None:
  process_id, port = int(sys.argv[1]), int(sys.argv[2])
  signum = getattr(signal, 'SIG' + sys.argv[3])

  from debiformer_jax import distributed, preemption

  distributed.initialize(f'127.0.0.1:{port}', 2, process_id)

  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  result = {
      'process_index': jax.process_index(),
      'process_count': jax.process_count(),
      'device_count': jax.device_count(),
      'local_device_count': jax.local_device_count(),
  }

  # A global (8, 3) array, rows split over the 4 devices of both processes; this process
  # contributes rows [4 * pid, 4 * pid + 4).
  mesh = Mesh(np.array(jax.devices()), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  local = np.arange(12, dtype=np.float32).reshape(4, 3) + 12 * process_id
  garr = jax.make_array_from_process_local_data(sharding, local)
  result['global_shape'] = list(garr.shape)

  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(garr)
  result['jit_sum'] = float(np.asarray(total.addressable_shards[0].data))

  psum = jax.jit(jax.shard_map(
      lambda x: jax.lax.psum(jnp.sum(x, axis=0), 'data'),
      mesh=mesh, in_specs=P('data'), out_specs=P()))(garr)
  result['psum'] = np.asarray(psum.addressable_shards[0].data).tolist()

  # The collectives above left both processes in step: process 0 waits for process 1 here.
  if process_id == 1:
    time.sleep(BARRIER_SKEW_S)
  start = time.monotonic()
  distributed.barrier('skewed')
  result['barrier_wait_s'] = time.monotonic() - start

  # A collective per step keeps the two processes in lockstep, like training. JAX's notifier
  # polls about once a second, so the agreed step comes some 100 steps after the signal.
  step_fn = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
  usr1_before = signal.getsignal(signal.SIGUSR1)
  result['stop_step'] = None
  with preemption.PreemptionWatcher() as watcher:
    for step in range(1000):
      step_fn(garr).block_until_ready()
      if process_id == 1 and step == SIGNAL_AT_STEP:
        os.kill(os.getpid(), signum)
      if watcher.should_stop(step):
        result['stop_step'] = step
        result['still_stopped'] = watcher.should_stop(step + 1)
        break
      time.sleep(0.01)
  result['usr1_restored'] = signal.getsignal(signal.SIGUSR1) is usr1_before

  print('RESULT=' + json.dumps(result), flush=True)


if __name__ == '__main__':
  main()

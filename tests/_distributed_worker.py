"""One process of the 2-process CPU stand-in for a pod (run by test_distributed.py).

    python tests/_distributed_worker.py PROCESS_ID PORT {args|env} [SIGNAL]

Process PROCESS_ID joins a 2-process job whose coordinator is 127.0.0.1:PORT,
either through initialize_distributed's arguments ('args') or through the
DEBIFORMER_* environment variables ('env'). Process 1 gets SIGNAL (TERM or
USR1; default TERM) at step 3 of the sync-point phase. It prints one JSON line starting
with RESULT= and exits 0; anything else is a failure.
"""

import json
import os
import signal
import sys
import time

import numpy as np


def main() -> None:
  process_id, port, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  first_signal = getattr(signal, "SIG" + (sys.argv[4] if len(sys.argv) > 4 else "TERM"))
  address = f"127.0.0.1:{port}"

  from debiformer_jax import distributed

  if how == "args":
    distributed.initialize_distributed(
        coordinator_address=address, num_processes=2, process_id=process_id)
  else:
    os.environ[distributed.ENV_COORDINATOR] = address
    os.environ[distributed.ENV_NUM_PROCESSES] = "2"
    os.environ[distributed.ENV_PROCESS_ID] = str(process_id)
    distributed.initialize_distributed()

  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  result = {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
  }

  # A global (8, 3) array, rows sharded over the 4 devices of both processes;
  # this process contributes rows [4 * pid, 4 * pid + 4).
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  local = np.arange(12, dtype=np.float32).reshape(4, 3) + 12 * process_id
  garr = jax.make_array_from_process_local_data(sharding, local)
  result["global_shape"] = list(garr.shape)

  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(garr)
  result["jit_sum"] = float(np.asarray(total.addressable_shards[0].data))

  psum = jax.jit(jax.shard_map(
      lambda x: jax.lax.psum(jnp.sum(x, axis=0), "data"),
      mesh=mesh, in_specs=P("data"), out_specs=P()))(garr)
  result["psum"] = np.asarray(psum.addressable_shards[0].data).tolist()

  # A collective per step keeps the two processes in lockstep, like training.
  step_fn = jax.jit(lambda x: jnp.sum(x), out_shardings=NamedSharding(mesh, P()))

  def run(watcher, kill_at, max_steps, pause, signum=signal.SIGTERM):
    for step in range(max_steps):
      step_fn(garr).block_until_ready()
      if process_id == 1 and step == kill_at:
        os.kill(os.getpid(), signum)
      if watcher.should_stop(step):
        return step
      time.sleep(pause)
    return None

  # 1) Default strategy: JAX's preemption sync point (its notifier polls ~1 s).
  before = signal.getsignal(signal.SIGUSR1)
  with distributed.PreemptionWatcher() as w:
    result["auto_mode"] = w.mode
    result["sync_stop"] = run(w, kill_at=3, max_steps=1000, pause=0.01,
                              signum=first_signal)
    result["sync_received"] = w.received
  result["usr1_restored"] = signal.getsignal(signal.SIGUSR1) == before

  # 2) All-reduce of local flags, checked every step: both stop exactly at 5.
  w = distributed.PreemptionWatcher(mode="allreduce", check_every=1)
  result["allreduce_stop"] = run(w, kill_at=5, max_steps=50, pause=0.0)
  result["allreduce_received"] = w.received
  w.close()

  # 3) Checked every 4 steps: a signal at step 5 stops everyone at step 8.
  w = distributed.PreemptionWatcher(mode="allreduce", check_every=4)
  result["allreduce4_stop"] = run(w, kill_at=5, max_steps=50, pause=0.0)
  w.close()
  result["sigterm_restored"] = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

  print("RESULT=" + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()

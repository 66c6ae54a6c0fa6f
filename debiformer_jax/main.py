r"""Train or evaluate DeBiFormer.

  python -m debiformer_jax.main --config=configs/demo.py --workdir=/tmp/debiformer_demo
  python -m debiformer_jax.main --config=configs/small.py --workdir=DIR \
      --config.data.data_dir=TFDS_DIR --config.global_batch_size=256
  python -m debiformer_jax.main --config=configs/small.py --config.mode=eval \
      --config.init_from=CONVERTED_DIR --config.data.data_dir=TFDS_DIR

Any config field can be overridden with --config.FIELD=VALUE. `mode` is 'train' (train with
periodic eval; resumes from the workdir's latest checkpoint) or 'eval' (evaluate
`init_from` or the workdir's latest checkpoint). Without --workdir, config.workdir is used,
or ./workdir.

Several processes (multi-host) join one job through jax.distributed: on Cloud TPU and in a SLURM
step this happens by itself; elsewhere give every process the same --coordinator_address and
--num_processes and its own --process_id, e.g.

  python -m debiformer_jax.main --config=... --workdir=SHARED_DIR \
      --coordinator_address=HOST0:1234 --num_processes=2 --process_id=0   # and 1 on host 1

On SIGTERM/SIGUSR1, a first Ctrl-C (or a TPU preemption notice) training saves a checkpoint of
the current step on every process and exits with status 0; relaunching with the same workdir
resumes from it (a second Ctrl-C stops at once). A resumed run must keep the config saved in the
workdir, up to harmless fields (logging, eval and checkpoint cadence, ...);
--allow_config_change accepts other changes. Mistakes (an unknown config field, a bad value, a
workdir that cannot be written, a checkpoint that cannot be written or read) end with one
message and a non-zero status.
"""

import logging as std_logging
import os
import re
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # Before TensorFlow loads (with the config).

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from debiformer_jax import distributed  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and TensorBoard '
                               'events (default: config.workdir, else ./workdir).')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, to join a multi-process job by hand '
    '(not needed on Cloud TPU or in a SLURM step, where JAX finds the job).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes of that job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process in that job.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Resume a workdir even though the config changes fields that '
    'change what the run means (model, batch, schedule, data); they are listed when refused.')
flags.mark_flags_as_required(['config'])

DEFAULT_WORKDIR = 'workdir'


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every step of every save at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  # Join the multi-process job (if any) before anything asks JAX about devices or processes.
  distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax
  from debiformer_jax import config as config_lib
  from debiformer_jax import train

  config = _CONFIG.value
  workdir = _WORKDIR.value or config.workdir or DEFAULT_WORKDIR
  if jax.process_index() == 0:
    logging.info('JAX %s: %d processes, %d devices (%s); workdir %s', jax.__version__,
                 jax.process_count(), jax.device_count(), jax.devices()[0].platform, workdir)
  from debiformer_jax import checkpointing
  try:
    if config.mode == 'eval':
      train.evaluate_checkpoint(config, workdir)
    else:
      train.train_and_evaluate(config, workdir,
                               allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except config_lib.ConfigError as e:
    sys.exit(f'{e}\n(config file {flags.FLAGS["config"].config_filename})')
  except checkpointing.CheckpointRestoreError as e:
    sys.exit(f'error: {e}')
  except checkpointing.CheckpointSaveError as e:
    logging.error('%s', e)
    logging.flush()
    # Orbax's threads of the failed save wait minutes for signals that will not come; nothing
    # is left to save, so leave without waiting for them.
    os._exit(1)  # pylint: disable=protected-access


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an override of a config field that does not exist reported in
  one sentence (ml_collections raises it as a chained traceback)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    sys.exit(f'error: {unknown_field_message(argv, e)}')


def unknown_field_message(argv: list[str], error: Exception) -> str:
  """'unknown config field ...' for ml_collections' error about a missing field."""
  text = str(error)  # Quotes and escapes of the errors it chains; the field's name first.
  name = re.search(r'\w+', text.split('Did you mean')[0])
  field = name.group(0) if name else text
  given = [a for a in argv if a.startswith('--config.') and field in a]
  suggestion = re.search(r'Did you mean "([\w.]+)"', text)
  return (f'unknown config field {field!r}' + (f' (in {given[0]})' if given else '')
          + (f'; did you mean {suggestion.group(1)!r}?' if suggestion else '.')
          + ' Every field is declared in debiformer_jax/config.py defaults().')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)

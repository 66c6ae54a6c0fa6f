"""Preemption notices turned into a stop at one step that every process agrees on.

A notice is SIGTERM (the scheduler's, or Cloud TPU's), SIGUSR1 (SLURM's warning before the time
limit) or a first SIGINT (Ctrl-C); a second SIGINT stops at once (KeyboardInterrupt), losing the
steps since the last checkpoint. With one process a Python handler notes a notice. With several
(jax.distributed initialised, its preemption service on, the default) JAX's notifier owns SIGTERM
and JAX's preemption sync point picks the step; SIGUSR1 and SIGINT are passed on to that notifier
as SIGTERM.
"""

from __future__ import annotations

import signal
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

_NOTICE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionWatcher:
  """Use as `with PreemptionWatcher() as watcher:`; restores the previous handlers on exit."""

  def __init__(self):
    self._distributed = jax.distributed.is_initialized()
    self._noticed = False
    self._interrupted = False  # A first SIGINT came.
    self._stop = False
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> PreemptionWatcher:
    # A Python handler for SIGTERM would take it away from JAX's notifier.
    owned_by_jax = (signal.SIGTERM,) if self._distributed else ()
    for signum in _NOTICE_SIGNALS:
      if signum not in owned_by_jax:
        self._previous[signum] = signal.signal(signum, self._on_notice)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      # None: a handler set outside Python, which Python cannot put back.
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()

  def _on_notice(self, signum: int, frame: Any) -> None:
    del frame
    if signum == signal.SIGINT:
      if self._interrupted:
        raise KeyboardInterrupt
      self._interrupted = True
      logging.warning('Ctrl-C: saving a checkpoint at the next step, then stopping; press '
                      'Ctrl-C again to stop at once without saving.')
    self._noticed = True
    if self._distributed:
      signal.raise_signal(signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop. Call it on every process at every step, with the
    same `step`; once True it stays True."""
    if not self._stop:
      if self._distributed:
        self._stop = multihost_utils.reached_preemption_sync_point(step)
      else:
        self._stop = self._noticed
      if self._stop:
        logging.warning('Preemption notice: stopping at step %d.', step)
    return self._stop

"""Stopping a training run cleanly: SIGTERM (a preemption notice) and Ctrl-C.

`StopRequests.install()` turns SIGTERM and a first Ctrl-C into a flag that
the loop polls with `should_stop(step)` after every step; the loop then saves
the step, waits for the save and exits normally. A second Ctrl-C interrupts
at once (KeyboardInterrupt), losing the steps since the last checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

from attnx.training.multihost import all_agree


def _use_preemption_service() -> bool:
    return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


class StopRequests:
    """The stop flag of a training run and the signal handlers that set it."""

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Makes SIGTERM and a first Ctrl-C set the stop flag (main thread only).

        With several processes and JAX's preemption service on (the default), JAX already
        listens for SIGTERM and picks a step at which all processes stop; `should_stop`
        asks it, and installing a Python handler would take SIGTERM away from it.
        """
        if _use_preemption_service():
            logging.info("checkpoint: several processes; SIGTERM goes to JAX's preemption service")
            return

        def on_sigterm(signum: int, frame: Any) -> None:
            del signum, frame
            logging.warning("checkpoint: SIGTERM received; stopping after this step")
            self._requested.set()

        def on_sigint(signum: int, frame: Any) -> None:
            del signum, frame
            if self._requested.is_set():
                raise KeyboardInterrupt
            logging.warning(
                "checkpoint: Ctrl-C; saving after this step, then stopping (Ctrl-C again "
                "to stop at once, losing the steps since the last checkpoint)"
            )
            self._requested.set()

        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_sigterm)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)

    def should_stop(self, step: int) -> bool:
        """True once a stop was requested; call after every step.

        With several processes all must call this at every step: it turns True on all of
        them at the same step (JAX's preemption sync point, or an all-gather of the flag
        when the preemption service is off).
        """
        if _use_preemption_service():
            return multihost_utils.reached_preemption_sync_point(int(step))
        return not all_agree(not self._requested.is_set())

    def uninstall(self) -> None:
        """Gives the signals back to the handlers they had before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

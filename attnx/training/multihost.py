"""Keeping the processes of a multi-host run on the same branch."""

import jax
import numpy as np
from jax.experimental import multihost_utils


def all_agree(ok: bool) -> bool:
    """True only if `ok` holds on every process (so all processes take the same branch).

    A collective: every process must call it at the same point.
    """
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray(ok, np.int32))
    return bool(np.all(flags))


def sync(name: str) -> None:
    """A barrier named `name` across all processes (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)

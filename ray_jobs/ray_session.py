"""Connect to the Ray cluster a job should run on: given, inherited (Ray Jobs), or a new local one."""

from __future__ import annotations

import os
import warnings
from typing import Any


def ensure_ray(address: str | None = None, **local: Any) -> None:
    """Initialise Ray once: ``address`` or ``$RAY_ADDRESS`` if set, else a local cluster with ``local`` settings.

    Inside a submitted Ray Job, ``RAY_ADDRESS`` is set, so the job's driver joins its cluster;
    settings that only make sense for a new cluster (CPUs, object store size) are then ignored.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    with warnings.catch_warnings():
        # Ray starts its processes by fork and exec: no Lance code runs in the forked child, so
        # Lance's at-fork warning ("lance is not fork-safe") would only alarm the user.
        warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            # "local": a new cluster, even when a `ray start` on this machine left one to auto-connect to.
            ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False, **local)

"""Connect to the Ray cluster a job should run on: given, inherited (Ray Jobs), or a new local one."""

from __future__ import annotations

import os
import socket
import time
import warnings
from typing import Any

from lance_io.reasons import ReasonError

_DEFAULT_PORTS = {"http": 80, "https": 443, "ray": 10001}
REACH_DEADLINE_S = 10.0
"""How long a cluster's address may go unanswered (a head restarting) before a job is refused."""


def require_ray_at(address: str, *, deadline_s: float = REACH_DEADLINE_S) -> None:
    """Raise ``ray_unreachable`` unless something answers at the Ray cluster ``address`` within ``deadline_s``.

    ``ray.init`` retries an address nobody answers at for ever, printing a warning every few
    seconds: with a stale ``RAY_ADDRESS`` (a cluster stopped or moved) every job would hang. The
    address is probed as Ray will use it: ``auto`` read from the last cluster started here,
    ``localhost`` as this node's address, a URL (a Ray Client's ``ray://``, a dashboard's
    ``http://`` for Ray Jobs) at its host and port. ``local`` (a new cluster) passes. An address
    Ray cannot read, or ``auto`` with no cluster started here, is refused at once.
    """
    from urllib.parse import urlsplit

    from ray._private.services import canonicalize_bootstrap_address

    if address == "local":
        return
    try:
        if "://" in address:
            url = urlsplit(address)
            port = url.port or _DEFAULT_PORTS.get(url.scheme)
            if url.hostname is None or port is None:
                raise ValueError(f"no host and port in {address}")
            bootstrap = f"{url.hostname}:{port}"
        else:
            bootstrap = canonicalize_bootstrap_address(address)
        if bootstrap is None:
            raise ConnectionError("no Ray cluster was started on this machine")
        host, _, port = bootstrap.rpartition(":")
        port = int(port)
    except (ValueError, ConnectionError) as exc:  # Ray's "Invalid address format", `auto` finding no cluster
        raise _unreachable(address, str(exc)) from None
    give_up = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() >= give_up:
                raise _unreachable(address, f"{bootstrap}: {exc.strerror or exc}") from None
            time.sleep(1.0)


def _unreachable(address: str, why: str) -> ReasonError:
    return ReasonError(
        "ray_unreachable",
        f"no Ray cluster answers at {address} ({why}): start it (`ray start --head`), correct RAY_ADDRESS "
        "(or --address), or unset it to run on a new local cluster",
    )


def require_ray_data_at(address: str) -> None:
    """Raise ``ray_client_unsupported`` if ``address`` is a Ray Client address (``ray://``).

    Ingest, labeling and the demo run on Ray Data, which Ray Client cannot carry: through it, an
    ingest fails inside Ray Data (``'Worker' object has no attribute 'core_worker'``) and a labeling
    run on its streaming actor calls ("not currently supported when using Ray Client"), Ray 2.60.
    ``serve`` and ``train --workers N`` work through it.
    """
    if address.startswith("ray://"):
        raise ReasonError(
            "ray_client_unsupported",
            f"{address} is a Ray Client address, and this job runs on Ray Data, which Ray Client cannot carry: "
            "submit it to the cluster (`lancetag submit --address http://HEAD:8265 -- <command>`), or run it on "
            "a node of the cluster with RAY_ADDRESS=auto (or HEAD:6379)",
        )


def ensure_ray(address: str | None = None, **local: Any) -> None:
    """Initialise Ray once: ``address`` or ``$RAY_ADDRESS`` if set, else a local cluster with ``local`` settings.

    Inside a submitted Ray Job, ``RAY_ADDRESS`` is set, so the job's driver joins its cluster;
    settings that only make sense for a new cluster (CPUs, object store size) are then ignored.
    """
    import ray

    if ray.is_initialized():
        return
    from serve_apps.local_cluster import address_to_join, init_local_ray

    address = address_to_join(address or os.environ.get("RAY_ADDRESS"))
    with warnings.catch_warnings():
        # Ray starts its processes by fork and exec: no Lance code runs in the forked child, so
        # Lance's at-fork warning ("lance is not fork-safe") would only alarm the user.
        warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)
        if address:
            require_ray_data_at(address)
            require_ray_at(address)
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            init_local_ray(log_to_driver=False, **local)  # label and demo start Serve on it

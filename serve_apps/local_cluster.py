"""Before lancetag starts a local Ray cluster for Serve: the setting it needs, the port it must bind.

Serve's controller gives its HTTP proxy 5 s to answer a ready check, then kills it, and
``serve.start`` fails with ``ActorDiedError``. With both cores of a 2-core machine busy (another
job, a test suite), the proxy takes longer to start: the test suite's Serve apps failed to start
so beside two busy loops, and started with 60 s. Ray's processes read the setting from the
environment they start with, so it is set before lancetag starts a local cluster (where unset: a
user's own value wins). A cluster started with ``ray start`` takes it from that command's environment.

A port another program holds made the proxy fail to bind, and ``lancetag serve`` print Ray's
``RayTaskError`` with the proxy's tracebacks: :func:`require_port_free` binds it first, as the proxy will.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from lance_io.reasons import ReasonError

LOCAL_CLUSTER_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def address_to_join(address: str | None) -> str | None:
    """The Ray cluster ``address`` to join, or None for a new local cluster: none given, or ``local``
    (Ray's own word for a new cluster), which then gets :func:`init_local_ray`'s settings too."""
    return address if address and address != "local" else None


def init_local_ray(**options: Any) -> None:
    """Start a new local Ray cluster (never one a ``ray start`` on this machine left to join), with
    :data:`LOCAL_CLUSTER_ENV` set where unset; ``options`` go to ``ray.init``."""
    import ray

    for name, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(name, value)
    ray.init(address="local", include_dashboard=False, configure_logging=False, **options)


def require_port_free(host: str, port: int) -> None:
    """Raise ``port_in_use`` unless Serve's proxy on this machine can bind ``host:port`` (bound as it binds: no reuse)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise port_in_use(host, port, exc.strerror or str(exc)) from None


def port_in_use(host: str, port: int, why: str) -> ReasonError:
    """The refusal of a labeler whose HTTP port another program holds."""
    return ReasonError(
        "port_in_use",
        f"the labeler cannot listen on {host}:{port} ({why}): another program holds the port; "
        "give another (`lancetag serve --port`), or stop that program",
    )

"""What a local Ray cluster needs in its environment before it starts, for Serve to start on a busy machine.

Serve's controller gives its HTTP proxy 5 s to answer a ready check, then kills it, and
``serve.start`` fails with ``ActorDiedError``. With both cores of a 2-core machine busy (another
job, a test suite), the proxy takes longer to start: the test suite's Serve apps failed to start
so beside two busy loops, and started with 60 s. Ray's processes read the setting from the
environment they start with, so it is set before lancetag starts a local cluster (where unset: a
user's own value wins). A cluster started with ``ray start`` takes it from that command's environment.
"""

from __future__ import annotations

import os

LOCAL_CLUSTER_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def set_local_cluster_env() -> None:
    """Set :data:`LOCAL_CLUSTER_ENV` in this process's environment where unset, for the local cluster it starts."""
    for name, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(name, value)

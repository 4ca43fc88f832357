"""A real Ray head started with `ray start --head` on 127.0.0.1, with the jobs API, for submit tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_head(num_cpus: int = 2, client_port: int | None = None, gcs_port: int | None = None) -> Iterator[str]:
    """Start a Ray head in its own process group; yield its jobs address; kill only that group.
    Its Ray Client server listens at ``client_port``, its GCS (``RAY_ADDRESS=127.0.0.1:PORT``) at
    ``gcs_port`` (default: free ports).

    (`ray stop` would stop every Ray cluster on the machine, the test session's too.)
    """
    ray_bin = Path(sys.executable).parent / "ray"
    dashboard = free_port()
    # The head's environment is this virtualenv, as on a node of the lancetag image: jobs' `python` is it.
    path = f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "VIRTUAL_ENV": str(ray_bin.parent.parent), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port or free_port()}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--num-cpus={num_cpus}", "--object-store-memory=400000000", f"--ray-client-server-port={client_port or free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        import httpx

        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{address}/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Ray head did not start")
            time.sleep(0.5)
        yield address
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        # As `ray stop` does: later ray.init() calls must not try to join this dead head.
        Path("/tmp/ray/ray_current_cluster").unlink(missing_ok=True)

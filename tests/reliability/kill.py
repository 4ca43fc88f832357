"""Kill a real command with SIGKILL once it has committed something: what a crash test needs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.conftest import REPO_ROOT


def own_cluster_environment() -> dict[str, str]:
    """This environment without RAY_ADDRESS: each run starts (and loses) its own local cluster."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def kill_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL the process group and anything else left in its session (Ray daemons included)."""
    with contextlib.suppress(ProcessLookupError):  # the group may have ended on its own
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    for other in psutil.process_iter():
        try:
            if os.getsid(other.pid) == process.pid:
                other.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue


def kill_9_once(command: list[str], committed: Callable[[], bool], log: Path, timeout: float = 240) -> bool:
    """Run ``command`` in its own session, SIGKILL its whole group as soon as ``committed()``; return whether it was still running then.

    The command's output goes to ``log`` (quoted by the caller when it ended before the kill).
    """
    with open(log, "w") as out:
        victim = subprocess.Popen(
            command, cwd=REPO_ROOT, env=own_cluster_environment(), stdout=out, stderr=out, text=True,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            while not committed() and victim.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            return victim.poll() is None
        finally:
            kill_group(victim)

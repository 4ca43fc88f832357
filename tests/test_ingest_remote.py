"""Driver work on Ray workers (`ray_jobs.ingest.remote`): a streamed listing survives its worker's kill -9."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

from ray_jobs.ingest.remote import stream_on_worker


def _numbers_dying_once(count: int, marker: str) -> Iterator[list[int]]:
    """Yield [0] .. [count-1]; the first attempt kills its own worker process (SIGKILL) at 7."""
    for number in range(count):
        if number == 7 and not os.path.exists(marker):
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        yield [number]


def test_a_streamed_listing_whose_worker_is_killed_is_retried_and_yields_each_value_once(ray_cluster, tmp_path: Path) -> None:
    marker = str(tmp_path / "killed-once")

    got = [n for batch in stream_on_worker(_numbers_dying_once, 20, marker) for n in batch]

    assert Path(marker).exists(), "the worker was killed"
    assert got == list(range(20)), "Ray retried the generator and skipped the values already delivered"


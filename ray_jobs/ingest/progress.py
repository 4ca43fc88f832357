"""A progress bar on stderr with images/s and MB/s; silent when disabled or not a terminal."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class IngestProgress:
    """Counts settled inputs against listed ones and shows the rate."""

    def __init__(self, *, enabled: bool = True) -> None:
        console = Console(stderr=True)
        self.enabled = enabled and console.is_terminal
        self._progress = Progress(
            TextColumn("ingest"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s, {task.fields[mbps]} MB/s, {task.fields[errors]} errors"),
            TimeElapsedColumn(),
            console=console,
            disable=not self.enabled,
        )
        self._task = self._progress.add_task("ingest", total=0, rate="-", mbps="-", errors=0)
        self._listed = self._done = self._errors = self._bytes = 0
        self._started = time.monotonic()

    def __enter__(self) -> IngestProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._progress.stop()

    def listed(self, count: int) -> None:
        """Count inputs found by the sources."""
        self._listed += count
        if self.enabled:
            self._progress.update(self._task, total=self._listed)

    def done(self, count: int, *, error: bool = False, nbytes: int = 0) -> None:
        """Count inputs settled (added, duplicate, error or skipped)."""
        self._done += count
        self._errors += error
        self._bytes += nbytes
        if self.enabled:
            elapsed = max(time.monotonic() - self._started, 1e-6)
            self._progress.update(
                self._task,
                completed=self._done,
                rate=f"{self._done / elapsed:.0f}",
                mbps=f"{self._bytes / elapsed / 1e6:.0f}",
                errors=self._errors,
            )

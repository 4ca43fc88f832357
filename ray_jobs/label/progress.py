"""A progress bar of rows done with rows/s, ETA and rows left (rich), or nothing."""

from __future__ import annotations

from types import TracebackType


class RowProgress:
    """Context manager showing ``advance(n)`` calls against a total of rows."""

    def __init__(self, total: int, *, enabled: bool = True, description: str = "labeling") -> None:
        self.total = total
        self.enabled = enabled and total > 0
        self.description = description
        self._progress = None
        self._task = None

    def __enter__(self) -> RowProgress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, rate="-")
        return self

    def advance(self, rows: int) -> None:
        """Count ``rows`` more as done."""
        if self._progress is not None:
            self._progress.advance(self._task, rows)
            speed = self._progress.tasks[0].speed
            self._progress.update(self._task, rate=f"{speed:.1f}" if speed else "-")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.__exit__(kind, exc, tb)

"""Local folders (recursive, symlink-safe) and single image files; optional label: the folder a file sits in."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ray_jobs.ingest.items import InputItem
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources.base import ListedSource, SourceError

KIND = "folder"


def folder_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of every file under a folder (each directory walked once, loops cut)."""
    root = Path(location)
    if not root.is_dir():
        raise SourceError(f"{location} is not a folder")
    return ListedSource(KIND, lambda: _walk(root, options))


def file_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of one local file (``lancetag ingest a.jpg b.png``, a shell glob); its
    ``truth`` is its folder's name with ``label_from_dir``."""
    path = Path(location)
    if not path.is_file():
        raise SourceError(f"{location} is not a file")
    truth = path.resolve().parent.name if options.label_from_dir else None
    item = InputItem(source=str(path), source_kind="file", locator="path", path=str(path), scan=True, truth=truth or None)
    return ListedSource("file", lambda: iter([item]))


def _walk(root: Path, options: IngestOptions) -> Iterator[InputItem]:
    real_root = root.resolve()
    seen_dirs: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            stat = directory.stat()
            if (stat.st_dev, stat.st_ino) in seen_dirs:
                continue  # a symlink loop or a second link to a folder already walked
            seen_dirs.add((stat.st_dev, stat.st_ino))
            with os.scandir(directory) as entries:
                children = sorted(entries, key=lambda e: e.name)
        except OSError as exc:
            yield _failed(str(directory), "unreadable", f"cannot list the folder: {exc.strerror or exc}")
            continue
        subdirs = []
        for entry in children:
            path = Path(entry.path)
            if entry.is_symlink():
                problem = _symlink_problem(path, real_root, options.allow_outside_root)
                if problem:
                    yield _failed(entry.path, *problem)
                    continue
            try:
                if entry.is_dir():
                    subdirs.append(path)
                else:  # a FIFO, socket or device too: the worker refuses it as not_a_file, unopened
                    yield _item(path, root, options.label_from_dir)
            except OSError as exc:
                yield _failed(entry.path, "unreadable", f"cannot stat: {exc.strerror or exc}")
        stack.extend(reversed(subdirs))


def _symlink_problem(path: Path, real_root: Path, allow_outside_root: bool) -> tuple[str, str] | None:
    try:
        target = path.resolve(strict=True)
    except RuntimeError:
        return "symlink_loop", "the symlink resolves to itself (loop)"
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            return "symlink_loop", "the symlink resolves to itself (loop)"
        return "broken_symlink", f"the symlink target does not exist: {os.readlink(path)}"
    if not allow_outside_root and not target.is_relative_to(real_root):
        return (
            "outside_root",
            f"the symlink leads outside the folder, to {target} (--allow-outside-root to follow it)",
        )
    return None


def _item(path: Path, root: Path, label_from_dir: bool) -> InputItem:
    truth = path.parent.name if label_from_dir and path.parent != root else None
    return InputItem(
        source=str(path), source_kind=KIND, locator="path", path=str(path), scan=True, truth=truth
    )


def _failed(source: str, reason: str, message: str) -> InputItem:
    return InputItem(source=source, source_kind=KIND, locator="none", error=(reason, message))

"""The common interface of sources: a source lists input items and declares its metadata columns."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from lance_io.reasons import ReasonError
from lance_io.schema import IMAGE_SCHEMA, MESSAGES, TRUTH
from ray_jobs.ingest.items import InputItem

RESERVED_COLUMNS = frozenset(IMAGE_SCHEMA.names) | {TRUTH, MESSAGES}
"""Columns ingest computes itself: a source column of the same name passes through as ``source_<name>``."""


class Source(Protocol):
    """What every source module provides: a kind, its metadata columns, and its items, lazily."""

    kind: str
    metadata_fields: dict[str, pa.DataType]

    def items(self) -> Iterator[InputItem]:
        """Yield one item per input image, in a stable order."""
        ...


@dataclass
class ListedSource:
    """A source whose items come from a generator function; most modules return one of these."""

    kind: str
    list_items: Callable[[], Iterator[InputItem]]
    metadata_fields: dict[str, pa.DataType] = field(default_factory=dict)

    def items(self) -> Iterator[InputItem]:
        """Yield the items of the source."""
        return self.list_items()


class SourceError(ReasonError):
    """A source that cannot be read at all (missing, unknown kind, unreadable file format): ``bad_source``."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_source", message)


def inside_root(path: Path, root: Path) -> bool:
    """True when `path`, symlinks resolved, stays inside `root` (also resolved)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except ValueError:  # a NUL byte: no file has this name, wherever it points; the read says not_found
        return True
    except (OSError, RuntimeError):
        return False


def object_item(path: str, kind: str, object_root: str) -> InputItem:
    """Return the item of ``path`` relative to a prefix on object storage (a key under it), or an
    ``outside_root`` error item when the path leads out of the prefix."""
    key = posixpath.normpath(path)
    if key == ".." or key.startswith(("../", "/")):
        return InputItem(
            source=path, source_kind=kind, locator="none",
            error=("outside_root", f"the path leads outside {object_root}"),
        )
    uri = f"{object_root.rstrip('/')}/{key}"
    return InputItem(source=uri, source_kind=kind, locator="object", url=uri)


KEPT_PREFIX = "source_"
"""A source column named like one ingest computes (``id``, ``width``, ...) is kept under this prefix."""


def pass_through_columns(names: Sequence[str], exclude: set[str], *, computed: frozenset[str] = frozenset()) -> dict[str, str]:
    """Return table column -> source column for every column ``names`` of a source that no role uses.

    A column named like one ingest computes keeps its values as ``source_<name>`` (a catalogue's own
    ``id``, a declared ``width``), unless the source has a ``source_<name>`` too; ``computed`` names
    columns that mean what ingest computes again (an image table's own), which are left out. A ``.``
    in a name (``meta.src``), which Lance refuses in a top-level column, becomes ``_`` (``meta_src``),
    with ``_`` added until the name is one the source does not have.
    """
    given = set(names)
    kept = {}
    for name in names:
        if name in exclude or name in computed:
            continue
        column = name.replace(".", "_")
        while column != name and (column in given or column in kept):
            column += "_"
        if column not in RESERVED_COLUMNS:
            kept[column] = name
        elif KEPT_PREFIX + column not in given:
            kept[KEPT_PREFIX + column] = name
    return kept

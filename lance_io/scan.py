"""Read helpers: open a table at a version or tag, scan columns with a filter, list fragments.

Pure Lance (no Ray, no training library): the LLaMA-Factory extension and the jobs read tables
through these so that "which rows of which version" is decided in one place.

Example::

    from lance_io.scan import open_at, scan_batches
    ds = open_at("/data/photos.lance", "v3")          # a tag, or a version number
    for batch in scan_batches(ds, ["id", "truth"], where="truth IS NOT NULL"):
        ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lance
import pyarrow as pa

from lance_io.reasons import ReasonError


class TableReadError(ReasonError):
    """A table, version, tag or column that cannot be read; ``reason`` is a stable code."""


@dataclass(frozen=True)
class FragmentInfo:
    """One fragment of a table version: its id and physical row count."""

    fragment_id: int
    num_rows: int


def parse_version(ref: int | str | None) -> int | str | None:
    """Return ``ref`` as a version number if it is one (``"7"`` -> 7), else the tag name or None."""
    if ref is None or isinstance(ref, int):
        return ref
    text = str(ref).strip()
    return int(text) if text.isdigit() else text


def open_at(
    uri: str, version: int | str | None = None, *, storage_options: dict[str, str] | None = None
) -> lance.LanceDataset:
    """Open the table at ``uri`` at a version number or tag (latest when None).

    Raises :class:`TableReadError` with reason ``table_not_found`` or ``version_not_found``.
    """
    ref = parse_version(version)
    try:
        latest = lance.dataset(uri, storage_options=storage_options)
    except (ValueError, OSError) as err:
        raise TableReadError("table_not_found", f"no Lance table at {uri} ({err})") from err
    if ref is None:
        return latest
    try:
        return lance.dataset(uri, version=ref, storage_options=storage_options)
    except (ValueError, OSError, KeyError) as err:
        known = [v["version"] for v in latest.versions()][-5:]
        tags = sorted(latest.tags.list())
        raise TableReadError(
            "version_not_found",
            f"{uri} has no version or tag {ref!r} (latest versions {known}, tags {tags}); "
            "pick one of them or re-register the dataset",
        ) from err


def require_columns(ds: lance.LanceDataset, columns: Sequence[str], *, uri: str = "") -> None:
    """Raise :class:`TableReadError` (``column_missing``) unless every column exists in ``ds``."""
    names = set(ds.schema.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise TableReadError(
            "column_missing",
            f"{uri or ds.uri} (version {ds.version}) has no column {', '.join(missing)}; "
            f"columns are {', '.join(ds.schema.names)}",
        )


def list_fragments(ds: lance.LanceDataset) -> list[FragmentInfo]:
    """Return the fragments of this version, in table order."""
    return [FragmentInfo(f.fragment_id, f.count_rows()) for f in ds.get_fragments()]


def scan_batches(
    ds: lance.LanceDataset,
    columns: Sequence[str],
    *,
    where: str | None = None,
    fragment_ids: Sequence[int] | None = None,
    batch_size: int = 256,
) -> Iterator[pa.RecordBatch]:
    """Yield record batches of ``columns`` (rows matching ``where``), optionally of some fragments only."""
    fragments = None
    if fragment_ids is not None:
        fragments = [ds.get_fragment(i) for i in fragment_ids]
        if any(f is None for f in fragments):
            raise TableReadError(
                "fragment_not_found",
                f"{ds.uri} version {ds.version} has no fragment among {list(fragment_ids)}",
            )
    scanner = ds.scanner(
        columns=list(columns), filter=where, fragments=fragments, batch_size=batch_size, scan_in_order=True
    )
    yield from scanner.to_batches()


def count_rows(ds: lance.LanceDataset, where: str | None = None) -> int:
    """Return the number of rows matching ``where`` in this version."""
    return ds.count_rows(filter=where)

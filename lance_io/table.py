"""Create, open and append to image tables; appending the same content twice adds it once.

Example::

    from lance_io import append_images, open_table
    result = append_images("/data/hotel.lance", rows)   # rows: pa.Table in IMAGE_SCHEMA
    print(result.added, len(result.duplicate_ids), result.version)
    ds = open_table("/data/hotel.lance", version="before-finetune")
"""

from __future__ import annotations

import errno
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lance
import pyarrow as pa

from lance_io.reasons import ReasonError
from lance_io.scan import TableReadError, lance_detail, lance_reason, open_at
from lance_io.schema import ID, IMAGE_SCHEMA, TRUTH
from lance_io.sql import sql_strings

# Keeps fragments a size where one fragment is one unit of tagging work (see columns.py).
DEFAULT_MAX_ROWS_PER_FILE = 1024
WRITE_BATCH_BYTES = 64 * 2**20
"""Bytes of rows handed to Lance's writer at a time. Lance writes each batch of large values it is
given as one page (small ones it gathers), and a scan holds whole pages: 1,200 photos of 1.3 MB
given as one table made a page of 1.36 GB (docs/scale.md)."""
_ID_LOOKUP_CHUNK = 2000


# What a failed write means and what to do, by the reason lance_reason() finds in Lance's error.
_WRITE_FAILURES = {
    "storage_full": ("no space left on the device", "free space (or move the table) and rerun: nothing is written twice"),
    "storage_unreachable": ("the object store did not answer", "rerun when it is reachable again: nothing is written twice"),
    "permission_denied": ("permission denied", "check the permissions of the table's folder or bucket"),
}


class TableWriteError(ReasonError, OSError):
    """A write to a table failed; the table is unchanged at ``version``. The message says what to do.

    An ``OSError`` too, so callers that handle I/O failures keep handling it.
    """

    def __init__(self, uri: str, version: int | None, cause: BaseException) -> None:
        reason = lance_reason(cause)
        if reason not in _WRITE_FAILURES:
            reason = "write_failed"
        what, todo = _WRITE_FAILURES.get(
            reason, (lance_detail(cause)[:300], "rerun once the cause is fixed: nothing is written twice")
        )
        state = f"the table is unchanged at version {version}" if version is not None else "the table keeps its last commit"
        super().__init__(reason, f"could not write to {uri}: {what}; {state}; {todo}")
        self.uri, self.version = uri, version


def page_sized(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Yield ``batches`` sliced (without copying) to about :data:`WRITE_BATCH_BYTES` each; small rows stay whole batches."""
    for batch in batches:
        rows = max(1, WRITE_BATCH_BYTES * batch.num_rows // max(1, batch.nbytes))
        for start in range(0, batch.num_rows, rows):
            yield batch.slice(start, rows)


@contextmanager
def translated_write_errors(uri: str, version: int | None) -> Iterator[None]:
    """Turn a failed Lance write into a :class:`TableWriteError` naming the table and its intact version."""
    try:
        yield
    except TableWriteError:
        raise
    except (OSError, ValueError) as exc:  # pylance reports I/O failures as OSError or ValueError
        if "conflict" in str(exc).lower() or (isinstance(exc, ValueError) and "LanceError(IO)" not in str(exc)):
            raise  # commit conflicts are for the caller; other ValueErrors are not I/O
        raise TableWriteError(uri, version, exc) from exc


@dataclass(frozen=True)
class AppendResult:
    """What an append did: rows added, ids already present, and the version it created."""

    added: int
    duplicate_ids: list[str] = field(default_factory=list)
    version: int | None = None


def table_exists(uri: str, *, storage_options: dict[str, str] | None = None) -> bool:
    """Return whether a Lance table exists at ``uri``.

    Raises :class:`lance_io.scan.TableReadError` (``storage_unreachable``, ``permission_denied``)
    when the store cannot say: an unreachable bucket is not an empty one.
    """
    try:
        open_at(uri, storage_options=storage_options)
    except TableReadError as err:
        if err.reason != "table_not_found":
            raise
        return False
    return True


def check_new_table_location(uri: str) -> None:
    """Refuse a local path no table can be created at (inside a file, in a read-only or virtual file
    system), so a job is refused before it starts work: Lance would fail only at its first write.

    Object storage is not probed here: :func:`table_exists` has reached it already.
    """
    if "://" in uri and not uri.startswith("file://"):
        return
    path = Path(uri.removeprefix("file://")).absolute()
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise ReasonError("bad_option", f"cannot create a table at {uri}: {ancestor} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        reason = "permission_denied" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "write_failed"
        raise ReasonError(
            reason, f"cannot create a table at {uri}: {ancestor} takes no new files ({exc.strerror}); choose another place"
        ) from None


def open_table(
    uri: str, version: int | str | None = None, *, storage_options: dict[str, str] | None = None
) -> lance.LanceDataset:
    """Open the table at ``uri``, at the latest version, a version number, or a tag name.

    Raises :class:`lance_io.scan.TableReadError` naming the URI or the version (``table_not_found``,
    ``version_not_found``, ``permission_denied``, ``storage_unreachable``).
    """
    return open_at(uri, version, storage_options=storage_options)


def _conform(rows: pa.Table, target: pa.Schema | None) -> pa.Table:
    """Order and cast ``rows`` to the table schema; new optional columns are kept at the end."""
    if target is None:
        missing = [f.name for f in IMAGE_SCHEMA if f.name not in rows.column_names]
        if missing:
            raise ValueError(f"rows lack image table columns: {', '.join(missing)}")
        extra = [rows.schema.field(n) for n in rows.column_names if n not in IMAGE_SCHEMA.names]
        target = pa.schema(list(IMAGE_SCHEMA) + extra)
    else:
        unknown = [n for n in rows.column_names if n not in target.names]
        if unknown:
            raise ValueError(
                f"columns {', '.join(unknown)} are not in the table; add them first (lance_io.ensure_columns)"
            )
    columns = []
    for f in target:
        if f.name in rows.column_names:
            columns.append(rows.column(f.name).cast(f.type))
        elif f.nullable:
            columns.append(pa.nulls(rows.num_rows, f.type))
        else:
            raise ValueError(f"rows lack the required column {f.name!r}")
    return pa.Table.from_arrays(columns, schema=target)


def existing_ids(ds: lance.LanceDataset, ids: Iterable[str]) -> set[str]:
    """Return which of ``ids`` are already rows of ``ds`` (uses the ``id`` index when present)."""
    found: set[str] = set()
    ids = list(ids)
    for start in range(0, len(ids), _ID_LOOKUP_CHUNK):
        chunk = ids[start : start + _ID_LOOKUP_CHUNK]
        hits = ds.to_table(columns=[ID], filter=f"{ID} IN ({sql_strings(chunk)})")
        found.update(hits.column(ID).to_pylist())
    return found


def kept_truths(
    uri: str, version: int | None, ids: Iterable[str], *, storage_options: dict[str, str] | None = None
) -> dict[str, tuple[str | None, str | None]]:
    """Return ``id -> (truth, source)`` of the rows among ``ids`` the table holds at ``version``
    (latest when None): the copy of each image a table keeps, and the label it was added with."""
    ds = lance.dataset(uri, version=version, storage_options=storage_options)
    columns = [c for c in (ID, TRUTH, "source") if c in ds.schema.names]
    kept: dict[str, tuple[str | None, str | None]] = {}
    ids = list(ids)
    for start in range(0, len(ids), _ID_LOOKUP_CHUNK):
        rows = ds.to_table(columns=columns, filter=f"{ID} IN ({sql_strings(ids[start : start + _ID_LOOKUP_CHUNK])})")
        for row in rows.to_pylist():
            kept[row[ID]] = (row.get(TRUTH), row.get("source"))
    return kept


def drop_concurrent_duplicates(
    uri: str,
    version: int,
    checked_version: int | None,
    ids: Iterable[str],
    *,
    storage_options: dict[str, str] | None = None,
    properties: dict[str, str] | None = None,
) -> tuple[set[str], int]:
    """Remove the rows an append added (at ``version``) whose ids another writer committed first.

    The appender checked its ``ids`` against ``checked_version``. Lance rebases an append over the
    appends other writers committed since, it does not refuse it, so two writers that checked
    before either committed can both add the same content. Versions are ordered: whatever the
    table held just before ``version`` was there first and stays; this append's own fragments
    lose those rows, in one more commit. Every writer that calls this after its append leaves
    each id once. Returns (ids removed, the table's version after).
    """
    if checked_version is None or version - 1 <= checked_version:  # nobody committed in between
        return set(), version
    before = lance.dataset(uri, version=version - 1, storage_options=storage_options)
    duplicates = existing_ids(before, ids)
    if not duplicates:
        return set(), version
    earlier = {fragment.fragment_id for fragment in before.get_fragments()}
    ours = [f for f in lance.dataset(uri, version=version, storage_options=storage_options).get_fragments()
            if f.fragment_id not in earlier]
    predicate = f"{ID} IN ({sql_strings(sorted(duplicates))})"
    updated, emptied = [], []
    for fragment in ours:
        kept = fragment.delete(predicate)
        if kept is None:
            emptied.append(fragment.fragment_id)
        elif kept.deletion_file is not None:
            updated.append(kept)
    if not updated and not emptied:  # the ids were not this append's rows
        return set(), version
    from lance.dataset import Transaction

    operation = lance.LanceOperation.Delete(updated, emptied, predicate)
    transaction = Transaction(
        version, operation, transaction_properties={"lancetag.operation": "drop_concurrent_duplicates", **(properties or {})}
    )
    with translated_write_errors(uri, version):
        after = lance.LanceDataset.commit(uri, transaction, read_version=version, storage_options=storage_options)
    return duplicates, after.version


def ensure_id_index(ds: lance.LanceDataset) -> None:
    """Create the BTREE index on ``id`` if missing, else fold new fragments into it."""
    if any(idx["fields"] == [ID] for idx in ds.list_indices()):
        ds.optimize.optimize_indices()
    else:
        ds.create_scalar_index(ID, index_type="BTREE")


def new_rows_of(ids: list[str], ds: lance.LanceDataset | None) -> tuple[list[int], list[str]]:
    """Return (positions of the rows to write, duplicate ids): the first sighting of each id the table lacks."""
    first_seen: dict[str, int] = {}
    for i, row_id in enumerate(ids):
        first_seen.setdefault(row_id, i)
    duplicates = [row_id for i, row_id in enumerate(ids) if first_seen[row_id] != i]
    known = existing_ids(ds, first_seen) if ds is not None else set()
    duplicates += [row_id for row_id in first_seen if row_id in known]
    return sorted(i for row_id, i in first_seen.items() if row_id not in known), duplicates


def append_images(
    uri: str,
    rows: pa.Table,
    *,
    storage_options: dict[str, str] | None = None,
    properties: dict[str, str] | None = None,
    max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
) -> AppendResult:
    """Append image rows to the table at ``uri`` (created if missing), skipping known content.

    Rows whose ``id`` is already in the table, or repeated within ``rows``, are not written
    and are reported in ``duplicate_ids``. The write is one atomic commit; ``properties`` are
    stored in that version's transaction (see :func:`lance_io.versions.list_versions`).
    """
    if rows.num_rows == 0:
        return AppendResult(added=0)
    ds = lance.dataset(uri, storage_options=storage_options) if table_exists(uri, storage_options=storage_options) else None
    keep, duplicates = new_rows_of(rows.column(ID).to_pylist(), ds)
    if not keep:
        return AppendResult(added=0, duplicate_ids=duplicates, version=ds.version if ds else None)

    kept = rows if len(keep) == rows.num_rows else rows.take(pa.array(keep, pa.int64()))  # no copy when all are new
    new_rows = _conform(kept, ds.schema if ds is not None else None)
    with translated_write_errors(uri, ds.version if ds is not None else None):
        written = lance.write_dataset(
            pa.RecordBatchReader.from_batches(new_rows.schema, page_sized(new_rows.to_batches())),
            uri,
            mode="append" if ds is not None else "create",
            max_rows_per_file=max_rows_per_file,
            storage_options=storage_options,
            transaction_properties={"lancetag.operation": "append_images", **(properties or {})},
        )
    if ds is None:
        ensure_id_index(written)
        written = lance.dataset(uri, storage_options=storage_options)
        return AppendResult(added=len(keep), duplicate_ids=duplicates, version=written.version)
    raced, version = drop_concurrent_duplicates(
        uri, written.version, ds.version, new_rows.column(ID).to_pylist(), storage_options=storage_options, properties=properties
    )
    return AppendResult(added=len(keep) - len(raced), duplicate_ids=duplicates + sorted(raced), version=version)

"""Rows written by many workers, committed by one: data files first, then one commit that makes them rows.

A worker writes its rows as Lance data files (:func:`write_rows`) and hands back only the
fragment metadata, as JSON. Nothing it wrote is part of the table until the one process that
owns the commit turns a group of fragments into a version (:func:`commit_fragments`): a crash
before that leaves files no version references (invisible; :mod:`lance_io.maintenance` reclaims
them). When a fragment holds a row that must not be added after all (its content was committed
meanwhile), :func:`without_ids` rewrites the fragment without it before the commit; that runs
wherever the caller wants (a Ray task), so the committing process never reads a row's data.

Example::

    from lance_io.fragments import commit_fragments, write_rows
    written = write_rows(batches, "s3://bucket/photos.lance", schema)     # in each worker
    version = commit_fragments("s3://bucket/photos.lance", all_written, schema)  # once, on the driver
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

import lance
import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import FragmentMetadata, write_fragments

from lance_io.reasons import ReasonError
from lance_io.schema import ID
from lance_io.table import (
    DEFAULT_MAX_ROWS_PER_FILE,
    ensure_id_index,
    existing_ids,
    page_sized,
    table_exists,
    translated_write_errors,
)


@dataclass(frozen=True)
class WrittenFragment:
    """A fragment a worker wrote and nobody committed yet: its metadata (JSON) and the ids of its rows."""

    metadata: str
    ids: tuple[str, ...]

    @property
    def rows(self) -> int:
        """Rows the fragment holds."""
        return len(self.ids)


def write_rows(
    batches: Iterable[pa.RecordBatch],
    uri: str,
    schema: pa.Schema,
    *,
    storage_options: dict[str, str] | None = None,
    max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
) -> list[WrittenFragment]:
    """Write ``batches`` as data files of the table at ``uri`` without committing; return the fragments.

    ``schema`` is the columns written, named as in the table (a table that does not exist yet gets
    them in this order); columns the table has and ``schema`` lacks read as null. Batches are
    written as they come, so a worker holds one batch at a time, each in pages of about
    :data:`lance_io.table.WRITE_BATCH_BYTES`.
    """
    ids: list[list[str]] = []

    def with_ids() -> Iterable[pa.RecordBatch]:
        for batch in batches:
            ids.append(batch.column(ID).to_pylist())
            yield batch

    reader = pa.RecordBatchReader.from_batches(schema, page_sized(with_ids()))
    with translated_write_errors(uri, None):
        fragments = write_fragments(
            reader, uri, schema=schema, max_rows_per_file=max_rows_per_file, storage_options=storage_options
        )
    row_ids = [row_id for chunk in ids for row_id in chunk]
    out, start = [], 0
    for fragment in fragments:  # files are filled in order, max_rows_per_file rows each
        rows = fragment.physical_rows
        out.append(WrittenFragment(json.dumps(fragment.to_json()), tuple(row_ids[start : start + rows])))
        start += rows
    return out


def without_ids(
    uri: str, fragment: WrittenFragment, drop: set[str], *, storage_options: dict[str, str] | None = None
) -> WrittenFragment | None:
    """Rewrite an uncommitted fragment without the rows whose id is in ``drop`` (None when none is left).

    The old data files are deleted: no version references them, and no other writer knows them.
    """
    from lance.file import LanceFileReader

    from lance_io.storage import table_filesystem

    files = [f["path"] for f in json.loads(fragment.metadata)["files"]]
    tables = [
        LanceFileReader(f"{uri.rstrip('/')}/data/{path}", storage_options=storage_options).read_all().to_table()
        for path in files
    ]
    table = tables[0]
    for extra in tables[1:]:  # a fragment of several files holds different columns of the same rows
        for name in extra.column_names:
            table = table.append_column(extra.schema.field(name), extra.column(name))
    kept = table.filter(pc.invert(pc.is_in(table.column(ID), pa.array(sorted(drop), pa.string()))))
    written = write_rows(kept.to_batches(), uri, kept.schema, storage_options=storage_options) if kept.num_rows else []
    filesystem, root = table_filesystem(uri, storage_options)
    for path in files:
        with contextlib.suppress(OSError):  # left behind, it is an orphan that maintenance reclaims
            filesystem.delete_file(f"{root}/data/{path}")
    return written[0] if written else None


def commit_fragments(
    uri: str,
    fragments: list[WrittenFragment],
    schema: pa.Schema,
    *,
    read_version: int | None,
    storage_options: dict[str, str] | None = None,
    properties: dict[str, str] | None = None,
) -> lance.LanceDataset:
    """Make ``fragments`` rows of the table in one commit; create the table (with ``schema``) when it has none.

    ``read_version`` is the version the caller checked the fragments' rows against; appends by
    other writers since then rebase. A new table gets the ``id`` index in a second commit. Lance
    lets a creation replace a table another writer created meanwhile: that table is put back and
    ``ReasonError("concurrent_write")`` raised (the other writer's next commit fails too, so both rerun).
    """
    from lance.dataset import Transaction

    metadata = [FragmentMetadata.from_json(f.metadata) for f in fragments]
    properties = {"lancetag.operation": "append_images", **(properties or {})}
    with translated_write_errors(uri, read_version):
        if read_version is None:
            operation = lance.LanceOperation.Overwrite(schema, metadata)
            ds = lance.LanceDataset.commit(
                uri, Transaction(0, operation, transaction_properties=properties), storage_options=storage_options
            )
            if ds.version != 1:  # another writer created the table since the caller saw none, and Lance let this replace it
                lance.dataset(uri, version=ds.version - 1, storage_options=storage_options).restore()
                raise ReasonError(
                    "concurrent_write",
                    f"another process created {uri} while this one was creating it; its rows are kept and "
                    "this run's are not added: rerun (nothing is added twice)",
                )
            ensure_id_index(ds)
            return lance.dataset(uri, storage_options=storage_options)
        operation = lance.LanceOperation.Append(metadata)
        return lance.LanceDataset.commit(
            uri, Transaction(read_version, operation, transaction_properties=properties),
            read_version=read_version, storage_options=storage_options,
        )


def ids_in_table(
    uri: str, version: int | None, ids: list[str], *, storage_options: dict[str, str] | None = None
) -> set[str]:
    """Return which of ``ids`` are rows of the table at ``version`` (latest when None)."""
    return existing_ids(lance.dataset(uri, version=version, storage_options=storage_options), ids)


def unindexed_rows(ds: lance.LanceDataset) -> int:
    """Rows of ``ds`` the ``id`` index does not cover yet (all of them when there is no index)."""
    indexed = next((set(i["fragment_ids"]) for i in ds.list_indices() if i["fields"] == [ID]), set())
    return sum(f.count_rows() for f in ds.get_fragments() if f.fragment_id not in indexed)


def fold_into_id_index(uri: str, *, min_rows: int, storage_options: dict[str, str] | None = None) -> int | None:
    """Fold unindexed rows into the ``id`` index when there are at least ``min_rows``; return the new version.

    Id lookups (the dedup of every append) read unindexed rows in full, so this keeps their cost
    bounded by ``min_rows`` however large the table grows.
    """
    if not table_exists(uri, storage_options=storage_options):
        return None
    ds = lance.dataset(uri, storage_options=storage_options)
    if unindexed_rows(ds) < max(min_rows, 1):
        return None
    ensure_id_index(ds)
    return lance.dataset(uri, storage_options=storage_options).version

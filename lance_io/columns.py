"""Computed columns (labels, splits): add them, find the rows still to do, commit values by ``id``.

The one commit protocol of every computed column (the labeling run's phases around it:
docs/labeling.md, "The lifecycle of a run"):

1. :func:`ensure_columns` adds the output columns as all-null columns. Metadata only: adding
   ``label`` to a table of ten million images writes nothing.
2. :func:`plan_fragments` finds the fragments holding rows that still need work (a *todo*
   predicate such as ``label IS NULL``, and the user's ``where``), reading only those columns.
3. Someone computes values: ``id`` plus the output columns, never the image bytes.
4. :func:`commit_values` writes a group of such values, from any number of fragments, as ONE
   Lance ``Update``: it locates the ids *at commit time*, keeps only the rows that still match
   the todo predicate, writes one small data file of output columns per touched fragment and
   commits them together. :class:`PendingValues` decides when a group is due (rows or age).
   Locating costs the group, not the table, when the fragments the values' rows were read from
   are given: rows still there are found by scanning those fragments; only the others are
   looked up by id in the whole table (its index).

Because rows are located by ``id`` when the commit is made, the commit is right whatever
happened meanwhile: rows appended by another writer are rebased over (they stay todo); a
compaction or a concurrent job on the same rows makes Lance refuse the commit with
``CommitConflictError``, and the values are located again and re-applied to the rows that
still need them. No row is ever written twice, and every commit records how many rows it
wrote (``lancetag.rows``) so that can be audited.

:func:`fill_column` runs steps 1-4 in the calling process for columns cheap to compute (the
demo's ``split``); :func:`write_fragment` is the same for one fragment.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance import LanceOperation, Transaction
from lance.commit import CommitConflictError

from lance_io.scan import rows_with_ids
from lance_io.schema import ID
from lance_io.table import translated_write_errors

ENSURE_ATTEMPTS = 20
COMMIT_ATTEMPTS = 20
SCAN_ROWS_PER_VALUE = 16
"""The fragments values were read from are scanned to locate them when they hold at most this many rows a value;
otherwise the ids are looked up in the whole table (its index), a cost that grows with the table."""
_ROW_ADDRESS = "_rowaddr"
_READ_FROM = "_lancetag_read_from"

Compute = Callable[[pa.RecordBatch], pa.RecordBatch]
"""Maps a batch of input columns (always with ``id``) to a batch of output columns, same length."""


@dataclass(frozen=True)
class FragmentTodo:
    """A fragment that holds rows still to compute, and how many."""

    fragment_id: int
    rows: int


@dataclass(frozen=True)
class ValuesCommit:
    """What one :func:`commit_values` call wrote.

    ``version`` is None when no row still needed a value (nothing committed); ``written`` holds
    the rows written (``id`` + output columns); ``fragments`` the fragments they live in.
    """

    version: int | None
    written: pa.Table
    fragments: tuple[int, ...] = ()
    conflicts: int = 0

    @property
    def rows(self) -> int:
        """Rows written by this commit."""
        return self.written.num_rows


@dataclass
class FillResult:
    """What :func:`fill_column` (or :func:`write_fragment`) committed."""

    rows_written: int = 0
    versions: list[int] = field(default_factory=list)
    conflicts_resolved: int = 0


def _and(*predicates: str | None) -> str | None:
    parts = [f"({p})" for p in predicates if p]
    return " AND ".join(parts) if parts else None


def ensure_columns(
    uri: str, fields: pa.Schema | list[pa.Field], *, storage_options: dict[str, str] | None = None
) -> int:
    """Add the fields missing from the table as all-null columns; return the table version.

    Adding is metadata-only. A field that exists with another type is an error naming it. A
    commit that loses a race (an ingest appending, another job adding the same columns) is
    retried against the new version.
    """
    for attempt in range(ENSURE_ATTEMPTS):
        ds = lance.dataset(uri, storage_options=storage_options)
        missing = _missing_fields(ds, fields, uri)
        if not missing:
            return ds.version
        try:
            ds.add_columns(missing)
        except CommitConflictError:
            if attempt == ENSURE_ATTEMPTS - 1:
                raise
            time.sleep(random.uniform(0, 0.05 * (attempt + 1)))  # let the other writer finish
            continue
        except (OSError, ValueError):
            # Another job may have added them a moment ago: fine if they are all there now.
            if _missing_fields(lance.dataset(uri, storage_options=storage_options), fields, uri):
                raise
        return lance.dataset(uri, storage_options=storage_options).version
    raise AssertionError("unreachable: the last attempt returns or raises")


def _missing_fields(ds: lance.LanceDataset, fields: pa.Schema | list[pa.Field], uri: str) -> list[pa.Field]:
    """Return the fields the table lacks; a field present with another type is an error."""
    missing = []
    for f in fields:
        if f.name not in ds.schema.names:
            missing.append(f)
        elif (have := ds.schema.field(f.name).type) != f.type:
            raise ValueError(f"column {f.name!r} exists in {uri} as {have}, not {f.type}")
    return missing


def plan_fragments(
    uri: str,
    todo: str,
    *,
    where: str | None = None,
    storage_options: dict[str, str] | None = None,
) -> list[FragmentTodo]:
    """Return the fragments with rows matching ``todo AND where``, with their row counts.

    ``todo`` is a SQL predicate saying a row still needs work (``"label IS NULL"``).
    """
    ds = lance.dataset(uri, storage_options=storage_options)
    counts: Counter[int] = Counter()
    scanner = ds.scanner(columns=[], with_row_address=True, filter=_and(todo, where))
    for batch in scanner.to_batches():
        addresses = batch.column(_ROW_ADDRESS).to_numpy()
        counts.update((addresses >> 32).tolist())
    return [FragmentTodo(fid, n) for fid, n in sorted(counts.items())]


def todo_batches(
    ds: lance.LanceDataset, fragment_id: int, read_columns: list[str], predicate: str | None, batch_size: int
) -> Iterator[pa.RecordBatch]:
    """Yield ``id`` + ``read_columns`` of the rows of one fragment matching ``predicate``.

    A fragment that no longer exists (compacted away since the plan) yields nothing: its rows
    live in another fragment now, and the next plan finds them there.
    """
    fragment = ds.get_fragment(fragment_id)
    if fragment is None:
        return
    columns = [ID, *[c for c in read_columns if c != ID]]
    yield from fragment.scanner(columns=columns, filter=predicate, batch_size=batch_size).to_batches()


class PendingValues:
    """Computed values not yet committed; says when they are due for one commit.

    Due when they hold ``commit_rows`` rows or the oldest is ``commit_seconds`` old (if given):
    the rows a crash can lose are bounded by both, and fragments that finish close together
    share one table version.
    """

    def __init__(self, commit_rows: int, commit_seconds: float | None = None) -> None:
        self.commit_rows, self.commit_seconds = commit_rows, commit_seconds
        self._parts: list[pa.Table] = []
        self._read_from: list[int | None] = []
        self._since: float | None = None
        self.rows = 0

    def add(self, values: pa.Table, read_from: int | None = None) -> None:
        """Keep ``values`` (``id`` + output columns) for the next commit, and the fragment their rows were read from."""
        if values.num_rows:
            self._parts.append(values)
            self._read_from.append(read_from)
            self.rows += values.num_rows
            self._since = self._since or time.monotonic()

    def due(self) -> bool:
        """Return whether the pending values should be committed now."""
        if not self.rows:
            return False
        aged = self.commit_seconds is not None and time.monotonic() - (self._since or 0) >= self.commit_seconds
        return self.rows >= self.commit_rows or aged

    def take(self) -> tuple[pa.Table, pa.Array | None] | None:
        """Return every pending value as one table with the fragment each row was read from (None unless every
        part said), or None if there are none; and forget them."""
        if not self._parts:
            return None
        values = pa.concat_tables(self._parts)
        read_from = None
        if None not in self._read_from:
            read_from = pa.array(np.repeat(np.array(self._read_from, np.int64), [p.num_rows for p in self._parts]))
        self._parts, self._read_from, self._since, self.rows = [], [], None, 0
        return values, read_from


def commit_values(
    uri: str,
    values: pa.Table,
    *,
    todo: str | None,
    properties: dict[str, str] | None = None,
    storage_options: dict[str, str] | None = None,
    written_properties: Callable[[pa.Table], dict[str, str]] | None = None,
    read_from: pa.Array | None = None,
) -> ValuesCommit:
    """Write ``values`` (``id`` + output columns) into the rows with those ids that still match ``todo``.

    One Lance ``Update`` for all the fragments the rows live in, whatever their number: only
    the output columns are written (a small data file per touched fragment), never the image
    bytes. The rows are located by ``id`` at commit time; on ``CommitConflictError`` (a
    compaction or another job touched those fragments first) they are located again and the
    commit retried, so values land on the rows' current fragments and only on rows that still
    need them. ``properties`` go into the version's transaction together with
    ``lancetag.rows``, the rows this commit wrote, and ``written_properties(rows written)`` if
    given (e.g. which node computed them). Storage failures raise
    :class:`~lance_io.table.TableWriteError`; the table is then unchanged.

    ``read_from``, if given, is the fragment each value's row was read from: rows still in those
    fragments are located by scanning them (when they hold at most :data:`SCAN_ROWS_PER_VALUE`
    rows a value), the rest by id in the whole table.

    Example::

        values = pa.table({"id": ["a1", "b2"], "label": ["cat", "dog"]})
        commit_values("/data/t.lance", values, todo="label IS NULL", properties={"lancetag.job": "j1"})
    """
    if read_from is not None:
        values = values.append_column(_READ_FROM, read_from)
    values = _first_per_id(values)
    audit = {"lancetag.operation": "commit_values", **(properties or {})}
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            with translated_write_errors(uri, None):
                ds = lance.dataset(uri, storage_options=storage_options)
            with translated_write_errors(uri, ds.version):
                result = _commit_once(ds, uri, values, todo, audit, storage_options, written_properties)
            return ValuesCommit(result.version, result.written, result.fragments, conflicts=attempt)
        except CommitConflictError:
            if attempt == COMMIT_ATTEMPTS - 1:
                raise
            time.sleep(random.uniform(0, 0.05 * (attempt + 1)))  # let the other writer finish
    raise AssertionError("unreachable: the last attempt returns or raises")


def _first_per_id(values: pa.Table) -> pa.Table:
    """Drop repeated ids (a row gets one value per commit: the first)."""
    ids = values.column(ID)
    if pc.count_distinct(ids).as_py() == values.num_rows:
        return values
    first: dict[str, int] = {}
    for i, row_id in enumerate(ids.to_pylist()):
        first.setdefault(row_id, i)
    return values.take(pa.array(sorted(first.values()), pa.int64()))


def _locate(ds: lance.LanceDataset, values: pa.Table, todo: str | None) -> tuple[list[str], list[int]]:
    """Return the ids of ``values`` whose rows still match ``todo`` and the fragment each lives in now."""
    found: list[pa.Table] = []
    ids = values.column(ID)
    if _READ_FROM in values.column_names:
        rows_in = {f.fragment_id: f.metadata.num_rows for f in ds.get_fragments()}
        read_from = [f for f in pc.unique(values.column(_READ_FROM)).to_pylist() if f in rows_in]
        if read_from and sum(rows_in[f] for f in read_from) <= SCAN_ROWS_PER_VALUE * values.num_rows:
            scanned = ds.scanner(columns=[ID], filter=todo, with_row_address=True,
                                 fragments=[ds.get_fragment(f) for f in read_from]).to_table()
            found.append(scanned.filter(pc.is_in(scanned.column(ID), value_set=ids.combine_chunks())))
            ids = ids.filter(pc.invert(pc.is_in(ids, value_set=found[0].column(ID).combine_chunks())))
    if len(ids):  # moved since they were read (a compaction), or read_from not given: by id, in the whole table
        found += rows_with_ids(ds, ids.to_pylist(), [ID], where=todo, with_row_address=True)
    if not found:
        return [], []
    hits = pa.concat_tables(found)
    return hits.column(ID).to_pylist(), (hits.column(_ROW_ADDRESS).to_numpy() >> 32).tolist()


def _commit_once(
    ds: lance.LanceDataset,
    uri: str,
    values: pa.Table,
    todo: str | None,
    properties: dict[str, str],
    storage_options: dict[str, str] | None,
    written_properties: Callable[[pa.Table], dict[str, str]] | None = None,
) -> ValuesCommit:
    """One attempt: locate the rows in ``ds``, write their values per fragment, commit on ``ds.version``."""
    ids, fragment_ids = _locate(ds, values, todo)
    if _READ_FROM in values.column_names:
        values = values.drop_columns([_READ_FROM])
    if not ids:
        return ValuesCommit(None, values.slice(0, 0))
    fragment_of = dict(zip(ids, fragment_ids, strict=True))
    written = values.filter(pc.is_in(values.column(ID), value_set=pa.array(ids, pa.string())))
    where = pa.array([fragment_of[i] for i in written.column(ID).to_pylist()], pa.int64())
    updated, fields_modified = [], []
    touched = tuple(sorted(set(fragment_ids)))
    for fid in touched:
        part = written.filter(pc.equal(where, fid))
        meta, fields_modified = ds.get_fragment(fid).update_columns(part, left_on=ID, right_on=ID)
        updated.append(meta)
    operation = LanceOperation.Update(updated_fragments=updated, fields_modified=fields_modified)
    # lancetag.rows: the rows this version wrote; summed over a column's commits, it audits reruns.
    audit = {**properties, "lancetag.rows": str(written.num_rows), "lancetag.fragments": str(len(touched))}
    if written_properties is not None:
        audit.update(written_properties(written))
    new = lance.LanceDataset.commit(
        uri,
        Transaction(ds.version, operation, transaction_properties=audit),
        read_version=ds.version,
        storage_options=storage_options,
    )
    return ValuesCommit(new.version, written, touched)


def _conform_output(out: pa.RecordBatch | pa.Table, ids: pa.Array, output_schema: pa.Schema) -> pa.Table:
    if out.num_rows != len(ids):
        raise ValueError(f"compute returned {out.num_rows} rows for {len(ids)} inputs")
    missing = [f.name for f in output_schema if f.name not in out.schema.names]
    if missing:
        raise ValueError(f"compute did not return the columns {', '.join(missing)}")
    arrays = [ids] + [out.column(f.name).cast(f.type) for f in output_schema]
    return pa.Table.from_arrays(arrays, schema=pa.schema([pa.field(ID, pa.string()), *output_schema]))


def fill_column(
    uri: str,
    compute: Compute,
    *,
    read_columns: list[str],
    output_schema: pa.Schema,
    todo: str,
    where: str | None = None,
    fragment_ids: list[int] | None = None,
    batch_size: int = 1024,
    commit_rows: int = 4096,
    properties: dict[str, str] | None = None,
    storage_options: dict[str, str] | None = None,
) -> FillResult:
    """Compute ``output_schema`` columns for the rows matching ``todo AND where`` here, and commit them.

    The columns are added if missing. Reads ``id`` plus ``read_columns`` of the todo rows
    (of ``fragment_ids`` only, if given), calls ``compute`` on batches of ``batch_size`` rows
    and commits through :func:`commit_values` every ``commit_rows`` rows and at the end: many
    small fragments share one version. For columns cheap enough to compute in the calling
    process; labeling computes on Ray workers and commits the same way
    (``ray_jobs.label.lifecycle``).

    Example::

        split = pa.schema([pa.field("split", pa.string())])
        fill_column(uri, lambda b: pa.record_batch([pa.array(["train"] * b.num_rows)], schema=split),
                    read_columns=[], output_schema=split, todo="split IS NULL")
    """
    ensure_columns(uri, output_schema, storage_options=storage_options)
    props = {"lancetag.operation": "fill_column", **(properties or {})}
    if fragment_ids is None:
        fragment_ids = [f.fragment_id for f in plan_fragments(uri, todo, where=where, storage_options=storage_options)]
    result = FillResult()
    pending = PendingValues(commit_rows)

    def commit() -> None:
        taken = pending.take()
        if taken is not None:
            values, read_from = taken
            done = commit_values(uri, values, todo=todo, properties=props, storage_options=storage_options,
                                 read_from=read_from)
            result.rows_written += done.rows
            result.versions += [done.version] if done.version is not None else []
            result.conflicts_resolved += done.conflicts

    ds = lance.dataset(uri, storage_options=storage_options)
    for fid in fragment_ids:
        for batch in todo_batches(ds, fid, read_columns, _and(todo, where), batch_size):
            pending.add(_conform_output(compute(batch), batch.column(ID), output_schema), read_from=fid)
            if pending.due():
                commit()
    commit()
    return result


def write_fragment(
    uri: str,
    fragment_id: int,
    compute: Compute,
    *,
    read_columns: list[str],
    output_schema: pa.Schema,
    todo: str,
    where: str | None = None,
    batch_size: int = 32,
    commit_rows: int = 4096,
    properties: dict[str, str] | None = None,
    storage_options: dict[str, str] | None = None,
) -> FillResult:
    """Run :func:`fill_column` on one fragment: its todo rows are committed when it ends (and every ``commit_rows``).

    A fragment that no longer exists (compacted away) yields zero rows; the next plan finds
    its rows under their new fragment.
    """
    return fill_column(
        uri,
        compute,
        read_columns=read_columns,
        output_schema=output_schema,
        todo=todo,
        where=where,
        fragment_ids=[fragment_id],
        batch_size=batch_size,
        commit_rows=commit_rows,
        properties={"lancetag.operation": "write_fragment", "lancetag.fragment": str(fragment_id), **(properties or {})},
        storage_options=storage_options,
    )

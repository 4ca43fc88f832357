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
   Locating costs the group, not the table, when the values carry the Lance row id each row
   was read with (``_rowid``, which :func:`todo_batches` reads): those rows are taken by row
   id; only rows gone from there (a compaction moved them) are looked up by id in the whole
   table (its index).

Because rows are located when the commit is made (their ``id`` checked), the commit is right
whatever happened meanwhile: rows appended by another writer are rebased over (they stay
todo); a compaction or a concurrent job on the same rows makes Lance refuse the commit with
``CommitConflictError``, and the values are located again and re-applied to the rows that
still need them. No row is ever written twice, and every commit records how many rows it
wrote (``lancetag.rows``) so that can be audited.

:func:`fill_column` runs steps 1-4 in the calling process for columns cheap to compute (the
demo's ``split``); :func:`write_fragment` is the same for one fragment.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance import LanceOperation, Transaction
from lance.commit import CommitConflictError
from lance.fragment import FragmentMetadata

from lance_io.scan import rows_with_ids
from lance_io.schema import ID
from lance_io.table import translated_write_errors

ENSURE_ATTEMPTS = 20
COMMIT_ATTEMPTS = 20
ROW_ID = "_rowid"
"""Lance's row id of a row, as read (:func:`todo_batches`); values that carry it are taken by it at commit."""
_ROW_ADDRESS = "_rowaddr"
_TODO = "_lancetag_todo"

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
    ds: lance.LanceDataset, fragment_ids: Sequence[int], read_columns: list[str], predicate: str | None, batch_size: int
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yield ``(fragment_id, batch)``: ``id`` + ``read_columns`` + :data:`ROW_ID` of the rows matching ``predicate``,
    fragment by fragment in the order given.

    One scanner reads them all, reading ahead across fragments: a relabel spread thin touches
    every fragment of the table for a few rows each, and a scanner per fragment cost 1.3-1.4 ms
    each. Values handed to :func:`commit_values` with their batch's ``_rowid`` are located by
    it. A fragment that no longer exists (compacted away since the plan) yields nothing: its
    rows live in another fragment now, and the next plan finds them there.
    """
    fragments = [f for f in map(ds.get_fragment, fragment_ids) if f is not None]
    if not fragments:
        return
    columns = [ID, *[c for c in read_columns if c != ID]]
    scanner = ds.scanner(columns=columns, filter=predicate, batch_size=batch_size, with_row_id=True,
                         with_row_address=True, fragments=fragments, scan_in_order=True)
    for batch in scanner.to_batches():
        fragment = batch.column(_ROW_ADDRESS).to_numpy() >> 32
        batch = batch.drop_columns([_ROW_ADDRESS])
        bounds = [0, *(np.flatnonzero(np.diff(fragment)) + 1).tolist(), batch.num_rows]
        for start, end in itertools.pairwise(bounds):
            if end > start:
                yield int(fragment[start]), batch.slice(start, end - start)


class PendingValues:
    """Computed values not yet committed; says when they are due for one commit.

    Due when they hold ``commit_rows`` rows or the oldest is ``commit_seconds`` old (if given):
    the rows a crash can lose are bounded by both, and fragments that finish close together
    share one table version.
    """

    def __init__(self, commit_rows: int, commit_seconds: float | None = None) -> None:
        self.commit_rows, self.commit_seconds = commit_rows, commit_seconds
        self._parts: list[pa.Table] = []
        self._since: float | None = None
        self.rows = 0

    def add(self, values: pa.Table) -> None:
        """Keep ``values`` (``id`` + output columns, and the rows' ``_rowid`` if read) for the next commit."""
        if values.num_rows:
            self._parts.append(values)
            self.rows += values.num_rows
            self._since = self._since or time.monotonic()

    def due(self) -> bool:
        """Return whether the pending values should be committed now."""
        if not self.rows:
            return False
        aged = self.commit_seconds is not None and time.monotonic() - (self._since or 0) >= self.commit_seconds
        return self.rows >= self.commit_rows or aged

    def take(self) -> pa.Table | None:
        """Return every pending value as one table (``_rowid`` null where a part had none), or None; forget them."""
        if not self._parts:
            return None
        values = pa.concat_tables(self._parts, promote_options="default")
        self._parts, self._since, self.rows = [], None, 0
        return values


def commit_values(
    uri: str,
    values: pa.Table,
    *,
    todo: str | None,
    properties: dict[str, str] | None = None,
    storage_options: dict[str, str] | None = None,
    written_properties: Callable[[pa.Table], dict[str, str]] | None = None,
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

    ``values`` may also carry :data:`ROW_ID`, the Lance row id each row was read with
    (:func:`todo_batches`): those rows are taken by it, a cost that grows with the values and
    not with the table; a row no longer there (its fragment compacted away, or deleted), or a
    null ``_rowid``, is looked up by id in the whole table.

    Example::

        values = pa.table({"id": ["a1", "b2"], "label": ["cat", "dog"]})
        commit_values("/data/t.lance", values, todo="label IS NULL", properties={"lancetag.job": "j1"})
    """
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


def _locate(ds: lance.LanceDataset, values: pa.Table, todo: str | None) -> pa.Table:
    """Return ``id``, ``_rowid`` and ``_rowaddr`` of the rows of ``values`` that still match ``todo``, one per id."""
    found: list[pa.Table] = []
    ids = values.column(ID)
    if ROW_ID in values.column_names:
        settled = _take_by_row_id(ds, values, todo)
        found.append(settled.filter(settled.column(_TODO)))
        ids = ids.filter(pc.invert(pc.is_in(ids, value_set=settled.column(ID).combine_chunks())))
    if len(ids):  # not read with a row id, or gone from it (compacted, deleted): by id, in the whole table
        found += rows_with_ids(ds, ids.to_pylist(), [ID, ROW_ID], where=todo, with_row_address=True)
    located = [t.select([ID, ROW_ID, _ROW_ADDRESS]) for t in found]
    schema = pa.schema([pa.field(ID, pa.string()), pa.field(ROW_ID, pa.uint64()), pa.field(_ROW_ADDRESS, pa.uint64())])
    return _first_per_id(pa.concat_tables([t.cast(schema) for t in located], promote_options="none")
                         if located else schema.empty_table())


def _take_by_row_id(ds: lance.LanceDataset, values: pa.Table, todo: str | None) -> pa.Table:
    """Take the rows of ``values`` still at the row id they were read with: ``id``, ``_rowid``, ``_rowaddr``, whether ``todo``.

    A row id of a table without stable row ids is its address (fragment << 32 | offset), gone
    with its fragment when a compaction rewrites it: only addresses inside fragments ``ds``
    holds are taken. A deleted row is not returned; a row holding another id than the value's
    (never expected) counts as not found.
    """
    read = values.select([ID, ROW_ID]).filter(pc.is_valid(values.column(ROW_ID)))
    row_ids = read.column(ROW_ID).combine_chunks().cast(pa.uint64())
    if not ds.has_stable_row_ids:
        alive = pa.array(_addressable(ds, row_ids))
        read, row_ids = read.filter(alive), row_ids.filter(alive)
    columns = {ID: ID, _ROW_ADDRESS: _ROW_ADDRESS, ROW_ID: ROW_ID, _TODO: f"({todo})" if todo else "true"}
    taken = ds._take_rows(row_ids, columns=columns)  # Lance's take by row id: reads these rows only
    taken = taken.set_column(taken.schema.get_field_index(_TODO), _TODO, pc.fill_null(taken.column(_TODO), False))
    held = read.rename_columns([f"{ID}_read", ROW_ID]).join(taken, ROW_ID, join_type="inner")
    return held.filter(pc.equal(held.column(ID), held.column(f"{ID}_read"))).select([ID, ROW_ID, _ROW_ADDRESS, _TODO])


def _addressable(ds: lance.LanceDataset, addresses: pa.Array) -> np.ndarray:
    """Whether each row address (fragment << 32 | offset) points into a fragment ``ds`` holds (Lance refuses others)."""
    held = sorted((f.fragment_id, f.metadata.physical_rows) for f in ds.get_fragments())
    wanted = addresses.to_numpy(zero_copy_only=False)
    if not held:
        return np.zeros(len(wanted), bool)
    ids, rows = np.array(held, np.int64).T
    fragment, offset = (wanted >> 32).astype(np.int64), (wanted & 0xFFFFFFFF).astype(np.int64)
    at = np.minimum(np.searchsorted(ids, fragment), len(ids) - 1)
    return (ids[at] == fragment) & (offset < rows[at])


def _commit_once(
    ds: lance.LanceDataset,
    uri: str,
    values: pa.Table,
    todo: str | None,
    properties: dict[str, str],
    storage_options: dict[str, str] | None,
    written_properties: Callable[[pa.Table], dict[str, str]] | None = None,
) -> ValuesCommit:
    """One attempt: locate the rows in ``ds``, write their values per fragment by row id, commit on ``ds.version``."""
    located = _locate(ds, values, todo)
    if ROW_ID in values.column_names:
        values = values.drop_columns([ROW_ID])
    if not located.num_rows:
        return ValuesCommit(None, values.slice(0, 0))
    located = located.sort_by(_ROW_ADDRESS)
    written = values.take(pc.index_in(located.column(ID), value_set=values.column(ID).combine_chunks()))  # ids unique
    fragment_of = (located.column(_ROW_ADDRESS).to_numpy() >> 32).astype(np.int64)
    touched, starts = np.unique(fragment_of, return_index=True)
    parts = written.drop_columns([ID]).add_column(0, ROW_ID, located.column(ROW_ID))
    ends = [*starts[1:], located.num_rows]

    def update(i: int) -> tuple[FragmentMetadata, list[int]]:
        """Write fragment ``touched[i]``'s values: one data file of the output columns, joined on the row id."""
        part = parts.slice(starts[i], ends[i] - starts[i])
        return ds.get_fragment(int(touched[i])).update_columns(part, left_on=ROW_ID)

    with ThreadPoolExecutor() as pool:  # Lance writes without the GIL; on object storage each file is a round trip
        results = list(pool.map(update, range(len(touched))))
    updated, fields_modified = [meta for meta, _ in results], results[-1][1]
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
    return ValuesCommit(new.version, written, tuple(touched.tolist()))


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
            done = commit_values(uri, taken, todo=todo, properties=props, storage_options=storage_options)
            result.rows_written += done.rows
            result.versions += [done.version] if done.version is not None else []
            result.conflicts_resolved += done.conflicts

    ds = lance.dataset(uri, storage_options=storage_options)
    for _, batch in todo_batches(ds, fragment_ids, read_columns, _and(todo, where), batch_size):
        row_ids = batch.column(ROW_ID)
        values = _conform_output(compute(batch.drop_columns([ROW_ID])), batch.column(ID), output_schema)
        pending.add(values.append_column(ROW_ID, row_ids))
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

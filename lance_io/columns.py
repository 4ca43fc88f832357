"""Fragment-by-fragment column writes: the primitive behind incremental, resumable tagging.

The protocol, in the order a job runs it:

1. :func:`ensure_columns` adds the output columns as all-null columns. Metadata only: no
   data is written, so adding ``label`` to a table of ten million images is instant.
2. :func:`plan_fragments` finds the fragments holding rows that still need work: rows
   matching a *todo* predicate (``label IS NULL``, or provenance differs) and the user's
   ``where``. It reads only the predicate's columns.
3. :func:`write_fragment` computes the output columns for the todo rows of ONE fragment
   (reading only the input columns it needs) and commits them, that fragment alone, as a
   Lance ``Update`` that writes a new data file holding only the output columns. Image
   bytes are never rewritten. Large fragments commit every ``commit_rows`` rows, so a kill
   loses at most that much work.
4. There is no "finish" step: each commit is a complete, readable version. A rerun plans
   again and finds only what is left.

Rows are matched by ``id``, not by position, so a commit is correct whatever happened to
the table meanwhile: appends by another writer are rebased over (the new rows are simply
still to do), and if a fragment was rewritten (compaction) or labeled by a concurrent job,
the computed values are re-applied to the rows that still need them and nothing else.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import lance
import pyarrow as pa
import pyarrow.compute as pc
from lance import LanceOperation, Transaction
from lance.commit import CommitConflictError

from lance_io.schema import ID
from lance_io.sql import sql_strings
from lance_io.table import TableWriteError, translated_write_errors

ENSURE_ATTEMPTS = 20

Compute = Callable[[pa.RecordBatch], pa.RecordBatch]
"""Maps a batch of input columns (always with ``id``) to a batch of output columns, same length."""

_ROW_ADDRESS = "_rowaddr"


@dataclass(frozen=True)
class FragmentTodo:
    """A fragment that holds rows still to compute, and how many."""

    fragment_id: int
    rows: int


@dataclass
class FragmentCommit:
    """What :func:`write_fragment` did for one fragment."""

    fragment_id: int
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


def _todo_batches(
    frag: lance.LanceFragment, read_columns: list[str], predicate: str | None, batch_size: int
) -> Iterator[pa.RecordBatch]:
    columns = [ID, *[c for c in read_columns if c != ID]]
    yield from frag.scanner(columns=columns, filter=predicate, batch_size=batch_size).to_batches()


def _conform_output(out: pa.RecordBatch | pa.Table, ids: pa.Array, output_schema: pa.Schema) -> pa.Table:
    if out.num_rows != len(ids):
        raise ValueError(f"compute returned {out.num_rows} rows for {len(ids)} inputs")
    missing = [f.name for f in output_schema if f.name not in out.schema.names]
    if missing:
        raise ValueError(f"compute did not return the columns {', '.join(missing)}")
    arrays = [ids] + [out.column(f.name).cast(f.type) for f in output_schema]
    return pa.Table.from_arrays(arrays, schema=pa.schema([pa.field(ID, pa.string()), *output_schema]))


def _commit_update(
    uri: str,
    values: pa.Table,
    *,
    todo_predicate: str | None,
    properties: dict[str, str],
    storage_options: dict[str, str] | None,
    on_commit: Callable[[pa.Table], None] | None = None,
    max_attempts: int = 8,
) -> tuple[list[int], int, int]:
    """Write ``values`` (id + output columns) into the rows with those ids; one commit per fragment.

    Returns the versions created, the rows written, and how many conflicts were resolved.
    """
    conflicts = 0
    for attempt in range(max_attempts):
        try:
            with translated_write_errors(uri, None):
                return (*_apply_by_id(uri, values, todo_predicate, properties, storage_options, on_commit), conflicts)
        except OSError as exc:  # a commit conflict Lance could not rebase: locate the rows again
            if isinstance(exc, TableWriteError) or "conflict" not in str(exc).lower() or attempt == max_attempts - 1:
                raise
            conflicts += 1
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _apply_by_id(
    uri: str,
    values: pa.Table,
    todo_predicate: str | None,
    properties: dict[str, str],
    storage_options: dict[str, str] | None,
    on_commit: Callable[[pa.Table], None] | None,
) -> tuple[list[int], int]:
    """Locate the rows of ``values`` that still need them and commit, one fragment at a time."""
    ds = lance.dataset(uri, storage_options=storage_options)
    id_list = sql_strings(values.column(ID).to_pylist())
    # Where do these ids live now, and which of them still need the values?
    located = ds.to_table(columns=[ID], with_row_address=True, filter=_and(f"{ID} IN ({id_list})", todo_predicate))
    if located.num_rows == 0:
        return [], 0
    fragment_of = dict(
        zip(located.column(ID).to_pylist(), (located.column(_ROW_ADDRESS).to_numpy() >> 32).tolist(), strict=True)
    )
    versions = []
    committed: list[pa.Table] = []
    for fid in sorted(set(fragment_of.values())):
        wanted = pa.array([i for i, f in fragment_of.items() if f == fid], pa.string())
        part = values.filter(pc.is_in(values.column(ID), value_set=wanted))
        meta, fields_modified = ds.get_fragment(fid).update_columns(part, left_on=ID, right_on=ID)
        op = LanceOperation.Update(updated_fragments=[meta], fields_modified=fields_modified)
        audit = {**properties, "lancetag.rows": str(part.num_rows)}  # rows written: sums audit reruns
        ds = lance.LanceDataset.commit(
            uri,
            Transaction(ds.version, op, transaction_properties=audit),
            read_version=ds.version,
            storage_options=storage_options,
        )
        versions.append(ds.version)
        committed.append(part)
    if on_commit is not None:
        on_commit(pa.concat_tables(committed))
    return versions, located.num_rows


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
    on_commit: Callable[[pa.Table], None] | None = None,
) -> FragmentCommit:
    """Compute ``output_schema`` columns for the todo rows of one fragment and commit them.

    Reads ``id`` plus ``read_columns`` of the rows matching ``todo AND where`` in fragment
    ``fragment_id``, calls ``compute`` on batches of ``batch_size`` rows, and commits every
    ``commit_rows`` rows (and at the end). Only the output columns are written. Returns what
    was committed; a fragment that no longer exists (compacted away) yields zero rows, and
    the next plan finds its rows under their new fragment. ``on_commit`` is called with the
    rows (``id`` + outputs) each commit actually wrote.
    """
    ds = lance.dataset(uri, storage_options=storage_options)
    result = FragmentCommit(fragment_id)
    fragment = ds.get_fragment(fragment_id)
    if fragment is None:
        return result
    predicate = _and(todo, where)
    props = {"lancetag.operation": "write_fragment", "lancetag.fragment": str(fragment_id), **(properties or {})}
    pending: list[pa.Table] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if not pending:
            return
        values = pa.concat_tables(pending)
        versions, rows, conflicts = _commit_update(
            uri, values, todo_predicate=todo, properties=props, storage_options=storage_options, on_commit=on_commit
        )
        result.rows_written += rows
        result.versions += versions
        result.conflicts_resolved += conflicts
        pending, pending_rows = [], 0

    for batch in _todo_batches(fragment, read_columns, predicate, batch_size):
        out = compute(batch)
        pending.append(_conform_output(out, batch.column(ID), output_schema))
        pending_rows += batch.num_rows
        if pending_rows >= commit_rows:
            flush()
    flush()
    return result

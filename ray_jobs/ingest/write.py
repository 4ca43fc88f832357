"""What one ingest task does: check its items, write the new images as data files of the table, report.

A task gets work rows (how to get each item's bytes, plus the item's pass-through columns in the
``row`` struct: source, truth, metadata) and returns one outcome per item (``OUTCOME_SCHEMA``):
status, reason, id, size, the node it ran on, and on the first rows the fragments it wrote (JSON
of :class:`lance_io.fragments.WrittenFragment`). Image bytes go from the source straight into a
Lance data file in the worker; the driver sees ids and counts only, and commits the fragments.

Items are read and validated ``batch_size`` at a time and each group is written as it is done,
so a worker holds two groups of images, not the whole task: while it checks one group (hash,
decode: CPU) a thread reads the next (files, objects, URLs: waits on I/O). The same content twice in one task is
written once (the second is ``known``); across tasks the driver finds repeats when it commits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TypeVar

import pyarrow as pa

from lance_io.fragments import WrittenFragment, write_rows
from lance_io.reasons import ReasonError
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.worker import KNOWN, WORK_SCHEMA, check_batch, read_batch

FAILED = "task_failed"
"""The status of a task's only outcome row when it could not write (the driver raises its reason)."""
ROW = "row"
"""The work table's struct column holding an item's pass-through columns (source, truth, metadata)."""
OUTCOME_SCHEMA = pa.schema(
    [
        ("idx", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("id", pa.string()),
        ("size_bytes", pa.int64()),
        ("node", pa.string()),
        ("fragment", pa.string()),
    ]
)
T = TypeVar("T")
R = TypeVar("R")
_WORKER_COLUMNS = ("id", "sha256", "image", "size_bytes", "width", "height", "format", "mode", "exif_orientation", "frames")


def validate_and_write(
    batch: pa.Table,
    options_json: str,
    table: str,
    schema: bytes,
    job: str,
    known_version: int | None = None,
    storage_options: dict[str, str] | None = None,
) -> pa.Table:
    """Check every item of ``batch``, write the new images to ``table`` uncommitted; return the outcomes.

    ``schema`` (Arrow IPC) is the columns to write, typed as in the table. Content the table held
    at ``known_version`` (the run's start; an ingest leaves its table fully indexed, so a lookup
    reads the index only) is ``known``; what was committed since, the driver catches at commit time.
    """
    options = IngestOptions.model_validate_json(options_json)
    target = pa.ipc.read_schema(pa.py_buffer(schema))
    known_in = _open(table, known_version, storage_options) if known_version is not None else None
    outcomes: list[pa.Table] = []

    def image_rows() -> Iterator[pa.RecordBatch]:
        seen: set[str] = set()
        parts = [batch.slice(start, options.batch_size) for start in range(0, batch.num_rows, options.batch_size)]

        def read(part: pa.Table) -> tuple[list[dict], list]:  # a group's rows as Python objects only when read
            work = part.select(WORK_SCHEMA.names).to_pylist()
            return work, read_batch(work, options, options_json, storage_options)

        for part, (work, datas) in read_ahead(parts, read):
            yield from _checked_group(part, check_batch(work, datas, options, known_in), seen)

    def _checked_group(part: pa.Table, results: pa.Table, seen: set[str]) -> Iterator[pa.RecordBatch]:
        status = results.column("status").to_pylist()
        keep = []
        for i, (state, image_id) in enumerate(zip(status, results.column("id").to_pylist(), strict=True)):
            if state == "ok" and image_id in seen:
                status[i] = KNOWN  # the same content earlier in this task
            elif state == "ok":
                seen.add(image_id)
                keep.append(i)
        outcomes.append(results.select(["idx", "reason", "message", "id", "size_bytes"]).append_column(
            "status", pa.array(status, pa.string())
        ))
        if keep:
            yield _image_batch(results, part, keep, target, job)

    try:
        written = write_rows(image_rows(), table, target, storage_options=storage_options)
    except ReasonError as exc:  # the store refused the write: the run stops with this reason, not Ray's wrapper
        return pa.Table.from_pylist(
            [{"idx": -1, "status": FAILED, "reason": exc.reason, "message": exc.message}], schema=OUTCOME_SCHEMA
        )
    return _outcome_table(outcomes, written)


def read_ahead(groups: list[T], read: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """Yield ``(group, read(group))`` in order, reading the next group in a thread while the caller works on this one."""
    with ThreadPoolExecutor(1) as reader:
        waiting: tuple[T, Future[R]] | None = None
        for group in groups:
            future = reader.submit(read, group)
            if waiting is not None:
                yield waiting[0], waiting[1].result()
            waiting = (group, future)
        if waiting is not None:
            yield waiting[0], waiting[1].result()


def _open(table: str, version: int, storage_options: dict[str, str] | None):  # -> lance.LanceDataset | None
    """The table at ``version`` (for known content); None if it cannot be opened (the commit still dedups)."""
    from lance_io import open_table
    from lance_io.reasons import ReasonError

    try:
        return open_table(table, version, storage_options=storage_options)
    except (ReasonError, OSError, ValueError):
        return None


def _image_batch(results: pa.Table, part: pa.Table, keep: list[int], target: pa.Schema, job: str) -> pa.RecordBatch:
    """The table rows of the kept results: worker columns, the items' pass-through columns, the job."""
    if len(keep) < results.num_rows:  # when every item is new (the usual case) nothing is copied
        rows = pa.array(keep, pa.int64())
        results, part = results.take(rows), part.take(rows)
    columns = {name: _array_of(results.column(name)) for name in _WORKER_COLUMNS}
    passthrough = _array_of(part.column(ROW))
    for i, field in enumerate(passthrough.type):
        columns[field.name] = passthrough.field(i)
    columns["ingest_job"] = pa.array([job] * len(keep), pa.string())
    columns["ingested_at"] = pa.array([datetime.now(UTC)] * len(keep), pa.timestamp("us", tz="UTC"))
    arrays = [
        columns[f.name].cast(f.type) if f.name in columns else pa.nulls(len(keep), f.type) for f in target
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=target)


def _array_of(column: pa.ChunkedArray) -> pa.Array:
    """One array of a column, without copying a column of one chunk (the image bytes)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _outcome_table(outcomes: list[pa.Table], written: list[WrittenFragment]) -> pa.Table:
    table = pa.concat_tables(outcomes) if outcomes else OUTCOME_SCHEMA.empty_table()
    node = _node_id()
    fragments: list[str | None] = [json.dumps(asdict(f)) for f in written]
    fragments += [None] * (table.num_rows - len(fragments))
    return pa.Table.from_arrays(
        [
            table.column("idx"),
            table.column("status"),
            table.column("reason"),
            table.column("message"),
            table.column("id"),
            table.column("size_bytes"),
            pa.array([node] * table.num_rows, pa.string()),
            pa.array(fragments, pa.string()),
        ],
        schema=OUTCOME_SCHEMA,
    )


def _node_id() -> str | None:
    """The Ray node this task runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # placement is information, never a reason to fail a task
        return None


def fragment_of(text: str) -> WrittenFragment:
    """The :class:`WrittenFragment` an outcome row carries as JSON."""
    data = json.loads(text)
    return WrittenFragment(data["metadata"], tuple(data["ids"]))

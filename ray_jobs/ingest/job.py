"""The ingest job: sources -> Ray Data (read, validate, hash) -> driver (dedup, append in chunks).

Lifecycle, in one screen:

1. **List**: sources yield items lazily; the driver takes them a segment at a time, settles the
   ones the source already judged (errors, skips) and keeps pass-through fields by index.
2. **Process**: a Ray Data pipeline over the segment's work rows runs ``worker.process_batch`` in
   parallel tasks: read or fetch bytes, skip non-images found by scanning, hash, leave content
   the table already holds (``known``: not decoded, not sent back), decode-validate the rest.
3. **Commit**: the driver streams results back, drops ids seen earlier in this run, and appends
   chunks through ``lance_io.append_images`` (one version each; ids already in the table are
   reported as duplicates) and records errors through ``lance_io.record_errors``.
4. **Samples**: a training sample (a sharegpt conversation, or an image that brings messages)
   is settled once all its images are (``samples.SampleCollector``); settled samples are appended
   to the samples table (``lance_io.samples``) in the same commit step, *after* the images they
   refer to, so a sample never points at an image that is not in the table.

An interrupted ingest leaves the table at its last committed chunk; a rerun re-reads and hashes
everything, finds the committed ids already present (duplicates, not decoded again) and adds the
rest, so nothing is added twice; samples likewise (a sample's id is its content).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from lance_io import AppendResult, ErrorRecord, append_images, ensure_columns, record_errors, table_exists
from lance_io.reasons import ReasonError
from lance_io.samples import append_samples, sample_rows
from lance_io.schema import IMAGE_SCHEMA, OPTIONAL_FIELDS, TRUTH
from ray_jobs.ingest.items import IngestSummary, InputItem
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.progress import IngestProgress
from ray_jobs.ingest.samples import SampleCollector
from ray_jobs.ingest.sources import Source, open_source
from ray_jobs.ingest.worker import KNOWN, RESULT_SCHEMA, SKIP, WORK_SCHEMA, options_key, process_batch

WORKER_COLUMNS = [name for name in RESULT_SCHEMA.names if name in IMAGE_SCHEMA.names]


def ingest(
    sources: Iterable[str],
    table: str,
    options: IngestOptions | None = None,
    *,
    storage_options: dict[str, str] | None = None,
    job: str | None = None,
) -> IngestSummary:
    """Ingest every image of `sources` into the Lance table `table`; return where each input went.

    Example::

        from ray_jobs.ingest import IngestOptions, ingest
        summary = ingest(["photos/", "urls.txt"], "/data/photos.lance", IngestOptions(label_from_dir=True))
        assert summary.reconciled
    """
    options = options or IngestOptions()
    opened = [open_source(spec, options) for spec in sources]
    metadata = merged_metadata_fields(opened)
    _check_answer_column(options, metadata)
    _init_ray(options)
    writer = ChunkWriter(
        table,
        job or f"ingest-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}",
        options,
        metadata,
        storage_options,
    )
    started = time.monotonic()
    try:
        with IngestProgress(enabled=options.progress) as progress:
            items = itertools.chain.from_iterable(source.items() for source in opened)
            for segment in _segments(items, options.segment_items):
                _run_segment(segment, writer, options, progress)
            writer.flush()
    finally:
        writer.close()
    summary = writer.summary
    summary.samples = writer.samples.counts
    if summary.samples.added:
        summary.version = _index_images(table, storage_options) or summary.version
    summary.seconds = time.monotonic() - started
    if summary.version is None and table_exists(table, storage_options=storage_options):
        from lance_io import open_table

        summary.version = open_table(table, storage_options=storage_options).version
    return summary


def _index_images(table: str, storage_options: dict[str, str] | None) -> int | None:
    """Fold appended images into the ``id`` index (training looks samples' images up by id); return the new version."""
    from lance_io import open_table
    from lance_io.table import ensure_id_index

    if not table_exists(table, storage_options=storage_options):
        return None
    ds = open_table(table, storage_options=storage_options)
    indexed = next((set(i["fragment_ids"]) for i in ds.list_indices() if i["fields"] == ["id"]), set())
    if all(f.fragment_id in indexed for f in ds.get_fragments()):
        return None
    ensure_id_index(ds)
    return open_table(table, storage_options=storage_options).version


def merged_metadata_fields(sources: list[Source]) -> dict[str, pa.DataType]:
    """Return the pass-through columns of all sources; a name with two types becomes a string."""
    merged: dict[str, pa.DataType] = {}
    for source in sources:
        for name, dtype in source.metadata_fields.items():
            if pa.types.is_null(dtype):
                dtype = pa.string()
            merged[name] = dtype if merged.get(name, dtype) == dtype else pa.string()
    return merged


def _check_answer_column(options: IngestOptions, metadata: dict[str, pa.DataType]) -> None:
    if options.prompt and options.answer_column is None:
        raise ReasonError("bad_option", "--prompt needs --answer-column: the column holding the assistant's answer")
    if options.answer_column and options.answer_column != TRUTH and options.answer_column not in metadata:
        known = ", ".join([TRUTH, *metadata])
        raise ReasonError(
            "bad_option",
            f"--answer-column {options.answer_column!r} is not a column of the sources ({known})"
        )


def _init_ray(options: IngestOptions) -> None:
    from ray.data import DataContext

    from ray_jobs.ray_session import ensure_ray

    ensure_ray(options.address, num_cpus=options.num_cpus, object_store_memory=1024**3)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def _segments(items: Iterator[InputItem], size: int) -> Iterator[list[InputItem]]:
    while segment := list(itertools.islice(items, size)):
        yield segment


def _run_segment(
    segment: list[InputItem], writer: ChunkWriter, options: IngestOptions, progress: IngestProgress
) -> None:
    import ray

    work: list[dict[str, Any]] = []
    for idx, item in enumerate(segment):
        progress.listed(1)
        if item.skip is not None:
            writer.skipped(progress, item)
        elif item.error is not None:
            writer.failed(item, *item.error, progress=progress)
        else:
            work.append(
                {
                    "idx": idx,
                    "locator": item.locator,
                    "path": item.path,
                    "url": item.url,
                    "data": item.data,
                    "scan": item.scan,
                }
            )
            item.data = None  # the bytes now live in the work table; do not keep two copies
    if not work:
        return
    blocks = [
        pa.Table.from_pylist(work[i : i + options.batch_size], schema=WORK_SCHEMA)
        for i in range(0, len(work), options.batch_size)
    ]
    dataset = ray.data.from_arrow(blocks).map_batches(
        process_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={
            "options_json": options_key(options),
            "table": writer.table,
            "storage_options": writer.storage_options,
        },
        concurrency=options.concurrency,
        zero_copy_batch=True,
    )
    # One map operator and nothing downstream but this loop: Ray Data's per-operator reservation
    # (half of the CPUs by default) only idles the other half here. Measured on 2 CPUs: about one
    # task ran at a time with it, two without (bench/RESULTS.md, ingest section).
    dataset.context.op_resource_reservation_enabled = False
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.add_results(batch, segment, progress)


class ChunkWriter:
    """Counts outcomes and commits added rows and errors to the table, a chunk at a time."""

    def __init__(
        self,
        table: str,
        job: str,
        options: IngestOptions,
        metadata: dict[str, pa.DataType],
        storage_options: dict[str, str] | None,
    ) -> None:
        self.table, self.job, self.options, self.storage_options = table, job, options, storage_options
        self.schema = pa.schema(
            [*IMAGE_SCHEMA, OPTIONAL_FIELDS[TRUTH]]
            + [pa.field(name, dtype) for name, dtype in metadata.items()]
        )
        self.summary = IngestSummary(table=table, job=job)
        self.reasons: Counter[str] = Counter()
        self._seen: set[bytes] = set()
        self._rows: list[pa.Table] = []
        self.metadata = metadata
        self._bytes = 0
        self._errors: list[ErrorRecord] = []
        self._columns_checked = False
        self._pending: Future[tuple[AppendResult | None, AppendResult | None]] | None = None
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lancetag-commit")
        self.samples = SampleCollector(job, options)

    def skipped(self, progress: IngestProgress, item: InputItem) -> None:
        """Count one input that is not an image."""
        self.summary.inputs += 1
        self.summary.skipped += 1
        self.samples.settle(item, None, ("not_an_image", item.skip or "not an image"))
        progress.done(1)

    def duplicate(self, progress: IngestProgress, item: InputItem, image_id: str) -> None:
        """Count one input whose content the table holds or this run has already seen."""
        self.summary.inputs += 1
        self.summary.duplicates += 1
        self.samples.settle(item, image_id)
        progress.done(1)

    def failed(self, item: InputItem, reason: str, message: str, *, progress: IngestProgress) -> None:
        """Count one input that failed and queue its error record."""
        self.summary.inputs += 1
        self.summary.errors += 1
        self.reasons[reason] += 1
        self._errors.append(ErrorRecord(source=item.source, reason=reason, message=message, job=self.job))
        self.samples.settle(item, None, (reason, message))
        progress.done(1, error=True)

    def add_results(self, results: pa.Table, segment: list[InputItem], progress: IngestProgress) -> None:
        """Settle one batch of worker results; commit when a chunk is full."""
        columns = {
            name: results.column(name).to_pylist()
            for name in ("idx", "status", "reason", "message", "id", "size_bytes")
        }
        keep: list[int] = []
        for row, (idx, status, reason, message, image_id, size) in enumerate(
            zip(*columns.values(), strict=True)
        ):
            item = segment[idx]
            if status == SKIP:
                self.skipped(progress, item)
            elif status == "error":
                self.failed(item, reason, message, progress=progress)
            elif status == KNOWN or not self._first_sighting(image_id):
                self.duplicate(progress, item, image_id)
            else:
                self.summary.inputs += 1
                self.samples.settle(item, image_id)
                keep.append(row)
                progress.done(1, nbytes=size)
        if keep:
            self._rows.append(self._rows_table(results, keep, [segment[columns["idx"][row]] for row in keep]))
            self._bytes += sum(columns["size_bytes"][row] for row in keep)
        if (
            sum(t.num_rows for t in self._rows) >= self.options.commit_rows
            or self._bytes >= self.options.commit_bytes
            or len(self.samples.ready) >= self.options.commit_rows
        ):
            self.flush()

    def _first_sighting(self, image_id: str) -> bool:
        """Return whether this run sees the content for the first time (and remember it)."""
        key = bytes.fromhex(image_id)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def _rows_table(self, results: pa.Table, keep: list[int], items: list[InputItem]) -> pa.Table:
        """Worker columns of the kept rows (bytes never leave Arrow) plus the items' pass-through fields."""
        table = results.select(WORKER_COLUMNS)
        if len(keep) < results.num_rows:
            table = table.take(pa.array(keep, pa.int64()))
        passthrough: dict[str, list[Any]] = {
            "source": [i.source for i in items],
            "source_kind": [i.source_kind for i in items],
            "ingest_job": [self.job] * len(items),
            TRUTH: [i.truth for i in items],
        }
        for name in self.metadata:
            passthrough[name] = [i.metadata.get(name) for i in items]
        for name, values in passthrough.items():
            table = table.append_column(self.schema.field(name), _array(values, self.schema.field(name).type))
        return table

    def flush(self) -> None:
        """Hand the pending rows and errors to the committer thread (one version per chunk).

        The commit of chunk n overlaps the processing of chunk n+1; at most one commit is in
        flight, so an interruption loses at most the chunk being committed, never a version.
        """
        rows = None
        if self._rows:
            rows = pa.concat_tables(self._rows)
            now = pa.array([datetime.now(UTC)] * rows.num_rows, pa.timestamp("us", tz="UTC"))
            rows = rows.append_column(self.schema.field("ingested_at"), now).select(self.schema.names)
        errors, self._rows, self._bytes, self._errors = self._errors, [], 0, []
        samples, sample_errors = self.samples.take()
        errors += sample_errors
        self.wait()
        if rows is not None or errors or samples:
            self._pending = self._committer.submit(self._commit, rows, errors, samples)
        self.summary.errors_by_reason = dict(self.reasons.most_common())

    def wait(self) -> None:
        """Wait for the commit in flight and count what it added (re-raises its failure)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            result, sampled = pending.result()
            if result is not None:
                self.summary.added += result.added
                self.summary.duplicates += len(result.duplicate_ids)
                self.summary.version = result.version
            if sampled is not None:
                counts = self.samples.counts
                counts.added += sampled.added
                counts.duplicates += len(sampled.duplicate_ids)
                counts.version = sampled.version

    def close(self) -> None:
        """Finish the commit in flight, then stop the committer thread."""
        try:
            self.wait()
        finally:
            self._committer.shutdown(wait=True)

    def _commit(
        self, rows: pa.Table | None, errors: list[ErrorRecord], samples: list[dict[str, Any]]
    ) -> tuple[AppendResult | None, AppendResult | None]:
        result = sampled = None
        if rows is not None:
            self._ensure_columns()
            result = append_images(
                self.table, rows, storage_options=self.storage_options, properties={"lancetag.job": self.job}
            )
        if samples:  # after the images: every id a sample refers to is in the table by now
            images_version = result.version if result is not None else self._images_version()
            sampled = append_samples(
                self.table,
                sample_rows(samples, job=self.job),
                images_version=images_version,
                storage_options=self.storage_options,
                properties={"lancetag.job": self.job},
            )
        if errors:
            record_errors(self.table, errors, storage_options=self.storage_options)
        return result, sampled

    def _images_version(self) -> int | None:
        if not table_exists(self.table, storage_options=self.storage_options):
            return None  # text-only samples before any image
        from lance_io import open_table

        return open_table(self.table, storage_options=self.storage_options).version

    def _ensure_columns(self) -> None:
        # An existing table gets this run's extra columns (metadata-only) before the first append.
        if not self._columns_checked and table_exists(self.table, storage_options=self.storage_options):
            from lance_io import open_table

            have = open_table(self.table, storage_options=self.storage_options).schema.names
            ensure_columns(
                self.table,
                [f for f in self.schema if f.name not in have],
                storage_options=self.storage_options,
            )
        self._columns_checked = True


def _array(values: list[Any], dtype: pa.DataType) -> pa.Array:
    """Build one column; values of mixed types (a string column merged from two sources) as text."""
    try:
        return pa.array(values, type=dtype)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string()).cast(dtype)

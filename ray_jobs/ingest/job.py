"""The ingest job: sources -> Ray tasks (read, validate, hash, write data files) -> driver (commit).

Lifecycle, in one screen:

1. **List**: sources yield items lazily; the driver takes them a segment at a time, settles the
   ones the source already judged (errors, skips) and sends the rest, with their pass-through
   columns (source, truth, metadata), to the workers as work rows.
2. **Process and write** (``write.validate_and_write``, one Ray task per group of items): read or
   fetch the bytes, skip non-images found by scanning, hash, leave content the table already
   holds (``known``: not decoded, not written), decode-validate the rest and write it as Lance
   data files of the table, uncommitted. A task returns outcomes and fragment metadata, no bytes.
3. **Commit** (driver, one version per chunk: ``commit_rows`` rows or ``commit_seconds``): the
   fragments of a chunk become rows in one commit (``lance_io.fragments.commit_fragments``).
   Dedup stays exact without the driver holding ids beyond a chunk: an id two tasks of the chunk
   both wrote, or one the table gained since a task checked (an earlier chunk of this run, another
   writer), is cut from its fragment first (``without_ids``, a Ray task: the driver reads no
   bytes). Error records go to the errors table in the same step, with the labeled duplicates
   whose truth is not the one the table keeps for their image (``truth_conflict``); a labeled
   duplicate of an image kept without a truth gives the row its truth (``truth`` alone written).
4. **Samples**: a training sample (a sharegpt conversation, or an image that brings messages)
   is settled once all its images are (``samples.SampleCollector``); settled samples are appended
   to the samples table (``lance_io.samples``) in the same commit step, *after* the images they
   refer to, so a sample never points at an image that is not in the table.

An interrupted ingest (the driver or any worker killed) leaves the table at its last commit; data
files written and not committed are in no version (``lancetag maintain`` reclaims them). A rerun
re-reads and hashes everything, finds the committed ids already present (duplicates, not decoded
again) and adds the rest, so nothing is added twice; samples likewise (a sample's id is its content).
A killed worker's task is retried by Ray and writes its files anew.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from lance_io import table_exists
from lance_io.fragments import fold_into_id_index
from lance_io.reasons import ReasonError
from lance_io.schema import TRUTH
from lance_io.table import DEFAULT_MAX_ROWS_PER_FILE
from ray_jobs.ingest.commit import ChunkWriter
from ray_jobs.ingest.items import IngestSummary, InputItem
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.progress import IngestProgress
from ray_jobs.ingest.remote import on_worker
from ray_jobs.ingest.sources import Source, open_source
from ray_jobs.ingest.worker import options_key
from ray_jobs.ingest.write import validate_and_write


def ingest(
    sources: Iterable[str | os.PathLike[str]],
    table: str | os.PathLike[str],
    options: IngestOptions | None = None,
    *,
    storage_options: dict[str, str] | None = None,
    job: str | None = None,
    truth_of: Callable[[str], str | None] | None = None,
) -> IngestSummary:
    """Ingest every image of `sources` into the Lance table `table`; return where each input went.

    ``truth_of`` gives the truth of an input its source gives none (an unlabeled folder's file),
    from its ``source`` (a path or URL), as ``lancetag demo`` labels by its folder layout.

    Example::

        from ray_jobs.ingest import IngestOptions, ingest
        summary = ingest(["photos/", "urls.txt"], "/data/photos.lance", IngestOptions(label_from_dir=True))
        assert summary.reconciled
    """
    options = options or IngestOptions()
    table, sources = os.fspath(table), [os.fspath(s) for s in sources]  # a pathlib.Path is a path too
    if not table.strip():  # "" would be the working directory: an unset shell variable, not a choice
        raise ReasonError("bad_option", "the table is empty: name where it goes, e.g. --table photos.lance")
    opened = [open_source(spec, options) for spec in sources]
    metadata = merged_metadata_fields(opened)
    _check_answer_column(options, metadata)
    # The table is reached first: a wrong or unreachable destination is refused before Ray starts.
    writer = ChunkWriter(
        table,
        job or f"ingest-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}",
        options,
        metadata,
        storage_options,
    )
    try:
        _init_ray(options)
        started = time.monotonic()
        with IngestProgress(enabled=options.progress) as progress:
            items = itertools.chain.from_iterable(source.items() for source in opened)
            if truth_of is not None:
                items = (_with_truth(item, truth_of) for item in items)
            for segment in _segments(items, options.segment_items):
                _run_segment(segment, writer, options, progress)
            writer.flush()
    finally:
        writer.close()
    summary = writer.summary
    summary.samples = writer.samples.counts
    if summary.added or summary.samples.added:
        # Leave the table fully indexed: the next run's tasks (and training's sample joins) look ids
        # up in the index alone.
        folded = on_worker(fold_into_id_index, table, min_rows=1, storage_options=storage_options)
        summary.version = folded or summary.version
    summary.seconds = time.monotonic() - started
    if summary.version is None and table_exists(table, storage_options=storage_options):
        from lance_io import open_table

        summary.version = open_table(table, storage_options=storage_options).version
    return summary


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


def _with_truth(item: InputItem, truth_of: Callable[[str], str | None]) -> InputItem:
    if item.truth is None and item.error is None and item.skip is None:
        item.truth = truth_of(item.source)
    return item


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
                    "path": None if item.path is None else os.fsencode(item.path),
                    "url": item.url,
                    "data": item.data,
                    "scan": item.scan,
                }
            )
            item.data = None  # the bytes now live in the work table; do not keep two copies
    if not work:
        return
    per_task = items_per_task(len(work), int(ray.cluster_resources().get("CPU", 1)), options.batch_size)
    blocks = [writer.work_block(work[i : i + per_task], segment) for i in range(0, len(work), per_task)]
    writer.summary.bytes_from_driver += sum(block.nbytes for block in blocks)
    dataset = ray.data.from_arrow(blocks).map_batches(
        validate_and_write,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={
            "options_json": options_key(options),
            "table": writer.table,
            "schema": writer.target.serialize().to_pybytes(),
            "job": writer.job,
            "known_version": writer.start_version,
            "storage_options": writer.storage_options,
        },
        concurrency=options.concurrency,
        zero_copy_batch=True,
    )  # Ray Data spreads tasks over the nodes (work rows of paths and URLs are small args: its SPREAD)
    # One map operator and nothing downstream but this loop: Ray Data's per-operator reservation
    # (half of the CPUs by default) only idles the other half here. Measured on 2 CPUs: about one
    # task ran at a time with it, two without (bench/RESULTS.md, ingest section).
    dataset.context.op_resource_reservation_enabled = False
    # Outcomes in listing order, whatever order the tasks finish in: of two copies of an image the
    # first listed is the one kept (and its truth), run after run, as the docs promise.
    dataset.context.execution_options.preserve_order = True
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.add_outcomes(batch, segment, progress)


def items_per_task(items: int, cpus: int, batch_size: int) -> int:
    """Items one task validates and writes as one fragment: at most ``DEFAULT_MAX_ROWS_PER_FILE`` (one
    unit of tagging work), at least a batch, and as many tasks as whole rounds over the CPUs (two
    at least), so no CPU idles through a last, partial round."""
    cpus = max(cpus, 1)
    tasks = max(math.ceil(items / DEFAULT_MAX_ROWS_PER_FILE), 2 * cpus)
    tasks = math.ceil(tasks / cpus) * cpus
    return max(batch_size, math.ceil(items / tasks))

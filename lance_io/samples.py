"""The samples table: one row per training sample (a conversation), referring to images by id.

An image table ``/data/t.lance`` holds one row per distinct image; its samples live beside it in
``/data/t.samples.lance``, versioned on their own. A sample is sharegpt ``messages`` (optional
``system`` and ``tools``) plus the ordered ``image_ids`` its ``<image>`` placeholders stand for:
many questions about one image are many samples over one image row, and one conversation over
two images is one sample with two ids (the same id twice when it shows one image twice).

The sample id hashes exactly what a sample trains on (image ids in order, messages, system,
tools), so "duplicate sample" is exact and appending the same dataset twice adds nothing. Each
samples version records the image-table version it was written against
(``lancetag.images_version``), so a registered dataset pins both tables.

Example::

    from lance_io.samples import append_samples, sample_rows, samples_uri
    rows = sample_rows([{"image_ids": [img], "messages": turns, "source": "data.json", "source_index": 0}], job="j")
    append_samples("/data/t.lance", rows, images_version=3).added
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import lance
import pyarrow as pa

from lance_io.diff import diff_versions
from lance_io.labels import LabelError, answer_columns, row_messages
from lance_io.scan import scan_batches
from lance_io.schema import ID, MESSAGE_TYPE
from lance_io.sql import sql_string
from lance_io.table import (
    AppendResult,
    drop_concurrent_duplicates,
    ensure_id_index,
    new_rows_of,
    open_table,
    table_exists,
    translated_write_errors,
)
from lance_io.tasks import Task

IMAGE_IDS = "image_ids"
IMAGES_VERSION_KEY = "lancetag.images_version"

SAMPLES_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False, metadata={"description": "hash of image ids, messages, system, tools"}),
        pa.field(IMAGE_IDS, pa.list_(pa.string()), nullable=False, metadata={"description": "image ids, in placeholder order"}),
        pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=False, metadata={"description": "sharegpt chat turns"}),
        pa.field("system", pa.string()),
        pa.field("tools", pa.string()),
        pa.field("source", pa.string(), nullable=False, metadata={"description": "dataset file, table or labels"}),
        pa.field("source_index", pa.int64(), metadata={"description": "position of the sample in its source"}),
        pa.field("source_kind", pa.string(), nullable=False, metadata={"description": "sharegpt, manifest, hf, labels, ..."}),
        pa.field("split", pa.string(), metadata={"description": "the source's own split (train, test, ...), if any"}),
        pa.field("metadata", pa.string(), metadata={"description": "free metadata, JSON"}),
        pa.field("ingest_job", pa.string(), nullable=False),
        pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
"""Columns of every samples table, in order."""

SCAN_BATCH = 8192
"""Image rows turned into samples at a time by :func:`label_samples`: what it holds, whatever the table's size."""


def samples_uri(table_uri: str) -> str:
    """Return the URI of the samples table that belongs to the image table ``table_uri``."""
    return f"{table_uri.rstrip('/').removesuffix('.lance')}.samples.lance"


def sample_id(
    image_ids: Sequence[str], messages: Sequence[Mapping[str, str]], system: str | None = None, tools: str | None = None
) -> str:
    """Return the stable id of a sample: 32 hex digits of the sha256 of its canonical JSON."""
    canonical = json.dumps(
        {
            "images": list(image_ids),
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "system": system or None,
            "tools": tools or None,
        },
        ensure_ascii=False,
        separators=(",", ":"),
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def sample_rows(samples: Iterable[Mapping[str, Any]], *, job: str) -> pa.Table:
    """Return ``SAMPLES_SCHEMA`` rows for sample dicts (``image_ids``, ``messages``, ``source``, ...), ids computed."""
    now = datetime.now(UTC)
    rows = []
    for s in samples:
        metadata = s.get("metadata")
        rows.append(
            {
                ID: sample_id(s[IMAGE_IDS], s["messages"], s.get("system"), s.get("tools")),
                IMAGE_IDS: list(s[IMAGE_IDS]),
                "messages": [{"role": m["role"], "content": m["content"]} for m in s["messages"]],
                "system": s.get("system") or None,
                "tools": s.get("tools") or None,
                "source": s["source"],
                "source_index": s.get("source_index"),
                "source_kind": s.get("source_kind", "unknown"),
                "split": s.get("split"),
                "metadata": json.dumps(metadata, ensure_ascii=False, default=str) if metadata else None,
                "ingest_job": job,
                "ingested_at": now,
            }
        )
    return pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)


def append_samples(
    table_uri: str,
    rows: pa.Table,
    *,
    images_version: int | None,
    storage_options: dict[str, str] | None = None,
    properties: dict[str, str] | None = None,
) -> AppendResult:
    """Append sample rows to the samples table of ``table_uri`` (created if missing), skipping known ids.

    Rows whose ``id`` is already in the table, or repeated within ``rows``, are reported in
    ``duplicate_ids``. One atomic commit, which records ``images_version`` (the image-table
    version every referred image is in) and ``properties`` in its transaction.
    """
    uri = samples_uri(table_uri)
    if rows.num_rows == 0:
        return AppendResult(added=0)
    ds = lance.dataset(uri, storage_options=storage_options) if table_exists(uri, storage_options=storage_options) else None
    keep, duplicates = new_rows_of(rows.column(ID).to_pylist(), ds)
    if not keep:
        return AppendResult(added=0, duplicate_ids=duplicates, version=ds.version if ds else None)
    kept = rows.take(pa.array(keep, pa.int64())).select(SAMPLES_SCHEMA.names).cast(SAMPLES_SCHEMA)
    transaction = {"lancetag.operation": "append_samples", **(properties or {})}
    if images_version is not None:
        transaction[IMAGES_VERSION_KEY] = str(images_version)
    with translated_write_errors(uri, ds.version if ds is not None else None):
        written = lance.write_dataset(
            kept,
            uri,
            mode="append" if ds is not None else "create",
            storage_options=storage_options,
            transaction_properties=transaction,
        )
    if ds is None:
        ensure_id_index(written)  # an index commit of its own: loaders look samples up by id
        written = lance.dataset(uri, storage_options=storage_options)
        return AppendResult(added=len(keep), duplicate_ids=duplicates, version=written.version)
    raced, version = drop_concurrent_duplicates(
        uri, written.version, ds.version, kept.column(ID).to_pylist(), storage_options=storage_options, properties=properties
    )
    return AppendResult(added=len(keep) - len(raced), duplicate_ids=duplicates + sorted(raced), version=version)


def samples_exist(table_uri: str, *, storage_options: dict[str, str] | None = None) -> bool:
    """Return whether ``table_uri`` has a samples table."""
    return table_exists(samples_uri(table_uri), storage_options=storage_options)


def open_samples(
    table_uri: str, version: int | str | None = None, *, storage_options: dict[str, str] | None = None
) -> lance.LanceDataset:
    """Open the samples table of ``table_uri`` at a version (latest when None); ``FileNotFoundError`` if none."""
    return open_table(samples_uri(table_uri), version, storage_options=storage_options)


def samples_version_at(
    table_uri: str, images_version: int, *, storage_options: dict[str, str] | None = None
) -> int | None:
    """Return the latest samples version written against image-table version ``images_version`` or earlier.

    That is "the samples as of image version N": None when no sample existed yet.
    """
    if not samples_exist(table_uri, storage_options=storage_options):
        return None
    samples = open_samples(table_uri, storage_options=storage_options)
    found, recorded = None, None
    for entry in samples.versions():  # index commits record nothing: they keep the last append's
        transaction = samples.read_transaction(entry["version"])
        value = (transaction.transaction_properties or {}).get(IMAGES_VERSION_KEY) if transaction else None
        recorded = int(value) if value is not None else recorded
        if recorded is not None and recorded <= images_version:
            found = entry["version"]
    return found


def restore_samples(
    table_uri: str, images_version: int, restored_as: int, *, storage_options: dict[str, str] | None = None
) -> int | None:
    """Make the samples as of image version ``images_version`` the latest again, recorded against
    ``restored_as`` (the image version a restore made of it); return the new samples version.

    An overwrite with that version's fragments (none when there was no sample yet; the data files are
    shared, nothing is copied) recording ``restored_as``, then the id index again (an index commit
    records nothing and keeps the overwrite's). Training at ``restored_as`` reads the samples
    ``images_version`` had; the image versions before it keep theirs.
    """
    if not samples_exist(table_uri, storage_options=storage_options):
        return None
    uri = samples_uri(table_uri)
    target = samples_version_at(table_uri, images_version, storage_options=storage_options)
    samples = open_samples(table_uri, storage_options=storage_options)
    then = None if target is None else open_samples(table_uri, target, storage_options=storage_options)
    fragments = [] if then is None else [f.metadata for f in then.get_fragments()]
    properties = {"lancetag.operation": "restore_samples", IMAGES_VERSION_KEY: str(restored_as)}
    operation = lance.LanceOperation.Overwrite(SAMPLES_SCHEMA if then is None else then.schema, fragments)
    with translated_write_errors(uri, samples.version):
        written = lance.LanceDataset.commit(
            uri, lance.Transaction(samples.version, operation, transaction_properties=properties), storage_options=storage_options
        )
        ensure_id_index(written)
    return open_samples(table_uri, storage_options=storage_options).version


@dataclass(frozen=True)
class SamplesDiff:
    """Samples before and after, and how many were added and removed, between two image-table versions."""

    before: int
    after: int
    added: int
    removed: int
    samples_version_before: int | None
    samples_version_after: int | None


def diff_samples(
    table_uri: str, before: int | str, after: int | str, *, storage_options: dict[str, str] | None = None
) -> SamplesDiff:
    """Return the samples added and removed between two versions (numbers or tags) of the image table.

    The samples versions written against them are compared by :func:`lance_io.diff.diff_versions`,
    a fragment at a time: the cost follows the samples that changed, not the table.
    """
    a = open_table(table_uri, before, storage_options=storage_options).version
    b = open_table(table_uri, after, storage_options=storage_options).version
    va = samples_version_at(table_uri, a, storage_options=storage_options)
    vb = samples_version_at(table_uri, b, storage_options=storage_options)
    rows_a, rows_b = (0 if v is None else open_samples(table_uri, v, storage_options=storage_options).count_rows() for v in (va, vb))
    if va is None or vb is None:
        added, removed = rows_b, rows_a  # one side has no samples yet
    else:
        found = diff_versions(samples_uri(table_uri), va, vb, max_ids=0, storage_options=storage_options)
        added, removed = found.added, found.removed
    return SamplesDiff(before=rows_a, after=rows_b, added=added, removed=removed,
                       samples_version_before=va, samples_version_after=vb)


@dataclass(frozen=True)
class LabelSamples:
    """What :func:`label_samples` did: samples the labels teach now, added and removed, rows skipped by reason."""

    source: str
    samples: int
    added: int
    removed: int
    skipped: dict[str, int]
    version: int | None


def label_samples(
    table_uri: str,
    task: Task,
    column: str,
    *,
    version: int | str | None = None,
    where: str | None = None,
    job: str = "labels",
    storage_options: dict[str, str] | None = None,
) -> LabelSamples:
    """Make the chats label column ``column`` teaches (task prompt + stored answer) the table's samples from it.

    One sample per labeled image, ``source`` ``labels:<column>``: the same turns the extension
    builds for ``--label-column`` (:func:`lance_io.labels.messages_for_row`), one scan batch at a
    time (``SCAN_BATCH`` rows), so memory does not grow with the table. Earlier samples of
    that source that the labels no longer teach (relabeled or unlabeled rows) are removed in
    the same atomic commit; samples of other sources (a human-written dataset) are untouched.
    """
    images = open_table(table_uri, version, storage_options=storage_options)
    source = f"labels:{column}"
    skipped: dict[str, int] = {}
    made = _samples_taught(images, task, column, source, where, job, skipped)
    first = next(made, None)
    counted = 0

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal counted
        for batch in itertools.chain([first] if first is not None else [], made):
            counted += batch.num_rows
            yield batch

    reader = pa.RecordBatchReader.from_batches(SAMPLES_SCHEMA, batches())
    uri = samples_uri(table_uri)
    properties = {"lancetag.job": job, "lancetag.source": source, IMAGES_VERSION_KEY: str(images.version)}
    if not samples_exist(table_uri, storage_options=storage_options):
        if first is None:
            return LabelSamples(source, 0, 0, 0, skipped, None)
        with translated_write_errors(uri, None):
            written = lance.write_dataset(reader, uri, schema=SAMPLES_SCHEMA, mode="create", storage_options=storage_options,
                                          transaction_properties={"lancetag.operation": "append_samples", **properties})
        ensure_id_index(written)  # an index commit of its own: loaders look samples up by id
        version = lance.dataset(uri, storage_options=storage_options).version
        return LabelSamples(source, counted, counted, 0, skipped, version)
    samples = lance.dataset(uri, storage_options=storage_options)
    builder = (
        samples.merge_insert(ID)
        .when_not_matched_insert_all()
        .when_not_matched_by_source_delete(f"source = {sql_string(source)}")
    )
    transaction, stats = builder.execute_uncommitted(reader)
    transaction = dataclasses.replace(
        transaction, transaction_properties={"lancetag.operation": "label_samples", **properties}
    )
    with translated_write_errors(uri, samples.version):
        written = lance.LanceDataset.commit(uri, transaction, read_version=samples.version,
                                            storage_options=storage_options)
    return LabelSamples(
        source, counted, stats["num_inserted_rows"], stats["num_deleted_rows"], skipped, written.version
    )


def _samples_taught(
    images: lance.LanceDataset, task: Task, column: str, source: str, where: str | None, job: str,
    skipped: dict[str, int],
) -> Iterator[pa.RecordBatch]:
    """Yield the samples label column ``column`` teaches, a scan batch at a time; count the rows skipped by reason."""
    metadata = {"task": task.name, "column": column}
    messages_for_row = row_messages(task, column)
    for batch in scan_batches(images, [ID, *answer_columns(task, column).values()], where=where, batch_size=SCAN_BATCH):
        found = []
        for row in batch.to_pylist():
            try:
                messages = messages_for_row(row)
            except LabelError as err:
                skipped[err.reason] = skipped.get(err.reason, 0) + 1
                continue
            found.append({IMAGE_IDS: [row[ID]], "messages": messages, "source": source, "source_kind": "labels",
                          "metadata": metadata})
        if found:
            yield from sample_rows(found, job=job).to_batches()

"""The driver's side of an ingest: count every outcome, commit the fragments tasks wrote, a chunk at a time.

:class:`ChunkWriter` is where every input ends (added, duplicate, error, skipped) and where data
files become rows. A chunk is the fragments tasks wrote since the last commit (``commit_rows`` rows
or ``commit_seconds``); it becomes one table version. Dedup is exact with memory bounded by the
chunk: ids two tasks of the chunk both wrote are found from the chunk's ids, ids the table gained
since a task checked are found by one lookup at commit time (the ``id`` index, kept folded every
``INDEX_FOLD_ROWS`` rows); their rows are cut from the fragments by a Ray task before the commit.
Another writer (a second ingest into the table) that commits between that lookup and the commit
is caught after it: the rows it had first leave this commit's fragments
(:func:`lance_io.table.drop_concurrent_duplicates`).

A duplicate that carries a truth (a class folder, a manifest's label) is compared after the commit
with the truth of the copy the table kept. Kept without a truth (ingested unlabeled), the row gets
this truth (``lance_io.columns.commit_values``: the ``truth`` column only, never the image bytes;
the first copy's, if several come). Kept with another truth, it is an error ``truth_conflict``
naming both, not a duplicate, since the table keeps one label an image.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from lance_io import (
    ErrorRecord,
    check_new_table_location,
    ensure_columns,
    open_table,
    record_errors,
    table_exists,
)
from lance_io.columns import commit_values
from lance_io.fragments import (
    WrittenFragment,
    commit_fragments,
    fold_into_id_index,
    ids_in_table,
    without_ids,
)
from lance_io.reasons import ReasonError
from lance_io.samples import append_samples, sample_rows
from lance_io.schema import IMAGE_SCHEMA, OPTIONAL_FIELDS, TRUTH
from lance_io.table import AppendResult, drop_concurrent_duplicates, kept_truths
from ray_jobs.ingest.items import IngestSummary, InputItem
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.progress import IngestProgress
from ray_jobs.ingest.remote import on_worker
from ray_jobs.ingest.samples import SampleCollector
from ray_jobs.ingest.worker import KNOWN, SKIP, WORK_SCHEMA
from ray_jobs.ingest.write import FAILED, ROW, fragment_of

TRUTH_CONFLICT = "truth_conflict"
"""The reason of a duplicate whose truth differs from the truth the table keeps for its image."""
INDEX_FOLD_ROWS = 100_000
"""Unindexed rows at which a commit folds them into the ``id`` index: bounds every dedup lookup."""


@dataclass
class _Chunk:
    """What the next commit makes rows: fragments written by tasks, and ids to cut from them first;
    the truths to check once it is committed."""

    fragments: list[WrittenFragment | None]
    cut: dict[int, set[str]]
    nodes: Counter[str]
    started: float
    written: dict[str, tuple[str, str]] = field(default_factory=dict)
    """id -> (truth, source) of the labeled images the fragments hold: a row cut as a duplicate at
    commit time still has its truth checked."""
    repeats: list[tuple[str, str, str]] = field(default_factory=list)
    """(id, truth, source) of the labeled inputs settled as duplicates."""

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.fragments if f is not None) - sum(len(c) for c in self.cut.values())


@dataclass(frozen=True)
class _Truths:
    """What a chunk's labeled duplicates did: truths given to rows kept without one (in ``version``), conflicts."""

    conflicts: list[ErrorRecord] = field(default_factory=list)
    added: int = 0
    version: int | None = None


class ChunkWriter:
    """Counts outcomes; commits the fragments tasks wrote, and the errors, a chunk at a time."""

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
        self.metadata = metadata
        self._new_table = not table_exists(table, storage_options=storage_options)
        if self._new_table:
            check_new_table_location(table)
        self.start_version: int | None = None
        """The version the run started from: tasks look known content up in it."""
        self.target = self._target_schema()
        self.passthrough = [self.schema.field(n) for n in ("source", "source_kind", TRUTH, *metadata)]
        self.summary = IngestSummary(table=table, job=job)
        self.reasons: Counter[str] = Counter()
        self._chunk = self._new_chunk()
        self._chunk_ids: set[str] = set()
        self._errors: list[ErrorRecord] = []
        self._pending: Future[tuple[AppendResult | None, AppendResult | None, _Truths]] | None = None
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lancetag-commit")
        self.samples = SampleCollector(job, options)

    def _target_schema(self) -> pa.Schema:
        """The columns tasks write, typed as in the table (sets ``start_version``); an existing table
        gets this run's new columns first."""
        if self._new_table:
            return self.schema
        have = open_table(self.table, storage_options=self.storage_options).schema
        lacking = [name for name in ("id", "image") if name not in have.names]
        if lacking:  # someone else's Lance table (a table of an older lancetag gets the columns it lacks, below)
            raise ReasonError(
                "not_an_image_table",
                f"{self.table} is a Lance table, but not an image table ingest writes (it has no {' or '.join(lacking)} column); "
                "ingest into a new --table (this one can be a source: `lancetag ingest TABLE --table NEW`)",
            )
        missing = [f for f in self.schema if f.name not in have.names]
        if missing:  # metadata-only: the new columns read as null in the rows already there
            ensure_columns(self.table, missing, storage_options=self.storage_options)
            have = open_table(self.table, storage_options=self.storage_options).schema
        self.start_version = open_table(self.table, storage_options=self.storage_options).version
        return pa.schema([have.field(name) for name in self.schema.names])

    def work_block(self, work: list[dict[str, Any]], segment: list[InputItem]) -> pa.Table:
        """One task's work rows: how to get each item's bytes, and its pass-through columns."""
        block = pa.Table.from_pylist(work, schema=WORK_SCHEMA)
        items = [segment[w["idx"]] for w in work]
        values: dict[str, list[Any]] = {
            "source": [i.source for i in items],
            "source_kind": [i.source_kind for i in items],
            TRUTH: [i.truth for i in items],
        }
        for name in self.metadata:
            values[name] = [i.metadata.get(name) for i in items]
        arrays = [_array(values[f.name], f.type) for f in self.passthrough]
        return block.append_column(ROW, pa.StructArray.from_arrays(arrays, fields=self.passthrough))

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

    def add_outcomes(self, outcomes: pa.Table, segment: list[InputItem], progress: IngestProgress) -> None:
        """Settle one task's outcomes and take its fragments into the chunk; commit when the chunk is full."""
        self.summary.bytes_to_driver += outcomes.nbytes
        if outcomes.num_rows and outcomes.column("status")[0].as_py() == FAILED:
            raise ReasonError(outcomes.column("reason")[0].as_py(), outcomes.column("message")[0].as_py())
        repeated = self._take_fragments(outcomes)
        columns = {
            name: outcomes.column(name).to_pylist()
            for name in ("idx", "status", "reason", "message", "id", "size_bytes", "node")
        }
        for idx, status, reason, message, image_id, size, node in zip(*columns.values(), strict=True):
            item = segment[idx]
            self.summary.nodes[node or "local"] = self.summary.nodes.get(node or "local", 0) + 1
            if status == SKIP:
                self.skipped(progress, item)
            elif status == "error":
                self.failed(item, reason, message, progress=progress)
            elif status == KNOWN or image_id in repeated:
                self.duplicate(progress, item, image_id)
                if item.truth is not None:
                    self._chunk.repeats.append((image_id, item.truth, item.source))
            else:
                if item.truth is not None:
                    self._chunk.written[image_id] = (item.truth, item.source)
                self.summary.inputs += 1
                self.samples.settle(item, image_id)
                progress.done(1, nbytes=size)
        chunk = self._chunk
        if (
            chunk.rows >= self.options.commit_rows
            or (chunk.fragments and time.monotonic() - chunk.started >= self.options.commit_seconds)
            or len(self.samples.ready) >= self.options.commit_rows
            or len(self._errors) >= self.options.commit_rows
            or len(chunk.repeats) >= self.options.commit_rows
        ):
            self.flush()

    def _take_fragments(self, outcomes: pa.Table) -> set[str]:
        """Add a task's fragments to the chunk; return the ids another task of the chunk wrote first."""
        repeated: set[str] = set()
        nodes = outcomes.column("node").to_pylist()
        for text in outcomes.column("fragment").drop_null().to_pylist():
            fragment = fragment_of(text)
            if not self._chunk.fragments:
                self._chunk.started = time.monotonic()  # commit_seconds counts from the first fragment
            again = {i for i in fragment.ids if i in self._chunk_ids}
            if again:
                self._chunk.cut[len(self._chunk.fragments)] = again
                repeated |= again
            self._chunk_ids.update(fragment.ids)
            self._chunk.fragments.append(fragment)
            self._chunk.nodes[nodes[0] or "local"] += fragment.rows - len(again)
        return repeated

    @staticmethod
    def _new_chunk() -> _Chunk:
        return _Chunk([], {}, Counter(), time.monotonic())

    def flush(self) -> None:
        """Hand the chunk and the errors to the committer thread (one version per chunk).

        The commit of chunk n overlaps the processing of chunk n+1; at most one commit is in
        flight, so an interruption loses at most the chunk being committed, never a version.
        """
        chunk, self._chunk, self._chunk_ids = self._chunk, self._new_chunk(), set()
        errors, self._errors = self._errors, []
        samples, sample_errors = self.samples.take()
        errors += sample_errors
        self.wait()
        if chunk.fragments or chunk.repeats or errors or samples:
            self._pending = self._committer.submit(self._commit, chunk, errors, samples)
        self.summary.errors_by_reason = dict(self.reasons.most_common())

    def wait(self) -> None:
        """Wait for the commit in flight and count what it added (re-raises its failure)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            result, sampled, truths = pending.result()
            if result is not None:
                self.summary.added += result.added
                self.summary.duplicates += len(result.duplicate_ids)  # counted as inputs when they came
                self.summary.version = result.version
            conflicts = len(truths.conflicts)
            if truths.version is not None:
                self.summary.truths_added += truths.added
                self.summary.version = truths.version
            if conflicts:  # counted as duplicates when they came
                self.summary.duplicates -= conflicts
                self.summary.errors += conflicts
                self.reasons[TRUTH_CONFLICT] += conflicts
                self.summary.errors_by_reason = dict(self.reasons.most_common())
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
        self, chunk: _Chunk, errors: list[ErrorRecord], samples: list[dict[str, Any]]
    ) -> tuple[AppendResult | None, AppendResult | None, _Truths]:
        result = sampled = None
        if chunk.fragments:
            result = self._commit_images(chunk)
        truths = self._settle_truths(chunk, result)
        errors = errors + truths.conflicts
        if samples:  # after the images: every id a sample refers to is in the table by now
            images_version = truths.version or (result.version if result is not None else self._images_version())
            sampled = append_samples(
                self.table,
                sample_rows(samples, job=self.job),
                images_version=images_version,
                storage_options=self.storage_options,
                properties={"lancetag.job": self.job},
            )
        if errors:
            record_errors(self.table, errors, storage_options=self.storage_options)
        return result, sampled, truths

    def _settle_truths(self, chunk: _Chunk, result: AppendResult | None) -> _Truths:
        """Give the labeled duplicates' truths to the rows the table keeps without one; return the
        others whose truth is not the one the table kept for their image.

        Looked up once the chunk is committed, when the table holds exactly the copy of each image
        it keeps (an earlier run's, an earlier chunk's, or this chunk's): one ``id`` lookup for the
        chunk's labeled duplicates, so the cost follows the duplicates, not the table. Rows kept
        without a truth get the first copy's in one more commit (``truth IS NULL`` checked at
        commit time, so a truth another writer gave first stays; only those rows are looked up again).
        """
        cut = result.duplicate_ids if result is not None else []
        repeats = chunk.repeats + [(i, *chunk.written[i]) for i in cut if i in chunk.written]
        if not repeats:
            return _Truths()
        version = result.version if result is not None else None
        ids = sorted({i for i, _, _ in repeats})
        kept = on_worker(kept_truths, self.table, version, ids, storage_options=self.storage_options)
        unlabeled: dict[str, str] = {}
        for image_id, truth, _ in repeats:
            if image_id in kept and kept[image_id][0] is None:
                unlabeled.setdefault(image_id, truth)
        added, version = 0, None
        if unlabeled:
            values = pa.table({"id": list(unlabeled), TRUTH: list(unlabeled.values())})
            filled = on_worker(
                commit_values, self.table, values, todo=f"{TRUTH} IS NULL", storage_options=self.storage_options,
                properties={"lancetag.operation": "ingest_truths", "lancetag.job": self.job},
            )
            added, version = filled.rows, filled.version
            given = set(filled.written.column("id").to_pylist())
            kept.update({i: (unlabeled[i], kept[i][1]) for i in given})
            taken = [i for i in unlabeled if i not in given]  # another writer gave these first: what it gave
            if taken:
                kept.update(on_worker(kept_truths, self.table, version, taken, storage_options=self.storage_options))
        conflicts = []
        for image_id, truth, source in repeats:
            kept_truth, kept_source = kept.get(image_id, (truth, None))
            if kept_truth == truth:
                continue
            held = f"with truth {kept_truth!r}" if kept_truth is not None else "without a truth"
            conflicts.append(ErrorRecord(
                source=source, reason=TRUTH_CONFLICT, job=self.job, id=image_id,
                message=f"the same image as {kept_source} (id {image_id}), which the table keeps {held}; "
                f"this copy's truth {truth!r} is not recorded: a table holds an image once, with the first truth it was "
                "given (correct the labels at the source and ingest into a new table to keep this one)",
            ))
        return _Truths(conflicts, added, version)

    def _commit_images(self, chunk: _Chunk) -> AppendResult:
        """Cut what the table gained since the tasks checked, rewrite the fragments that lose rows, commit.

        The id lookup and the index fold read the table's index, which grows with the table: they
        run in Ray tasks, so the driver's memory stays that of one chunk however large the table.
        """
        exists = table_exists(self.table, storage_options=self.storage_options)
        if exists == self._new_table:
            happened = "created" if exists else "deleted"
            raise ReasonError(
                "concurrent_write", f"another process {happened} {self.table} during this ingest; rerun it (nothing is added twice)"
            )
        version = open_table(self.table, storage_options=self.storage_options).version if exists else None
        ids = [i for f in chunk.fragments if f is not None for i in f.ids]
        in_table = on_worker(ids_in_table, self.table, version, ids, storage_options=self.storage_options) if exists else set()
        for n, fragment in enumerate(chunk.fragments):
            cut = chunk.cut.get(n, set()) | (in_table & set(fragment.ids))
            if cut:
                chunk.cut[n] = cut
        for n, ids_to_cut in chunk.cut.items():  # rare: the same content written twice, or committed since
            chunk.fragments[n] = on_worker(without_ids, self.table, chunk.fragments[n], ids_to_cut, storage_options=self.storage_options)
        fragments = [f for f in chunk.fragments if f is not None]
        raced: set[str] = set()
        if fragments:
            properties = {"lancetag.job": self.job, "lancetag.rows_by_node": json.dumps(dict(chunk.nodes))}
            checked = version
            version = commit_fragments(
                self.table, fragments, self.target, read_version=checked,
                storage_options=self.storage_options, properties=properties,
            ).version
            self._new_table = False
            if checked is not None and version - 1 > checked:  # another writer committed since the lookup
                raced, version = on_worker(
                    drop_concurrent_duplicates, self.table, version, checked, [i for f in fragments for i in f.ids],
                    storage_options=self.storage_options, properties={"lancetag.job": self.job},
                )
            folded = on_worker(fold_into_id_index, self.table, min_rows=INDEX_FOLD_ROWS, storage_options=self.storage_options)
            version = folded or version
        added = sum(f.rows for f in fragments) - len(raced)
        return AppendResult(added=added, duplicate_ids=sorted(in_table | raced), version=version)

    def _images_version(self) -> int | None:
        if not table_exists(self.table, storage_options=self.storage_options):
            return None  # text-only samples before any image
        return open_table(self.table, storage_options=self.storage_options).version


def _array(values: list[Any], dtype: pa.DataType) -> pa.Array:
    """Build one column; values of mixed types (a string column merged from two sources) as text."""
    try:
        return pa.array(values, type=dtype)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string()).cast(dtype)

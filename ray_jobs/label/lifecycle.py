"""The lifecycle of a labeling run, in one screen (docs/labeling.md, "The lifecycle of a run").

Like Ray Data's ``Datasink`` (``on_write_start``, ``write``, ``on_write_complete``,
``on_write_failed``), each phase is one function whose docstring says where it runs and what
it may do:

==================  ======  ============================================================
phase               where   what it does
==================  ======  ============================================================
``plan``            driver  add the label columns (metadata only), find the fragments with
                            todo rows, pack small ones together into work units
``label_fragments`` worker  read ``id`` + image of a unit's todo rows, ask the labeler,
                            yield the label values batch by batch, with its node (tasks
                            spread over the cluster's nodes); never writes the table
                            (a generate task reads its input columns and asks a chat
                            endpoint instead: :mod:`ray_jobs.label.generate`)
``on_values``       driver  keep a batch of values; commit when the group is due
``commit``          driver  ONE Lance commit for every pending value, whatever fragments
                            they come from (``lance_io.columns.commit_values``)
``on_unit_failed``  driver  commit what arrived; run a unit whose worker died again, else
                            record an ``ErrorRecord`` per unfinished fragment; a labeler
                            that cannot answer (unreachable, no answer in time) ends the
                            run: ``on_labeler_down`` records every unit left the same way
``finish``          driver  commit the rest, record the errors, store the run as a version
==================  ======  ============================================================

:func:`run_units` is the loop that drives them. The driver is the only writer: workers hand
back values (``id`` + label columns + ``_rowid``: no image bytes) through a Ray streaming
generator, and the driver groups the values of fragments that finish close together into one
commit when they reach ``commit_rows`` rows or ``commit_seconds`` of age. Why it is crash-safe
and exactly-once: a kill -9 anywhere loses only values not committed yet (the rerun's plan
finds those rows still todo), and each commit locates its rows (by the row id each was read
with, its ``id`` checked) with the todo predicate at commit time, so a row already labeled (by
this run, a concurrent job, or before a crash) is never written again; ``lancetag.rows`` in
each commit makes that auditable (:func:`label_commits`).
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import lance
import pyarrow as pa

from lance_io.columns import (
    ROW_ID,
    FragmentTodo,
    PendingValues,
    commit_values,
    ensure_columns,
    plan_fragments,
    todo_batches,
)
from lance_io.errors import ErrorRecord, record_errors, summarize_errors
from lance_io.reasons import ReasonError
from lance_io.versions import VersionInfo, record_run, tag_version
from ray_jobs.label.generate import ChatEndpoint
from ray_jobs.label.labeler import LabelerEndpoint, label_concurrently
from ray_jobs.label.placement import NodeRows, worker_node

UNIT_ATTEMPTS = 3  # runs of a unit whose worker died (kill -9, node lost) before its fragments are reported failed
# A unit failed with one of these after the client's retries: every other unit would wait and fail
# the same way, so the run ends there (one failure's wait, not one per unit) and its rows stay todo.
# Not ``labeler_busy`` (an overload passes) nor ``labeler_refused`` (a 4xx may concern one batch).
LABELER_DOWN = frozenset({"labeler_unreachable", "labeler_unavailable", "generator_unreachable"})
_TICK_S = 0.5  # how often the driver looks at the clock for groups due by age
# Label commits before this module wrote ``write_fragment``: the audit counts both.
LABEL_COMMIT_OPERATIONS = ("commit_values", "write_fragment")


@dataclass
class LabelSummary:
    """What a run did. ``planned == labeled + failed + skipped`` plus the rows of failed fragments.

    ``failed`` counts rows the labeler answered with an error (stored in ``C_error``);
    ``fragments_failed`` fragments whose worker failed (their rows stay todo), by reason in
    ``errors`` (the records themselves: ``lance_io.read_errors(table, job="label-<run_id>")``).
    ``commits`` is the number of label versions the run created; ``nodes`` the rows its
    commits wrote by the Ray node whose worker labeled them (node id -> rows).
    """

    table: str
    column: str
    planned: int = 0
    labeled: int = 0
    failed: int = 0
    skipped: int = 0
    fragments_planned: int = 0
    fragments_committed: int = 0
    fragments_failed: int = 0
    commits: int = 0
    version: int | None = None
    seconds: float = 0.0
    run_id: str = ""
    provenance: str = ""
    errors: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkUnit:
    """Fragments one worker labels, in order: small fragments share a unit, so a sparse relabel pays one task for many."""

    fragments: tuple[FragmentTodo, ...]

    @property
    def rows(self) -> int:
        """Todo rows of the unit at plan time."""
        return sum(f.rows for f in self.fragments)

    @property
    def fragment_ids(self) -> list[int]:
        """The unit's fragments, in order."""
        return [f.fragment_id for f in self.fragments]


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs; plain data so it crosses process boundaries."""

    uri: str
    column: str
    task_data: dict[str, Any]
    rows_to_do: str  # todo AND where
    endpoint: LabelerEndpoint
    storage_options: dict[str, str] | None
    generator: ChatEndpoint | None = None  # a generate task: the chat model instead of the labeler


def pack_fragments(plan: list[FragmentTodo], max_rows: int) -> list[WorkUnit]:
    """Return the plan's fragments, in order, packed into units of at most ``max_rows`` todo rows (never split)."""
    units: list[WorkUnit] = []
    current: list[FragmentTodo] = []
    for fragment in plan:
        if current and sum(f.rows for f in current) + fragment.rows > max_rows:
            units.append(WorkUnit(tuple(current)))
            current = []
        current.append(fragment)
    if current:
        units.append(WorkUnit(tuple(current)))
    return units


def label_fragments(unit: WorkUnit, spec: WorkerSpec) -> Iterator[tuple[int, pa.Table, str]]:
    """Worker (a Ray streaming task): label the todo rows of the unit's fragments; yield ``(fragment_id, values, node)``.

    Reads only ``id`` and the image of rows matching ``todo AND where`` now (rows committed
    since the plan are skipped), one labeler batch at a time (``batch_size`` x ``in_flight``
    images), and yields that batch's values: ``id``, the task's label columns and each row's
    ``_rowid`` as read (the commit finds the row by it). It never writes the table: a worker
    killed at any point leaves nothing half-written, and what it had not yielded is simply
    still todo. ``node`` is this worker's Ray node id.
    """
    node = worker_node()
    for fragment_id, values in _unit_values(unit, spec):
        yield fragment_id, values, node


def _unit_values(unit: WorkUnit, spec: WorkerSpec) -> Iterator[tuple[int, pa.Table]]:
    from lance_io.labels import results_to_batch
    from lance_io.tasks import task_from_dict

    task = task_from_dict(spec.task_data)
    ds = lance.dataset(spec.uri, storage_options=spec.storage_options)
    batch_size = spec.endpoint.request_size * spec.endpoint.in_flight
    if spec.generator is not None:  # a generate task reads its input columns (the image only if it sends it)
        from ray_jobs.label.generate import generate_fragments, read_columns

        names = ds.schema.names
        columns = read_columns(task, names)  # type: ignore[arg-type]
        batches = todo_batches(ds, unit.fragment_ids, columns, spec.rows_to_do, batch_size)
        yield from generate_fragments(task, batches, names, spec.column, spec.generator)  # type: ignore[arg-type]
        return
    client = spec.endpoint.connect()
    for group in _todo_groups(ds, unit, spec.rows_to_do, batch_size):
        images = [image for _, batch in group for image in batch.column("image").to_pylist()]
        results = label_concurrently(client, images, spec.endpoint.request_size, spec.endpoint.in_flight)
        ids = pa.concat_arrays([batch.column("id") for _, batch in group])
        row_ids = pa.concat_arrays([batch.column(ROW_ID) for _, batch in group])
        values = pa.Table.from_batches([results_to_batch(results, task, spec.column)]).add_column(0, "id", ids)
        values = values.append_column(ROW_ID, row_ids)
        start = 0
        for fragment_id, batch in group:
            yield fragment_id, values.slice(start, batch.num_rows)
            start += batch.num_rows


def _todo_groups(ds: lance.LanceDataset, unit: WorkUnit, predicate: str | None,
                 batch_size: int) -> Iterator[list[tuple[int, pa.RecordBatch]]]:
    """The unit's todo rows (``id`` + image) in fragment order, grouped into about ``batch_size`` rows:
    a fragment with few todo rows (a relabel spread thin) shares its labeler requests with the next."""
    group: list[tuple[int, pa.RecordBatch]] = []
    rows = 0
    for fragment_id, batch in todo_batches(ds, unit.fragment_ids, ["image"], predicate, batch_size):
        group.append((fragment_id, batch))
        rows += batch.num_rows
        if rows >= batch_size:
            yield group
            group, rows = [], 0
    if group:
        yield group


class LabelRun:
    """The driver's side of one run: the plan, the values waiting for a commit, the counts."""

    def __init__(
        self,
        table: str,
        schema: pa.Schema,
        *,
        todo: str,
        where: str | None,
        properties: dict[str, str],
        commit_rows: int,
        commit_seconds: float,
        storage_options: dict[str, str] | None,
        summary: LabelSummary,
    ) -> None:
        self.table, self.schema, self.todo, self.where = table, schema, todo, where
        self.properties, self.storage_options, self.summary = properties, storage_options, summary
        self.pending = PendingValues(commit_rows, commit_seconds)
        self.received: Counter[int] = Counter()  # rows handed back, by fragment
        self.last_fragment: dict[WorkUnit, int] = {}  # the fragment a unit's worker last handed back rows of
        self.attempts: Counter[tuple[FragmentTodo, ...]] = Counter()
        self.failures: list[ErrorRecord] = []
        self.unfinished_rows = 0
        self.fragments_written: set[int] = set()
        self.nodes = NodeRows()
        self.labeler_down: tuple[str, str] | None = None  # (reason, message) that ended the run

    @property
    def job(self) -> str:
        """The job id every commit, version and error record of this run carries."""
        return self.properties["lancetag.job"]

    def plan(self, concurrency: int) -> list[WorkUnit]:
        """Driver, before any worker: add the label columns and return the work, packed into units.

        May write: the task's columns as all-null columns (metadata only, skipped when they
        exist). Reads only the predicate's columns to find fragments with todo rows; packs
        them so each unit holds at most ``commit_rows`` rows and every one of ``concurrency``
        workers gets work.
        """
        ensure_columns(self.table, self.schema, storage_options=self.storage_options)
        plan = plan_fragments(self.table, self.todo, where=self.where, storage_options=self.storage_options)
        self.summary.planned = sum(f.rows for f in plan)
        self.summary.fragments_planned = len(plan)
        per_worker = math.ceil(self.summary.planned / concurrency) if plan else 1
        return pack_fragments(plan, max(1, min(self.pending.commit_rows, per_worker)))

    def on_values(self, unit: WorkUnit, fragment_id: int, values: pa.Table, node: str = "") -> None:
        """Driver, when a worker (on ``node``) hands back a batch: keep it, and commit the group if it is due."""
        self.received[fragment_id] += values.num_rows
        self.nodes.add(node, values)
        self.last_fragment[unit] = fragment_id
        self.pending.add(values)
        if self.pending.due():
            self.commit()

    def commit(self) -> None:
        """Driver: commit every pending value as ONE Lance version and count what it wrote.

        The only place a run writes labels. ``commit_values`` locates the rows now (by the row
        id they were read with, ``id`` checked) and writes only those still todo (first writer
        wins), retrying on commit conflicts; a storage failure raises ``TableWriteError`` and
        ends the run, the table unchanged.
        """
        values = self.pending.take()
        if values is None:
            return
        done = commit_values(
            self.table, values, todo=self.todo, properties=self.properties, storage_options=self.storage_options,
            written_properties=self.nodes.properties,
        )
        self.nodes.committed(done.written)
        if done.version is None:
            return
        failed = done.rows - done.written.column(f"{self.summary.column}_error").null_count  # the labeler's errors
        self.summary.failed += failed
        self.summary.labeled += done.rows - failed
        self.summary.commits += 1
        self.fragments_written.update(done.fragments)

    def on_unit_failed(self, unit: WorkUnit, error: BaseException) -> WorkUnit | None:
        """Driver, when a unit's worker raised or died: commit what it sent; return the unit to run again, if any.

        The unfinished fragments are the one the worker was in and those after it. A worker
        that died (kill -9, lost node) is run again on them, up to ``UNIT_ATTEMPTS`` times,
        after committing what it sent so nothing is labeled twice; any other failure (the
        labeler unreachable after its retries, an error in the task) records one
        ``ErrorRecord`` per unfinished fragment (its reason, stage ``label``, this job), and
        their rows stay todo for a rerun. A reason in ``LABELER_DOWN`` also sets
        ``labeler_down``: the run ends.
        """
        self.commit()
        left = self._unfinished(unit)
        self.attempts[left] += 1
        if _worker_lost(error) and self.attempts[left] < UNIT_ATTEMPTS:
            return WorkUnit(left)
        reason, message = failure_reason(error)
        if reason in LABELER_DOWN:
            self.labeler_down = (reason, message)
        self._record_failed(left, reason, message)
        return None

    def on_labeler_down(self, unit: WorkUnit) -> None:
        """Driver, for each unit still running (its worker cancelled) or waiting when the labeler went down.

        Its unfinished fragments become ``ErrorRecord`` s with the reason that ended the run;
        what its worker already handed back is committed with the rest in ``finish``.
        """
        assert self.labeler_down is not None
        reason, message = self.labeler_down
        self._record_failed(self._unfinished(unit), reason, f"the run ended when the labeler went down ({message})")

    def _unfinished(self, unit: WorkUnit) -> tuple[FragmentTodo, ...]:
        """The fragments of ``unit`` its worker had not finished: the one it last handed back rows of, and after."""
        last = self.last_fragment.pop(unit, None)
        return unit.fragments[unit.fragment_ids.index(last) :] if last is not None else unit.fragments

    def _record_failed(self, fragments: tuple[FragmentTodo, ...], reason: str, message: str) -> None:
        for fragment in fragments:
            self.failures.append(
                ErrorRecord(
                    source=f"{self.table}#fragment={fragment.fragment_id}",
                    reason=reason,
                    message=f"{message}; its rows stay todo: rerun the same command to label them",
                    job=self.job,
                    stage="label",
                )
            )
            self.unfinished_rows += max(0, fragment.rows - self.received[fragment.fragment_id])
        self.summary.fragments_failed += len(fragments)

    def rows_not_received(self, unit: WorkUnit) -> int:
        """Planned rows of the unit no worker handed back (labeled by others meanwhile, or failed)."""
        return sum(max(0, f.rows - self.received[f.fragment_id]) for f in unit.fragments)

    def finish(self, started: float, record: dict[str, Any], version_tag: str | None) -> LabelSummary:
        """Driver, after the last worker: commit the rest, record the failures, store the run as a version.

        Writes the pending values (one commit), the failed fragments' ``ErrorRecord`` s to the
        table's errors record, then the run's parameters and counts as a table version
        (``lancetag versions`` shows it), tagged ``version_tag`` if given.
        """
        self.commit()
        record_errors(self.table, self.failures, storage_options=self.storage_options)
        summary = self.summary
        summary.errors = summarize_errors(self.failures)
        summary.fragments_committed = len(self.fragments_written)
        summary.nodes = dict(sorted(self.nodes.written.items()))
        summary.skipped = summary.planned - summary.labeled - summary.failed - self.unfinished_rows
        summary.seconds = round(time.perf_counter() - started, 3)
        summary.version = record_run(self.table, summary.run_id, {**asdict(summary), **record}, storage_options=self.storage_options)
        if version_tag:
            tag_version(self.table, version_tag, summary.version, storage_options=self.storage_options)
        return summary


def run_units(run: LabelRun, units: list[WorkUnit], spec: WorkerSpec, *, concurrency: int, progress: bool) -> None:
    """Driver: run one streaming Ray task per unit, ``concurrency`` at a time, handing what happens to ``run``'s phases."""
    import ray

    from ray_jobs.label.progress import RowProgress

    # Ray does not retry these tasks itself: a retry must start after the driver committed what
    # the dead worker sent (on_unit_failed), or those rows would be labeled twice.
    # SPREAD: units go to every node of a cluster (a node that joins mid-run gets the next ones).
    remote = ray.remote(label_fragments).options(
        num_cpus=0.25, num_returns="streaming", max_retries=0, scheduling_strategy="SPREAD"
    )
    queue = deque(units)
    running: dict[Any, WorkUnit] = {}
    with RowProgress(run.summary.planned, enabled=progress) as bar:
        try:
            while (queue or running) and run.labeler_down is None:
                while queue and len(running) < concurrency:
                    unit = queue.popleft()
                    running[remote.remote(unit, spec)] = unit
                ready, _ = ray.wait(list(running), num_returns=1, timeout=_TICK_S)
                for stream in ready:
                    unit = running[stream]
                    try:
                        fragment_id, values, node = ray.get(next(stream))
                    except StopIteration:
                        del running[stream]
                        run.last_fragment.pop(unit, None)
                        bar.advance(run.rows_not_received(unit))
                        continue
                    except Exception as exc:  # the task raised, or its worker died
                        del running[stream]
                        again = run.on_unit_failed(unit, exc)
                        if again is not None:
                            queue.appendleft(again)
                        else:
                            bar.advance(run.rows_not_received(unit))
                        continue
                    run.on_values(unit, fragment_id, values, node)
                    bar.advance(values.num_rows)
                if run.pending.due():  # a group due by age while no worker handed anything back
                    run.commit()
        finally:
            for stream in running:  # a failed commit or a labeler gone ends the run: stop the workers
                ray.cancel(stream, force=True)
        for unit in [*running.values(), *queue]:  # only when the labeler went down
            run.on_labeler_down(unit)
            bar.advance(run.rows_not_received(unit))


def _worker_lost(error: BaseException) -> bool:
    """Return whether ``error`` says the worker process was lost (not that the labeling failed)."""
    from ray.exceptions import LocalRayletDiedError, NodeDiedError, ObjectLostError, WorkerCrashedError

    return isinstance(error, WorkerCrashedError | NodeDiedError | LocalRayletDiedError | ObjectLostError)


def failure_reason(error: BaseException) -> tuple[str, str]:
    """Return (reason, message) for a failed unit: the task's own ReasonError, else a code for its kind."""
    import httpx
    from ray.exceptions import RayTaskError

    cause = (error.cause or error) if isinstance(error, RayTaskError) else error
    if isinstance(cause, ReasonError):  # e.g. the labeler client's labeler_busy, labeler_refused
        return cause.reason, cause.message
    if _worker_lost(cause):
        return "label_worker_died", f"the worker labeling it died {UNIT_ATTEMPTS} times ({type(cause).__name__})"
    text = str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else type(cause).__name__
    if isinstance(cause, httpx.TransportError):
        return "labeler_unreachable", f"the labeler did not answer after the client's retries ({text})"
    return "label_task_failed", f"{type(cause).__name__}: {text}"


def label_commits(table: str, column: str = "label", *, storage_options: dict[str, str] | None = None) -> list[VersionInfo]:
    """Return the versions in which label runs wrote ``column``, oldest first.

    Each records the rows it wrote (``lancetag.rows``): their sum equals the table's labeled rows
    exactly when no row was labeled twice.
    """
    ds = lance.dataset(table, storage_options=storage_options)
    commits = []
    for v in ds.versions():
        try:
            transaction = ds.read_transaction(v["version"])
        except TypeError:  # pylance 14.0.2 cannot read a compaction that rewrote an index: never a label commit
            continue
        properties = dict(transaction.transaction_properties or {}) if transaction else {}
        if properties.get("lancetag.column") == column and properties.get("lancetag.operation") in LABEL_COMMIT_OPERATIONS:
            operation = type(transaction.operation).__name__
            rows = int(v["metadata"].get("total_rows", 0))
            commits.append(VersionInfo(v["version"], v["timestamp"], operation, rows, properties))
    return commits

"""`lancetag label`: add label columns to an image table, fragment by fragment, on Ray.

The lifecycle, in one screen:

1. **plan** (driver): add the task's columns (metadata only), then find the fragments with
   rows still to do: never labeled, failed last time, or (``relabel``) labeled by another
   model/adapter/prompt; restricted by ``where``. Only those columns are read.
2. **label** (one Ray task per fragment, ``concurrency`` at a time): read ``id`` + image bytes
   of the todo rows, send them to the labeler with several requests in flight.
3. **commit** (inside the same task): every ``commit_rows`` rows and at the end of the
   fragment, the label columns of those rows are committed alone (``lance_io.write_fragment``).
   Image bytes are never rewritten; rows appended meanwhile are untouched and stay todo.
4. **finish** (driver): store the run's parameters and counts as a table version, tag it.

A crash anywhere leaves the table at its last commit; rerunning the same command plans again
and labels only what is left.
"""

from __future__ import annotations

import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lance_io.labels import label_schema, provenance_of
from lance_io.sql import sql_string
from lance_io.versions import VersionInfo, list_versions
from ray_jobs.label.labeler import LabelerEndpoint, label_concurrently


class LabelOptions(BaseModel):
    """What to label and with which labeler; mirrors the ``lancetag label`` flags."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="Task name (configs/tasks) or YAML path")
    column: str = Field("label", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Column prefix")
    serve: str | None = Field(None, description="Base URL of a running labeler (HTTP)")
    app: str | None = Field(None, description="Name of a labeler Serve app in this cluster (handle)")
    model: str | None = Field(None, description="Start a labeler for this model (path or hub id)")
    backend: str = Field("transformers", description="Backend of the started labeler")
    lora: str | None = Field(None, description="LoRA adapter of the started labeler")
    where: str | None = Field(None, description="SQL predicate restricting the rows")
    relabel: bool = Field(False, description="Also redo rows labeled by another model/adapter/prompt")
    concurrency: int = Field(4, ge=1, description="Fragments labeled at once")
    batch_size: int = Field(8, ge=1, description="Images per labeler request")
    in_flight: int = Field(4, ge=1, description="Requests open at once per fragment")
    commit_rows: int = Field(1024, ge=1, description="Commit at least this often within a fragment")
    version_tag: str | None = Field(None, description="Tag the version the run ends at")
    token_env: str | None = Field(None, description="Env var with the labeler's bearer token")
    labeler_num_cpus: float = Field(1.0, ge=0, description="CPUs of the started labeler replica")
    labeler_num_gpus: float = Field(0.0, ge=0, description="GPUs of the started labeler replica")

    @model_validator(mode="after")
    def _one_labeler(self) -> LabelOptions:
        given = [name for name in ("serve", "app", "model") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of --serve URL, --app NAME or --model M (got: {', '.join(given) or 'none'})")
        return self


@dataclass
class LabelSummary:
    """What a run did. ``planned == labeled + failed + skipped`` for the fragments that finished."""

    table: str
    column: str
    planned: int = 0
    labeled: int = 0
    failed: int = 0
    skipped: int = 0
    fragments_planned: int = 0
    fragments_committed: int = 0
    fragments_failed: int = 0
    version: int | None = None
    seconds: float = 0.0
    run_id: str = ""
    provenance: str = ""
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FragmentJob:
    """Everything a fragment task needs; plain data so it crosses process boundaries."""

    uri: str
    column: str
    task_data: dict[str, Any]
    todo: str
    where: str | None
    endpoint: LabelerEndpoint
    commit_rows: int
    properties: dict[str, str]
    storage_options: dict[str, str] | None


@dataclass
class FragmentOutcome:
    """What one fragment task committed."""

    fragment_id: int
    planned: int
    written: int = 0
    failed: int = 0
    versions: list[int] = field(default_factory=list)


def label_fragment(fragment_id: int, planned: int, job: FragmentJob) -> FragmentOutcome:
    """Label the todo rows of one fragment and commit them; runs inside a Ray task."""
    import pyarrow.compute as pc

    from lance_io import write_fragment
    from lance_io.labels import results_to_batch
    from lance_io.tasks import task_from_dict

    task = task_from_dict(job.task_data)
    client = job.endpoint.connect()
    outcome = FragmentOutcome(fragment_id, planned)
    schema = label_schema(task, job.column)

    def compute(batch):  # type: ignore[no-untyped-def]
        images = batch.column("image").to_pylist()
        results = label_concurrently(client, images, job.endpoint.request_size, job.endpoint.in_flight)
        return results_to_batch(results, task, job.column)

    def tally(committed) -> None:  # type: ignore[no-untyped-def]
        outcome.failed += committed.num_rows - pc.sum(pc.is_null(committed[f"{job.column}_error"])).as_py()

    result = write_fragment(
        job.uri,
        fragment_id,
        compute,
        read_columns=["image"],
        output_schema=schema,
        todo=job.todo,
        where=job.where,
        batch_size=job.endpoint.request_size * job.endpoint.in_flight,
        commit_rows=job.commit_rows,
        properties=job.properties,
        storage_options=job.storage_options,
        on_commit=tally,
    )
    outcome.written, outcome.versions = result.rows_written, result.versions
    return outcome


def label_commits(table: str, column: str = "label", *, storage_options: dict[str, str] | None = None) -> list[VersionInfo]:
    """Return the versions in which label runs wrote ``column``, oldest first.

    Each records the rows it wrote (``lancetag.rows``): their sum equals the table's labeled rows
    exactly when no row was labeled twice.
    """
    return [
        v
        for v in list_versions(table, storage_options=storage_options)
        if v.properties.get("lancetag.column") == column and v.properties.get("lancetag.operation") == "write_fragment"
    ]


def todo_predicate(column: str, provenance: str, relabel: bool) -> str:
    """Return the SQL predicate of rows that still need a label from this labeler."""
    todo = f"{column}_provenance IS NULL OR {column}_error IS NOT NULL"
    if relabel:
        todo += f" OR {column}_provenance != {sql_string(provenance)}"
    return todo


def _labeler_identity(options: LabelOptions, task_hash: str) -> tuple[str, str | None]:
    """Return (model, adapter) of the labeler, asking a running one what it serves."""
    if options.model:
        return options.model, options.lora
    if options.serve:
        endpoint = LabelerEndpoint(url=options.serve, token_env=options.token_env)
        info = endpoint.connect().info()
    else:
        from ray import serve

        info = serve.get_app_handle(options.app).describe.remote().result()
    if info.get("task_hash") != task_hash:
        served = info.get("task", {}).get("name", "?")
        raise ValueError(
            f"the labeler serves task {served!r} (hash {info.get('task_hash')}), not {options.task!r} "
            f"(hash {task_hash}): start it with --task {options.task} or label with --task {served}"
        )
    backend = info.get("backend", {})
    return backend.get("model", "?"), backend.get("adapter")


def _start_labeler(options: LabelOptions, run_id: str) -> str:
    from serve_apps.app import LabelerConfig, run_labeler
    from serve_apps.backends.base import BackendConfig

    app_name = f"lancetag-label-{run_id}"
    with socket.socket() as probe:  # reached through a handle; its HTTP port only must not clash
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = LabelerConfig(
        port=port,
        task=options.task,
        backend=BackendConfig(kind=options.backend, model=options.model, adapter=options.lora, batch_size=options.batch_size),
        app_name=app_name,
        route_prefix=f"/{app_name}",
        num_cpus=options.labeler_num_cpus,
        num_gpus=options.labeler_num_gpus,
        max_batch_size=max(options.batch_size, 8),
    )
    run_labeler(config)
    return app_name


def label_table(
    table: str,
    options: LabelOptions,
    *,
    storage_options: dict[str, str] | None = None,
    progress: bool = True,
    address: str | None = None,
) -> LabelSummary:
    """Label the rows of ``table`` that still need it and return what was done.

    Example::

        summary = label_table("/data/hotel.lance", LabelOptions(task="hotel", model="Qwen/Qwen2-VL-2B-Instruct"))
    """
    from lance_io import ensure_columns, plan_fragments
    from lance_io.tasks import load_task
    from lance_io.versions import record_run, tag_version
    from ray_jobs.ray_session import ensure_ray

    started = time.perf_counter()
    run_id = uuid.uuid4().hex[:12]
    task = load_task(options.task)
    column = options.column
    ensure_ray(address)

    model, adapter = _labeler_identity(options, task.prompt_hash())
    provenance = provenance_of(model, adapter, task.prompt_hash())
    ensure_columns(table, label_schema(task, column), storage_options=storage_options)
    todo = todo_predicate(column, provenance, options.relabel)
    plan = plan_fragments(table, todo, where=options.where, storage_options=storage_options)
    summary = LabelSummary(table=table, column=column, run_id=run_id, provenance=provenance)
    summary.planned = sum(p.rows for p in plan)
    summary.fragments_planned = len(plan)
    properties = {
        "lancetag.job": f"label-{run_id}",
        "lancetag.task": task.name,
        "lancetag.task_hash": task.prompt_hash(),
        "lancetag.model": model,
        "lancetag.adapter": adapter or "",
        "lancetag.column": column,
    }
    unfinished_rows = 0
    # A labeler the job starts itself costs a model load: only when there is work.
    started_app = _start_labeler(options, run_id) if options.model and plan else None
    try:
        endpoint = LabelerEndpoint(
            url=options.serve,
            app_name=started_app or options.app,
            token_env=options.token_env,
            request_size=options.batch_size,
            in_flight=options.in_flight,
        )
        job = FragmentJob(
            table, column, task.model_dump(mode="json"), todo, options.where, endpoint, options.commit_rows, properties, storage_options
        )
        if plan:
            unfinished_rows = _run_fragments(plan, job, summary, concurrency=options.concurrency, progress=progress)
    finally:
        if started_app:
            from serve_apps.app import stop_labeler

            stop_labeler(started_app)

    summary.skipped = summary.planned - summary.labeled - summary.failed - unfinished_rows
    summary.seconds = round(time.perf_counter() - started, 3)
    record = {k: v for k, v in asdict(summary).items() if k not in ("errors",)}
    record.update(operation="label", job=f"label-{run_id}", task=task.name, model=model, adapter=adapter or "", where=options.where or "")
    summary.version = record_run(table, run_id, record, storage_options=storage_options)
    if options.version_tag:
        tag_version(table, options.version_tag, summary.version, storage_options=storage_options)
    return summary


def _run_fragments(plan: list, job: FragmentJob, summary: LabelSummary, *, concurrency: int, progress: bool) -> int:
    """Run one Ray task per planned fragment, ``concurrency`` at a time; tally outcomes into ``summary``.

    Returns the planned rows of fragments whose task failed (they stay todo for a rerun).
    """
    import ray

    from ray_jobs.label.progress import RowProgress

    remote = ray.remote(num_cpus=0.25, max_retries=2)(label_fragment)
    queue = list(plan)
    running: dict[Any, Any] = {}
    unfinished_rows = 0
    with RowProgress(summary.planned, enabled=progress) as bar:
        while queue or running:
            while queue and len(running) < concurrency:
                todo = queue.pop(0)
                running[remote.remote(todo.fragment_id, todo.rows, job)] = todo
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in done:
                todo = running.pop(ref)
                try:
                    outcome: FragmentOutcome = ray.get(ref)
                except Exception as exc:  # the fragment's committed rows stay; a rerun finishes it
                    summary.fragments_failed += 1
                    summary.errors.append(f"fragment {todo.fragment_id}: {type(exc).__name__}: {str(exc)[:300]}")
                    unfinished_rows += todo.rows
                    bar.advance(todo.rows)
                    continue
                summary.labeled += outcome.written - outcome.failed
                summary.failed += outcome.failed
                summary.fragments_committed += 1 if outcome.versions else 0
                bar.advance(outcome.planned)
    return unfinished_rows

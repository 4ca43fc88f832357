"""`lancetag label`: add label columns to an image table on Ray; its options and the wiring of one run.

The run's phases (plan, label on workers, grouped commits on the driver, failures, finish)
are in :mod:`ray_jobs.label.lifecycle`, in one screen; docs/labeling.md describes them.
"""

from __future__ import annotations

import socket
import time
import uuid
from typing import Annotated, Any

import lance
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from lance_io.labels import check_label_target, inputs_key_sql, label_schema, provenance_of
from lance_io.reasons import ReasonError
from lance_io.scan import Predicate
from lance_io.sql import sql_string
from lance_io.tasks import GenerateTask, Task
from lance_io.versions import tag_name
from ray_jobs.label.generate import FREE_ANSWER, ChatEndpoint, chat_base, served_model
from ray_jobs.label.labeler import LabelerEndpoint
from ray_jobs.label.lifecycle import LabelRun, LabelSummary, WorkerSpec, label_commits, run_units

__all__ = ["LabelOptions", "LabelSummary", "label_commits", "label_table", "todo_predicate"]


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
    where: Predicate = Field(None, description="SQL predicate restricting the rows")
    relabel: bool = Field(False, description="Also redo rows labeled by another model/adapter/prompt")
    concurrency: int = Field(4, ge=1, description="Workers labeling at once (each a unit of fragments)")
    batch_size: int = Field(8, ge=1, description="Images per labeler request")
    views: int | None = Field(
        None, ge=1, le=32, description="Views per image averaged by the started labeler (None: as the model says)"
    )
    in_flight: int = Field(4, ge=1, description="Requests open at once per worker")
    # Versions per run follow the run's time, not the table's size: a commit every 30 s (or 100k rows) is
    # about 22 versions for 1M rows labeled in 11 minutes (1,024 rows gave 979: bench/RESULTS.md "scale").
    commit_rows: int = Field(100_000, ge=1, description="Commit when this many labeled rows wait (any fragments)")
    commit_seconds: float = Field(30.0, gt=0, description="Commit when the oldest waiting labels are this old")
    version_tag: Annotated[str | None, AfterValidator(tag_name)] = Field(None, description="Tag the version the run ends at")
    token_env: str | None = Field(None, description="Env var with the labeler's bearer token")
    labeler_timeout: float = Field(
        300.0,
        gt=0,
        description="Seconds a labeler request may wait for its answer; past it the run ends (labeler_unavailable). "
        "Keep it above a replica's start on another node (model load included)",
    )
    labeler_num_cpus: float = Field(1.0, ge=0, description="CPUs of the started labeler replica")
    labeler_num_gpus: float = Field(0.0, ge=0, description="GPUs of the started labeler replica")
    generate_extra_body: dict[str, Any] = Field(
        default_factory=dict, description="generate tasks: fields merged into every chat request (server extras)"
    )

    @model_validator(mode="after")
    def _one_labeler(self) -> LabelOptions:
        given = [name for name in ("serve", "app", "model") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of --serve URL, --app NAME or --model M (got: {', '.join(given) or 'none'})")
        return self


def todo_predicate(column: str, provenance: str, relabel: bool, *, inputs_sql: str | None = None) -> str:
    """Return the SQL predicate of rows that still need a label from this labeler.

    For a generate task ``inputs_sql`` is the SQL of its inputs' key: the stored provenance
    must equal ``provenance|<key>``, so ``relabel`` also redoes rows whose inputs changed.
    """
    todo = f"{column}_provenance IS NULL OR {column}_error IS NOT NULL"
    if relabel and inputs_sql:
        todo += f" OR {column}_provenance != concat({sql_string(provenance + '|')}, {inputs_sql})"
    elif relabel:
        todo += f" OR {column}_provenance != {sql_string(provenance)}"
    return todo


def _labeler_identity(options: LabelOptions, task: Task) -> tuple[str, str | None, int]:
    """Return (model, adapter, views of each image) of the labeler, asking a running one what it serves."""
    from serve_apps.backends.base import BackendConfig, views_for, views_used

    if options.model:
        config = BackendConfig(kind=options.backend, model=options.model, adapter=options.lora, views=options.views)
        return options.model, options.lora, views_for(config, task)
    if options.serve:
        endpoint = LabelerEndpoint(url=options.serve, token_env=options.token_env, timeout_s=options.labeler_timeout)
        info = endpoint.connect().info()
    else:
        from ray import serve

        try:
            info = serve.get_app_handle(options.app).describe.remote().result(timeout_s=options.labeler_timeout)
        except TimeoutError as exc:
            raise ReasonError(
                "labeler_unavailable",
                f"the labeler app {options.app!r} did not answer in {options.labeler_timeout:g} s: no replica can run "
                "(check `serve status`: its nodes lost, or the resources it asks for absent)",
            ) from exc
    task_hash = task.prompt_hash()
    if info.get("task_hash") != task_hash:
        served = info.get("task", {}).get("name", "?")
        raise ReasonError(
            "labeler_task_mismatch",
            f"the labeler serves task {served!r} (hash {info.get('task_hash')}), not {options.task!r} "
            f"(hash {task_hash}): start it with --task {options.task} or label with --task {served}"
        )
    backend = info.get("backend", {})
    return backend.get("model", "?"), backend.get("adapter"), views_used(task, int(backend.get("views", 1)))


def _generator(options: LabelOptions, task: GenerateTask) -> ChatEndpoint:
    """Return the chat endpoint a generate task writes with (``--serve``: any OpenAI-compatible server)."""
    if not options.serve:
        raise ReasonError(
            "generate_needs_endpoint",
            f"task {task.name!r} generates text: give --serve URL of an OpenAI-compatible server "
            "(vLLM's, a hosted API, or a running labeler), not --app or --model",
        )
    model, labeler = served_model(options.serve, options.token_env)
    extra = {**(FREE_ANSWER if labeler else {}), **options.generate_extra_body}
    return ChatEndpoint(
        url=chat_base(options.serve), model=model, token_env=options.token_env, in_flight=options.in_flight,
        extra_body=tuple(sorted(extra.items())),
    )


def _check_inputs(task: GenerateTask, names: list[str]) -> None:
    """Refuse a generate task whose input columns the table lacks, naming them."""
    absent = [c for c in task.inputs.values() if c not in names]
    if absent:
        raise ReasonError(
            "generate_input_missing",
            f"task {task.name!r} reads {', '.join(absent)}, which the table does not have: "
            "label those first (e.g. lancetag label --task fashion --column attrs) or fix the task's inputs",
        )


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
        backend=BackendConfig(
            kind=options.backend, model=options.model, adapter=options.lora, batch_size=options.batch_size,
            views=options.views,
        ),
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
    from lance_io.tasks import load_task
    from ray_jobs.ray_session import ensure_ray

    started = time.perf_counter()
    run_id = uuid.uuid4().hex[:12]
    task = load_task(options.task)
    column = options.column
    schema = lance.dataset(table, storage_options=storage_options).schema
    check_label_target(schema, task, column)
    if options.model and not isinstance(task, GenerateTask):  # a labeler the job starts: one that cannot
        from serve_apps.backends.base import backend_class  # answer the task is refused before Ray or a write

        backend_class(options.backend).check_task(task)
    ensure_ray(address)

    generator = _generator(options, task) if isinstance(task, GenerateTask) else None
    model, adapter, views = (generator.model, None, 1) if generator else _labeler_identity(options, task)
    provenance = provenance_of(model, adapter, task.prompt_hash(), views)
    todo = todo_predicate(column, provenance, options.relabel)
    if isinstance(task, GenerateTask):
        names = schema.names
        _check_inputs(task, names)
        todo = todo_predicate(column, provenance, options.relabel, inputs_sql=inputs_key_sql(task, names))
        todo = f"({' AND '.join(f'{c} IS NOT NULL' for c in task.inputs.values())}) AND ({todo})"
    properties = {
        "lancetag.job": f"label-{run_id}",
        "lancetag.task": task.name,
        "lancetag.task_hash": task.prompt_hash(),
        "lancetag.model": model,
        "lancetag.adapter": adapter or "",
        "lancetag.column": column,
    }
    run = LabelRun(
        table,
        label_schema(task, column),
        todo=todo,
        where=options.where,
        properties=properties,
        commit_rows=options.commit_rows,
        commit_seconds=options.commit_seconds,
        storage_options=storage_options,
        summary=LabelSummary(table=table, column=column, run_id=run_id, provenance=provenance),
    )
    units = run.plan(options.concurrency)
    # A labeler the job starts itself costs a model load: only when there is work.
    started_app = _start_labeler(options, run_id) if options.model and units else None
    try:
        endpoint = LabelerEndpoint(
            url=options.serve,
            app_name=started_app or options.app,
            token_env=options.token_env,
            request_size=options.batch_size,
            in_flight=options.in_flight,
            timeout_s=options.labeler_timeout,
        )
        rows_to_do = f"({todo}) AND ({options.where})" if options.where else todo
        spec = WorkerSpec(table, column, task.model_dump(mode="json"), rows_to_do, endpoint, storage_options, generator)
        run_units(run, units, spec, concurrency=options.concurrency, progress=progress)
    finally:
        if started_app:
            from serve_apps.app import stop_labeler

            stop_labeler(started_app)
    record = dict(operation="label", job=run.job, task=task.name, model=model, adapter=adapter or "", where=options.where or "")
    return run.finish(started, record, options.version_tag)

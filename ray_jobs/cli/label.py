"""`lancetag label`: add label columns to a table through the Serve labeler."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ray_jobs.cli.errors import EXIT_PARTIAL
from ray_jobs.cli.output import emit_json

if TYPE_CHECKING:
    from ray_jobs.label import LabelOptions


def label_command(
    table: Annotated[str, typer.Argument(help="Lance table URI (local path or s3://...)")],
    task: Annotated[str, typer.Option(help="Task name (configs/tasks) or YAML path")],
    serve: Annotated[str | None, typer.Option(help="Base URL of a running labeler")] = None,
    app_name: Annotated[str | None, typer.Option("--app", help="Labeler Serve app in this cluster (handle)")] = None,
    model: Annotated[str | None, typer.Option(help="Start a labeler for this model (path or hub id)")] = None,
    backend: Annotated[str, typer.Option(help="Backend of the started labeler")] = "transformers",
    lora: Annotated[str | None, typer.Option(help="LoRA adapter of the started labeler")] = None,
    column: Annotated[str, typer.Option(help="Column prefix of the labels")] = "label",
    where: Annotated[str | None, typer.Option(help="SQL predicate restricting the rows")] = None,
    relabel: Annotated[bool, typer.Option(help="Also redo rows labeled by another model/adapter/prompt")] = False,
    concurrency: Annotated[int, typer.Option(help="Fragments labeled at once")] = 4,
    batch_size: Annotated[int, typer.Option(help="Images per labeler request")] = 8,
    views: Annotated[
        int | None, typer.Option(help="Views per image the started labeler averages (default: as the model says)")
    ] = None,
    commit_rows: Annotated[int, typer.Option(help="Commit when N labeled rows wait (any fragments)")] = 100_000,
    commit_seconds: Annotated[float, typer.Option(help="Commit when the oldest waiting labels are this old")] = 30.0,
    version_tag: Annotated[str | None, typer.Option(help="Tag the version the run ends at")] = None,
    token_env: Annotated[str | None, typer.Option(help="Env var holding the labeler's bearer token")] = None,
    labeler_timeout: Annotated[
        float, typer.Option(help="Seconds a labeler request may wait; past it the run ends (labeler_unavailable)")
    ] = 300.0,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local cluster)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
) -> None:
    """Label the rows that still need it; commit in groups as work finishes; resume after a crash."""
    from lance_io.storage import resolve_storage_options
    from ray_jobs.label import LabelOptions, label_table

    options = LabelOptions(
        task=task, column=column, serve=serve, app=app_name, model=model, backend=backend, lora=lora, where=where,
        relabel=relabel, concurrency=concurrency, batch_size=batch_size, views=views, commit_rows=commit_rows,
        commit_seconds=commit_seconds, version_tag=version_tag, token_env=token_env, labeler_timeout=labeler_timeout,
    )
    storage_options = resolve_storage_options(table)
    _preflight(table, options, storage_options)
    summary = label_table(table, options, storage_options=storage_options, progress=not as_json, address=address)
    keys = ("planned", "labeled", "failed", "skipped", "fragments_committed", "commits", "version", "seconds")
    if as_json:
        extra = {"errors": summary.errors, "provenance": summary.provenance, "nodes": summary.nodes}
        emit_json({k: getattr(summary, k) for k in keys} | extra)
    else:
        typer.echo(", ".join(f"{k} {getattr(summary, k)}" for k in keys))
        if len(summary.nodes) > 1:  # on a cluster: where the work ran
            typer.echo("rows by node: " + ", ".join(f"{node[:12]} {rows}" for node, rows in summary.nodes.items()))
        for reason, fragments in summary.errors.items():
            typer.echo(
                f"fragments failed: {fragments} with {reason}; their rows stay todo: rerun the same command "
                f"(records: lance_io.read_errors({table!r}, job='label-{summary.run_id}'))",
                err=True,
            )
    if summary.fragments_failed:
        raise typer.Exit(EXIT_PARTIAL)


def _preflight(table: str, options: LabelOptions, storage_options: dict[str, str] | None) -> None:
    """Raise the ReasonError of a bad task, table, --where or unreachable --serve labeler.

    Checked here, before label_table starts Ray: a typo then costs a second, not a cluster start.
    """
    import os

    from lance_io.labels import check_label_target, label_schema
    from lance_io.scan import check_where, open_at
    from lance_io.tasks import load_task
    from serve_apps.client import LabelerClient

    task = load_task(options.task)
    new_columns = label_schema(task, options.column).names
    dataset = open_at(table, storage_options=storage_options)
    check_where(dataset, options.where, new_columns=new_columns)
    check_label_target(dataset.schema, task, options.column)
    if options.serve and task.kind == "generate":  # an OpenAI-compatible server, not a labeler: no /info
        from ray_jobs.label.generate import served_model

        served_model(options.serve, options.token_env)
    elif options.serve:
        token = os.environ.get(options.token_env) if options.token_env else None
        client = LabelerClient.over_http(options.serve, token=token, timeout_s=30.0)
        try:
            client.info()
        finally:
            client.close()


def register(app: typer.Typer) -> None:
    """Add the label command to the CLI."""
    app.command("label")(label_command)

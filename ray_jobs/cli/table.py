"""`lancetag show|versions|tag|diff|query|restore`: look at tables and their versions."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from ray_jobs.cli.output import JsonFlag, emit_json, print_rows

# Lance operation names, as a person reads them in a table's history.
OPERATION_NAMES = {"Merge": "add_columns", "CreateIndex": "create_index", "Overwrite": "create", "Append": "append",
                   "Update": "update", "Delete": "delete", "Restore": "restore", "UpdateConfig": "metadata",
                   "Rewrite": "compact", "Project": "drop_columns"}

VersionOpt = Annotated[str | None, typer.Option("--version", "-v", help="Version number or tag (default: latest)")]


def _options(uri: str) -> dict[str, str] | None:
    from lance_io.storage import resolve_storage_options

    return resolve_storage_options(uri)


def show(table: str, version: VersionOpt = None, as_json: JsonFlag = False) -> None:
    """Show a table: schema, rows, fragments, size, and each label column's coverage."""
    from lance_io.inspect import summarize_table

    summary = summarize_table(table, version, storage_options=_options(table))
    if as_json:
        emit_json(summary)
        return
    typer.echo(f"{summary.uri} @ version {summary.version} {summary.tags or ''}")
    typer.echo(f"rows {summary.rows}  fragments {summary.fragments}  size {summary.size_bytes / 1e6:.1f} MB")
    if summary.samples is not None:
        typer.echo(f"samples {summary.samples} (samples table version {summary.samples_version})")
    print_rows(
        "columns",
        [
            {"column": name, "type": kind, "non-null": summary.coverage.get(name, "all")}
            for name, kind in summary.schema.items()
        ],
    )


def versions(
    table: str,
    last: Annotated[int, typer.Option(min=0, help="Show the newest N versions (0: all)")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List versions: what each did (operation, job parameters) and its tags."""
    from lance_io.versions import list_versions

    infos = list_versions(table, last=last or None, storage_options=_options(table))
    if as_json:
        emit_json([dataclasses.asdict(v) for v in infos])
        return
    print_rows(
        f"versions of {table}",
        [
            {
                "version": v.version,
                "time": v.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
                "operation": v.properties.get("lancetag.operation", OPERATION_NAMES.get(v.operation, v.operation)),
                "rows": v.rows,
                "job": v.properties.get("lancetag.job", ""),
                "tags": ",".join(v.tags),
            }
            for v in infos
        ],
    )


def tag(
    table: str,
    name: str,
    version: Annotated[int | None, typer.Option("--version", "-v", min=0, help="Version to tag (default: latest)")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Tag a version (default: the latest) so it can be read, trained on or restored by name."""
    from lance_io.versions import tag_version

    tagged = tag_version(table, name, version, storage_options=_options(table))
    emit_json({"tag": name, "version": tagged}) if as_json else typer.echo(f"{name} -> version {tagged}")


def diff(
    table: str,
    before: str,
    after: str,
    column: Annotated[
        str | None, typer.Option("--column", "-c", help="Also compare this label column (prefix: every answer column)")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Compare two versions (numbers or tags): rows added/removed; each answer column's distribution and changes."""
    from lance_io.diff import diff_versions
    from lance_io.samples import diff_samples, samples_exist

    result = diff_versions(table, before, after, column=column, storage_options=_options(table))
    samples = diff_samples(table, before, after, storage_options=_options(table)) if samples_exist(table, storage_options=_options(table)) else None
    if as_json:
        emit_json(result if samples is None else {**dataclasses.asdict(result), "samples": samples})
        return
    typer.echo(f"version {result.before} -> {result.after}: +{result.added} rows, -{result.removed} rows")
    if samples is not None:
        typer.echo(f"samples {samples.before} -> {samples.after}: +{samples.added} samples, -{samples.removed} samples")
    if len(result.columns) > 1:
        each = ", ".join(f"{c.column} {c.changed}" for c in result.columns)
        typer.echo(f"{column}: {result.changed} rows changed ({each})")
    elif result.columns:
        typer.echo(f"{column}: {result.changed} rows changed")
    for c in result.columns:
        keys = sorted(set(c.before) | set(c.after), key=lambda k: (k is None, str(k)))
        print_rows(c.column, [{"value": k, "before": c.before.get(k, 0), "after": c.after.get(k, 0)} for k in keys])
        if len(keys) < max(c.values_before, c.values_after):
            typer.echo(f"{c.column}: the {len(keys)} values most rows hold, of {c.values_before:,} before and "
                       f"{c.values_after:,} after")


def query(
    table: str,
    where: Annotated[str | None, typer.Option("--where", "-w", help="SQL predicate, e.g. \"label = 'Pool'\"")] = None,
    columns: Annotated[str | None, typer.Option("--columns", help="Comma-separated columns (default: all but bytes)")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Maximum rows")] = 20,
    version: VersionOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Print rows matching a SQL predicate."""
    from lance_io.inspect import query_table

    rows = query_table(
        table,
        where,
        columns=columns.split(",") if columns else None,
        limit=limit,
        version=version,
        storage_options=_options(table),
    ).to_pylist()
    emit_json(rows) if as_json else print_rows(f"{len(rows)} rows", rows)


def restore(table: str, version: str, as_json: JsonFlag = False) -> None:
    """Make an old version (number or tag) the latest again, as a new version."""
    from lance_io.versions import restore_version

    new = restore_version(table, version, storage_options=_options(table))
    emit_json({"restored": version, "version": new}) if as_json else typer.echo(f"restored {version} as version {new}")


def register(app: typer.Typer) -> None:
    """Add the table commands to the CLI."""
    for command in (show, versions, tag, diff, query, restore):
        app.command()(command)

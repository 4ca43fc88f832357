"""`lancetag maintain`: index new rows, compact small fragments, drop old versions and orphan files."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from lance_io.reasons import ReasonError
from ray_jobs.cli.output import JsonFlag, emit_json

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str, flag: str) -> timedelta:
    """Return the duration ``30s``, ``15m``, ``1h``, ``7d``, ``2w`` (or ``0``) as a timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match or (not match.group(2) and float(match.group(1)) != 0):
        raise ReasonError("bad_duration", f"{flag} needs a duration like 30s, 15m, 1h, 7d or 2w, got {text!r}")
    return timedelta(**{_UNITS[match.group(2) or "s"]: float(match.group(1))})


def maintain(
    table: str,
    dataset_dir: Annotated[
        list[Path] | None,
        typer.Option("--dataset-dir", help="LLaMA-Factory dataset folder: versions its entries pin are kept (repeat)"),
    ] = None,
    lineage: Annotated[
        list[Path] | None,
        typer.Option("--lineage", help="Training lineage file or output folder: versions it names are kept (repeat)"),
    ] = None,
    retain_versions: Annotated[int, typer.Option(help="Always keep the last N versions")] = 10,
    older_than: Annotated[str, typer.Option(help="Remove only versions older than this (30s, 15m, 1h, 7d)")] = "1d",
    orphan_age: Annotated[
        str, typer.Option(help="Remove unreferenced data files only when older than this (a running writer's are younger)")
    ] = "1h",
    compact: Annotated[bool, typer.Option(help="Merge fragments smaller than the table's fragment size")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Keep a table lean: drop repeated ids, index new rows, compact small fragments, remove old versions and orphans.

    Tagged versions, versions pinned by registered datasets (--dataset-dir) and versions named
    in training lineage (--lineage) are never removed. Safe while ingest and labeling run.
    """
    from lance_io.maintenance import maintain_table
    from lance_io.storage import resolve_storage_options

    report = maintain_table(
        table,
        retain_versions=retain_versions,
        older_than=parse_duration(older_than, "--older-than"),
        protect_lineage=lineage or [],
        dataset_dirs=dataset_dir or [],
        compact=compact,
        orphan_age=parse_duration(orphan_age, "--orphan-age"),
        storage_options=resolve_storage_options(table),
    )
    if as_json:
        emit_json(report.as_dict())
        return
    r = report
    typer.echo(f"{r.table}: version {r.version_before} -> {r.version_after} in {r.seconds:.1f} s")
    if r.duplicate_rows_removed:
        typer.echo(f"duplicates: {r.duplicate_rows_removed} later copies of an id removed (the first stays)")
    typer.echo(
        f"index: {'folded ' + str(r.unindexed_rows_before) + ' new rows in' if r.index_optimized else 'up to date'}"
    )
    typer.echo(
        f"compaction: {r.fragments_compacted} fragments ({r.files_compacted} files) -> {r.fragments_written}; "
        f"fragments {r.fragments_before} -> {r.fragments_after}"
        + (f"; {r.compaction_conflicts} tasks left for next time (concurrent writes)" if r.compaction_conflicts else "")
    )
    typer.echo(f"versions: {r.versions_removed} removed, {r.versions_kept} kept")
    for version, why in sorted(r.protected.items()):
        typer.echo(f"  kept {version}: {'; '.join(why)}")
    typer.echo(
        f"orphan files: {r.orphan_files_removed} removed"
        + (f", {r.orphan_files_too_young} younger than {orphan_age} kept" if r.orphan_files_too_young else "")
    )
    typer.echo(f"freed {r.bytes_freed:,} bytes")
    for warning in r.warnings:
        typer.echo(f"warning: {warning}")


def register(app: typer.Typer) -> None:
    """Add the maintain command to the CLI."""
    app.command()(maintain)

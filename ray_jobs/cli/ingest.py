"""`lancetag ingest SOURCE... --table URI`: images from folders, URL lists, manifests, datasets, into a table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ray_jobs.cli.output import emit_json, key_values, print_rows


def ingest(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="[KIND:]LOCATION, KIND among folder, file, url, urls, manifest, parquet, lance, hf, modelscope, "
            "sharegpt (detected when omitted)",
            show_default=False,
        ),
    ],
    table: Annotated[str, typer.Option("--table", help="Lance table URI (created if missing)")],
    label_from_dir: Annotated[
        bool, typer.Option(help="Folders: the parent directory name becomes `truth`")
    ] = False,
    max_pixels: Annotated[int, typer.Option(help="Refuse images declaring more pixels")] = 178_956_970,
    max_bytes: Annotated[int, typer.Option(help="Refuse files or URL bodies larger than this")] = 64
    * 1024**2,
    allow_private_urls: Annotated[
        bool, typer.Option(help="Fetch private, loopback and link-local addresses (refused by default: SSRF)")
    ] = False,
    manifest_root: Annotated[
        Path | None,
        typer.Option(help="Relative manifest paths resolve here (default: the manifest's folder)"),
    ] = None,
    allow_outside_root: Annotated[
        bool, typer.Option(help="Let manifest paths and folder symlinks lead outside their root")
    ] = False,
    column: Annotated[
        list[str] | None,
        typer.Option(
            "--column", help="Manifest column mapping ROLE=COLUMN (roles: path, url, image, truth, messages)"
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(help="Build sharegpt messages: the user turn, e.g. '<image>Describe the image.'"),
    ] = None,
    answer_column: Annotated[
        str | None, typer.Option(help="Column holding the assistant turn for --prompt (truth, caption, ...)")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Existing Ray cluster (default: start a local one)")
    ] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray cluster (default: all)")] = None,
    commit_rows: Annotated[int, typer.Option(help="Commit (one version) when N new rows wait")] = 100_000,
    commit_seconds: Annotated[float, typer.Option(help="Commit when the oldest waiting rows are this old")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts")] = False,
) -> None:
    """Ingest images into a Lance table: every input ends added, duplicate, error or skipped."""
    from lance_io.storage import resolve_storage_options
    from ray_jobs.ingest import IngestOptions
    from ray_jobs.ingest import ingest as run_ingest

    options = IngestOptions(
        label_from_dir=label_from_dir,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        allow_private_urls=allow_private_urls,
        manifest_root=manifest_root,
        allow_outside_root=allow_outside_root,
        columns=key_values(column, "--column", "ROLE=COLUMN"),
        prompt=prompt,
        answer_column=answer_column,
        address=address,
        num_cpus=num_cpus,
        commit_rows=commit_rows,
        commit_seconds=commit_seconds,
        progress=not as_json,
    )
    summary = run_ingest(sources, table, options, storage_options=resolve_storage_options(table))
    if as_json:
        emit_json(summary.to_json())
        return
    typer.echo(
        f"{summary.inputs} inputs: {summary.added} added, {summary.duplicates} duplicates, "
        f"{summary.errors} errors, {summary.skipped} skipped -> {table} version {summary.version} "
        f"({summary.seconds:.1f} s, {summary.to_json()['images_per_s']} images/s)"
    )
    if summary.truths_added:
        typer.echo(f"{summary.truths_added} images the table held without a truth got the one given here")
    if len(summary.nodes) > 1:
        print_rows("items read and checked per Ray node", [{"node": n, "items": c} for n, c in summary.nodes.items()])
    if summary.errors_by_reason:
        print_rows(
            "errors by reason (details: the errors table next to the table)",
            [{"reason": r, "inputs": n} for r, n in summary.errors_by_reason.items()],
        )


def register(app: typer.Typer) -> None:
    """Add the ingest command to the CLI."""
    app.command()(ingest)

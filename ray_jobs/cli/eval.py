"""`lancetag eval`: accuracy, per-class P/R/F1, confusion, coverage, calibration, cost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ray_jobs.cli.output import emit_json, print_rows


def eval_command(
    table: Annotated[str, typer.Argument(help="Lance table URI")],
    column: Annotated[str, typer.Option(help="Label column (or prefix of attribute columns)")] = "label",
    truth: Annotated[str, typer.Option(help="Ground-truth column (or prefix)")] = "truth",
    version: Annotated[str | None, typer.Option(help="Version number or tag (default: latest)")] = None,
    where: Annotated[str | None, typer.Option(help="SQL predicate, e.g. the held-out split")] = None,
    report: Annotated[Path | None, typer.Option(help="Folder for report.html, confusion.png, metrics.json")] = None,
    price_per_hour: Annotated[float, typer.Option(min=0, help="Hourly price of the labeling machine, $")] = 0.10,
    baseline_train: Annotated[
        str | None, typer.Option(help="SQL filter of rows to fit classical pixel baselines on, e.g. \"split = 'train'\"")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON")] = False,
) -> None:
    """Evaluate a label column against ground truth at a table version (generated text: its faithfulness)."""
    from lance_io.storage import resolve_storage_options
    from ray_jobs.evaluation import evaluate_table
    from ray_jobs.evaluation.baselines import describe_verdict

    if _generated(table, column, version):
        _faithfulness(table, column, version, where, as_json)
        return
    result = evaluate_table(
        table, column, truth, version=version, where=where, report_dir=report, price_per_hour=price_per_hour,
        storage_options=resolve_storage_options(table), baseline_train=baseline_train,
    )
    if as_json:
        emit_json(
            {
                "accuracy": result.accuracy, "version": result.version, "report": result.report,
                "images_per_second": result.images_per_second, "cost_per_1000": result.cost_per_1000,
                "evaluations": result.evaluations, "lineage": result.lineage,
                "baselines": result.baselines, "training": result.training,
            }
        )
        return
    print_rows(
        f"{table} @ {result.version}: {column} vs {truth}",
        [
            {"column": name, "accuracy": f"{e.accuracy:.3f}", "macro F1": f"{e.macro_f1:.3f}", "coverage": f"{e.coverage:.3f}",
             "invalid": e.invalid, "ECE": "n/a" if e.calibration_error is None else f"{e.calibration_error:.3f}"}
            for name, e in result.evaluations.items()
        ]
        + [
            {"column": f"{name}: {b.name}", "accuracy": f"{b.accuracy:.3f}"}
            for name, found in result.baselines.items()
            for b in found
        ],
    )
    for name, e in result.evaluations.items():
        for note in e.notes:
            typer.echo(f"{name}: {note}")
    for name, found in result.baselines.items():
        for b in found:
            typer.echo(f"{name} against {b.name}: {describe_verdict(b)}")
    if result.cost_per_1000 is not None:
        typer.echo(f"{result.images_per_second:.1f} images/s -> ${result.cost_per_1000:.4f} per 1,000 images at ${price_per_hour}/h")
    if result.report:
        typer.echo(f"report: {result.report}")


def _generated(table: str, column: str, version: str | None) -> bool:
    """Return whether ``column`` holds text a generate task wrote (no truth to compare: faithfulness instead)."""
    from lance_io import open_table
    from lance_io.labels import kind_of
    from lance_io.storage import resolve_storage_options

    return kind_of(open_table(table, version, storage_options=resolve_storage_options(table)).schema, column) == "generate"


def _faithfulness(table: str, column: str, version: str | None, where: str | None, as_json: bool) -> None:
    """Print the share of generated texts that mention every given attribute value, and the values omitted."""
    from lance_io.storage import resolve_storage_options
    from ray_jobs.evaluation.faithfulness import table_faithfulness

    report = table_faithfulness(table, column, version=version, where=where, storage_options=resolve_storage_options(table))
    if as_json:
        emit_json({"faithfulness": report.as_dict()})
        return
    rate = "n/a" if report.rate is None else f"{report.rate:.3f}"
    print_rows(
        f"{table}: {column} mentions every given attribute",
        [{"column": column, "checked": report.checked, "unfaithful": report.unfaithful, "faithful rate": rate}],
    )
    if report.omitted:
        typer.echo("omitted most: " + ", ".join(f"{v} ({n})" for v, n in list(report.omitted.items())[:10]))


def register(app: typer.Typer) -> None:
    """Add the eval command to the CLI."""
    app.command("eval")(eval_command)

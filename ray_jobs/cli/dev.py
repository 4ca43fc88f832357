"""`lancetag dev`: developer tools (tiny offline models for tests and cluster smoke tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

dev_app = typer.Typer(
    help="Developer tools: tiny offline models for tests and cluster smoke tests.", no_args_is_help=True
)


@dev_app.command("tiny-model")
def tiny_model(
    arch: Annotated[str, typer.Option(help="qwen2_vl or llava_next")],
    out: Annotated[Path, typer.Option(help="Folder to write the model to")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights")] = 0,
) -> None:
    """Build a tiny randomly initialised VLM folder, loadable with from_pretrained(path)."""
    from lance_io.reasons import ReasonError
    from serve_apps.tiny_models import ARCHS, build_tiny_model

    if arch not in ARCHS:
        raise ReasonError("bad_option", f"--arch {arch!r} is not one of {', '.join(ARCHS)}")
    path = build_tiny_model(arch, out, seed=seed)  # type: ignore[arg-type]
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add the dev group to the CLI."""
    app.add_typer(dev_app, name="dev")

"""`lancetag serve`: start the labeler (a Ray Serve app) for a task and a model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ray_jobs.cli.output import emit_json


def serve_command(
    task: Annotated[str, typer.Option(help="Task name (configs/tasks/<name>.yaml) or path to a task YAML")],
    model: Annotated[str, typer.Option(help="Model folder or hub id (openai: the served model name)")],
    backend: Annotated[str, typer.Option(help="transformers, vllm or openai")] = "transformers",
    lora: Annotated[Path | None, typer.Option(help="LoRA adapter folder")] = None,
    host: Annotated[
        str, typer.Option(help="HTTP bind address (0.0.0.0 exposes it to the network)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    token_env: Annotated[
        str | None, typer.Option(help="Env var holding a bearer token clients must send (unset: no auth)")
    ] = None,
    replicas: Annotated[int, typer.Option(help="Number of replicas")] = 1,
    gpus: Annotated[float, typer.Option(help="GPUs per replica")] = 0.0,
    resource: Annotated[
        list[str] | None, typer.Option(help="NAME=AMOUNT: a custom resource each replica needs, e.g. accel_a=1 (repeatable)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call (dynamic batching)")] = 32,
    base_url: Annotated[
        str | None, typer.Option(help="openai backend: endpoint, e.g. http://host:8001/v1")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="openai backend: env var holding the API key")
    ] = None,
    python: Annotated[
        Path | None,
        typer.Option(
            help="Interpreter of the replicas (default for vllm: .venv-vllm/bin/python when present)"
        ),
    ] = None,
    chat_task: Annotated[
        list[str] | None, typer.Option(help="Another task the chat route may choose (repeatable)")
    ] = None,
    chat_table: Annotated[
        list[str] | None, typer.Option(help="NAME=URI: a table whose rows chat may name, stored labels first (repeatable)")
    ] = None,
    chat_column: Annotated[
        list[str] | None, typer.Option(help="TASK=PREFIX: the columns a task's labels are in, for --chat-table (repeatable)")
    ] = None,
    app_name: Annotated[str, typer.Option(help="Serve application name")] = "lancetag-labeler",
    blocking: Annotated[bool, typer.Option(help="Keep serving until Ctrl-C")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary")] = False,
) -> None:
    """Serve a labeling task over HTTP (POST /label, GET /health, GET /info, POST /v1/chat/completions)."""
    from lance_io.tasks import load_task
    from ray_jobs.chat_rows import read_row
    from ray_jobs.ray_session import require_ray_at
    from serve_apps.app import ChatTable, LabelerConfig, run_labeler
    from serve_apps.backends.base import BackendConfig

    if python is None and backend == "vllm":
        candidate = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
        python = candidate if candidate.exists() else None
    runtime_env = {"py_executable": str(python)} if python else None
    for name in [task, *(chat_task or [])]:
        load_task(name)  # fail here, with the field named, before Ray starts
    columns = _pairs(chat_column, "--chat-column", "TASK=PREFIX")
    tables = {name: ChatTable(uri=uri, columns=columns) for name, uri in _pairs(chat_table, "--chat-table", "NAME=URI").items()}
    config = LabelerConfig(
        task=task,
        backend=BackendConfig(
            kind=backend,
            model=model,
            adapter=str(lora) if lora else None,
            batch_size=batch_size,
            base_url=base_url,
            api_key_env=api_key_env,
        ),
        app_name=app_name,
        host=host,
        port=port,
        token_env=token_env,
        num_replicas=replicas,
        num_gpus=gpus,
        resources=_resources(resource),
        max_batch_size=batch_size,
        runtime_env=runtime_env,
        chat_tasks=chat_task or [],
        chat_tables=tables,
    )
    summary = {"url": None, "app": app_name, "task": task, "model": model, "backend": backend}

    def announce(url: str) -> None:
        summary["url"] = url
        emit_json(summary) if as_json else typer.echo(f"labeler for task {task!r} serving at {url}")

    if os.environ.get("RAY_ADDRESS"):  # ray.init would wait for ever on a cluster that is down
        require_ray_at(os.environ["RAY_ADDRESS"])
    url = run_labeler(config, blocking=False, row_reader=read_row if tables else None)
    announce(url)
    if blocking:
        import time

        from serve_apps.app import stop_labeler

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            stop_labeler(app_name)


def _resources(values: list[str] | None) -> dict[str, float]:
    """Return NAME -> amount of repeated ``--resource NAME=AMOUNT`` options."""
    from lance_io.reasons import ReasonError

    out = {}
    for name, amount in _pairs(values, "--resource", "NAME=AMOUNT").items():
        try:
            out[name] = float(amount)
        except ValueError:
            raise ReasonError("bad_option", f"--resource {name}={amount}: the amount is a number") from None
    return out


def _pairs(values: list[str] | None, option: str, shape: str) -> dict[str, str]:
    """Return KEY -> VALUE of repeated ``KEY=VALUE`` options; a malformed one is a ReasonError naming the option."""
    from lance_io.reasons import ReasonError

    out = {}
    for value in values or []:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise ReasonError("bad_option", f"{option} {value!r}: expected {shape}")
        out[key] = rest
    return out


def register(app: typer.Typer) -> None:
    """Add the serve command to the CLI."""
    app.command("serve")(serve_command)

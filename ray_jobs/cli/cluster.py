"""`lancetag submit` and `lancetag jobs`: run commands as Ray Jobs on a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ray_jobs.cli.errors import EXIT_PARTIAL
from ray_jobs.cli.output import emit_json

jobs_app = typer.Typer(help="Status, logs and stop of submitted jobs.", no_args_is_help=True)
AddressOpt = Annotated[str, typer.Option(envvar="RAY_JOBS_ADDRESS", help="Ray dashboard address, http://HEAD:8265")]


def submit_command(
    ctx: typer.Context,
    address: AddressOpt,
    runtime_env: Annotated[Path | None, typer.Option(help="Runtime env YAML/JSON (default: ship this checkout)")] = None,
    env: Annotated[list[str] | None, typer.Option(help="Pass this environment variable (name only; repeatable)")] = None,
    wait: Annotated[bool, typer.Option(help="Stream the logs and exit with the job's status")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print {job_id, status} as JSON")] = False,
) -> None:
    """Submit `lancetag <command> ...` (everything after --) as a Ray Job."""
    from ray_jobs.cluster.submit import follow_logs, job_status, load_runtime_env, submit_job

    job_id = submit_job(address, list(ctx.args), runtime_env=load_runtime_env(runtime_env), env=env)
    status = "PENDING"
    if wait:
        for chunk in follow_logs(address, job_id):
            typer.echo(chunk, nl=False, err=as_json)
        status = job_status(address, job_id)
    if as_json:
        emit_json({"job_id": job_id, "status": status})
    else:
        typer.echo(f"job {job_id} {status}")
    if wait and status != "SUCCEEDED":
        raise typer.Exit(EXIT_PARTIAL)


@jobs_app.command("status")
def status_command(job_id: str, address: AddressOpt) -> None:
    """Print a job's status."""
    from ray_jobs.cluster.submit import job_status

    typer.echo(job_status(address, job_id))


@jobs_app.command("logs")
def logs_command(
    job_id: str, address: AddressOpt, follow: Annotated[bool, typer.Option(help="Follow until the job ends")] = False
) -> None:
    """Print a job's logs."""
    from ray_jobs.cluster.submit import follow_logs, job_logs

    if follow:
        for chunk in follow_logs(address, job_id):
            typer.echo(chunk, nl=False)
    else:
        typer.echo(job_logs(address, job_id), nl=False)


@jobs_app.command("stop")
def stop_command(job_id: str, address: AddressOpt) -> None:
    """Stop a running job."""
    from ray_jobs.cluster.submit import stop_job

    typer.echo("stopped" if stop_job(address, job_id) else "not running")


def register(app: typer.Typer) -> None:
    """Add `submit` and `jobs` to the CLI."""
    app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(submit_command)
    app.add_typer(jobs_app, name="jobs")

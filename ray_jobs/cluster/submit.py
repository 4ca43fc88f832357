"""Run any lancetag command as a Ray Job on a cluster: the local default becomes a cluster run.

The project code and configs travel in the job's ``runtime_env`` (``working_dir``), or the
cluster image already has lancetag installed (the Docker images in ``docker/``). Environment
variables named with ``env`` (storage credentials) are passed by name: their values go into the
runtime env, never into logs or the printed summary.

Example::

    job_id = submit_job("http://head:8265", ["label", "s3://bucket/t.lance", "--task", "hotel",
                         "--model", "Qwen/Qwen2-VL-2B-Instruct"], env=["AWS_SECRET_ACCESS_KEY"])
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from lance_io.reasons import ReasonError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
EXCLUDES = [".git", ".venv", ".venv-vllm", ".cache", "**/__pycache__", "bench/out", "lancetag-work", "*.lance"]


def load_runtime_env(path: str | Path | None) -> dict[str, Any]:
    """Return the runtime env in ``path`` (YAML or JSON), or ship this checkout as working_dir."""
    if path is None:
        return {"working_dir": str(REPO_ROOT), "excludes": EXCLUDES}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a runtime env is a mapping (working_dir, env_vars, pip, image_uri, ...)")
    return data


def _client(address: str) -> Any:
    """Return a job client of the cluster whose dashboard is at ``address``; ``ray_unreachable`` if none answers."""
    from ray.job_submission import JobSubmissionClient

    from ray_jobs.ray_session import require_ray_at

    if os.environ.get("RAY_ADDRESS") and not os.environ.get("RAY_API_SERVER_ADDRESS"):
        require_ray_at(os.environ["RAY_ADDRESS"])  # Ray's job client asks the cluster there first, whatever ``address`` says
    try:
        return JobSubmissionClient(address)
    except ConnectionError as exc:
        raise ReasonError(
            "ray_unreachable",
            f"no Ray cluster's job server answers at {address} ({exc}): start the cluster, or correct "
            "RAY_JOBS_ADDRESS (or --address: the head's dashboard, http://HEAD:8265)",
        ) from None


def job_entrypoint(args: list[str]) -> str:
    """Return the shell entrypoint that runs ``lancetag <args>`` on the cluster."""
    if not args:
        raise ValueError("give the lancetag command to run after --, e.g. -- label TABLE --task hotel")
    return shlex.join(["python", "-m", "ray_jobs.cli", *args])


def submit_job(
    address: str,
    args: list[str],
    *,
    runtime_env: dict[str, Any] | None = None,
    env: list[str] | None = None,
    entrypoint_num_cpus: float | None = None,
) -> str:
    """Submit ``lancetag <args>`` to the Ray cluster at ``address``; return the job id."""
    runtime_env = dict(runtime_env if runtime_env is not None else load_runtime_env(None))
    env_vars = dict(runtime_env.get("env_vars") or {})
    missing = [name for name in env or [] if name not in os.environ]
    if missing:
        raise ValueError(f"environment variables not set here: {', '.join(missing)}")
    env_vars.update({name: os.environ[name] for name in env or []})
    env_vars.setdefault("RAY_ADDRESS", "auto")  # the job's own driver joins the cluster it runs on
    runtime_env["env_vars"] = env_vars
    client = _client(address)
    return client.submit_job(
        entrypoint=job_entrypoint(args),
        runtime_env=runtime_env,
        metadata={"lancetag.command": args[0], "lancetag.env": json.dumps(sorted(env or []))},
        entrypoint_num_cpus=entrypoint_num_cpus,
    )


def job_status(address: str, job_id: str) -> str:
    """Return the job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    return str(_client(address).get_job_status(job_id).value)


def job_logs(address: str, job_id: str) -> str:
    """Return the job's logs so far."""
    return _client(address).get_job_logs(job_id)


def follow_logs(address: str, job_id: str) -> Iterator[str]:
    """Yield the job's log output as it is written, until the job ends."""
    import asyncio

    client = _client(address)
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id).__aiter__()
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop_job(address: str, job_id: str) -> bool:
    """Ask the cluster to stop the job; return whether it was running."""
    return bool(_client(address).stop_job(job_id))

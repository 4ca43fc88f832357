"""The ``openai`` backend: any OpenAI-compatible chat endpoint (vLLM's server, SageMaker/DJL LMI, hosted APIs).

Each image and question becomes one ``/chat/completions`` request with the image as a base64
``data:`` URL part, sent concurrently (``options.concurrency``, default 8) with a timeout and
tenacity retries on transient errors only (connection errors, timeouts, 429, 5xx). The answer
text must state one of the allowed answers (case, spaces and a final period aside); anything
else is recorded as ``invalid_answer`` with the raw text, never coerced. With ``logprobs`` the
confidence is the probability of the generated answer; the endpoint does not score the whole
set, so ``probabilities`` stays null.

Options: ``concurrency``; ``choice_constraint``: ``"structured_outputs"`` (vLLM >= 0.10) or
``"guided_choice"`` (older vLLM) to constrain decoding to the allowed answers server-side;
``extra_body``: a dict merged into every request.

Example::

    config = BackendConfig(kind="openai", model="hotel-llava", base_url="http://127.0.0.1:8001/v1",
                           api_key_env="LABELER_API_KEY")
    create_backend(config).label([jpeg_bytes], load_task("hotel"))
"""

from __future__ import annotations

import base64
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from lance_io.image_size import WIDE_GREY_MODES, model_image
from lance_io.reasons import first_problem
from lance_io.tasks import Question, Task
from serve_apps.backends.base import (
    Backend,
    BackendConfig,
    ChatMessage,
    ChatReply,
    ImageError,
    decode_image,
    register_backend,
)
from serve_apps.results import Answer, ErrorCode, LabelResult, assemble, error_result

_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


class EndpointError(Exception):
    """A failed request: the result code to record, the message, whether a retry may help, and the
    HTTP status of a refusal (4xx; None otherwise)."""

    def __init__(self, code: ErrorCode, message: str, *, transient: bool, refused_with: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.transient = transient
        self.refused_with = refused_with


class _TokenLogprob(BaseModel):
    logprob: float = Field(allow_inf_nan=False)


class _Logprobs(BaseModel):
    content: list[_TokenLogprob] | None = None


class _TextPart(BaseModel):
    type: str
    text: str = ""


class _Message(BaseModel):
    content: str | list[_TextPart] | None = None

    def text(self) -> str:
        """The answer's text: the string, or the text parts of a list of content parts joined."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if part.type == "text")
        return self.content or ""


class _Choice(BaseModel):
    message: _Message
    logprobs: _Logprobs | None = None
    finish_reason: str | None = None


class _Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Completion(BaseModel):
    """The part of a ``/chat/completions`` reply the backend reads (other fields are ignored)."""

    choices: list[_Choice] = Field(min_length=1)
    usage: _Usage | None = None


def read_completion(response: httpx.Response) -> Completion:
    """Parse a ``/chat/completions`` reply; raise ValueError saying what is wrong when it is not one."""
    try:
        return Completion.model_validate_json(response.content)
    except ValidationError as exc:
        raise ValueError(
            f"answered what is not a chat completion ({first_problem(exc, 'the body')}): {response.text[:200]}"
        ) from None


def data_url(data: bytes) -> str:
    """Return the image as a data: URL, re-encoded as PNG (as the model sees it) only when the endpoint may not
    read its format, or would clip its grey of more than 8 bits (:data:`~lance_io.image_size.WIDE_GREY_MODES`)."""
    import io

    with Image.open(io.BytesIO(data)) as image:
        mime = _MIME.get(image.format or "")
        if mime is None or image.mode in WIDE_GREY_MODES:
            buffer = io.BytesIO()
            model_image(image).save(buffer, "PNG")  # upright and over white, as the endpoint shows the others
            data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@register_backend("openai")
class OpenAIBackend(Backend):
    """Labels through a remote OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        if not config.base_url:
            raise ValueError("base_url: the openai backend needs the endpoint, e.g. http://127.0.0.1:8001/v1")
        headers = {}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise ValueError(
                    f"api_key_env: environment variable {config.api_key_env} is not set or empty"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.base_url = config.base_url.rstrip("/")
        self.http = httpx.Client(timeout=config.timeout_s, headers=headers)
        self.concurrency = int(config.options.get("concurrency", 8))
        self.constraint = config.options.get("choice_constraint")
        self.extra_body = dict(config.options.get("extra_body", {}))
        self.use_logprobs = config.logprobs

    # ----------------------------------------------------------------- public interface

    def label(self, images: list[bytes], task: Task) -> list[LabelResult]:
        """Return one record per image, in order; failed requests and bad answers become error records."""
        provenance = self.provenance(task)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            outcomes = list(pool.map(lambda b: self._label_one(b, task), images))
        per_image_ms = (time.perf_counter() - started) * 1000 / max(len(images), 1)
        out = []
        for outcome in outcomes:
            if isinstance(outcome, ImageError):
                out.append(error_result(task, provenance, outcome.code, outcome.message))
            elif isinstance(outcome, EndpointError):
                out.append(error_result(task, provenance, outcome.code, str(outcome)))
            else:
                out.append(assemble(task, outcome, provenance, per_image_ms))
        return out

    def info(self) -> dict[str, Any]:
        """Return backend, endpoint, served model name and library versions (never the API key)."""
        return {
            "backend": self.name,
            "model": self.config.model,
            "adapter": self.config.adapter,
            "base_url": self.base_url,
            "logprobs": self.use_logprobs,
            "choice_constraint": self.constraint,
            "versions": {"httpx": httpx.__version__},
        }

    def chat(self, messages: list[ChatMessage], *, max_tokens: int = 256) -> ChatReply:
        """Return the endpoint's answer to a conversation (images sent as PNG data: URLs)."""
        import io

        wire = []
        for m in messages:
            content: list[dict[str, Any]] = []
            for part in m.parts:
                if isinstance(part, Image.Image):
                    buffer = io.BytesIO()
                    part.save(buffer, "PNG")
                    content.append({"type": "image_url", "image_url": {"url": data_url(buffer.getvalue())}})
                else:
                    content.append({"type": "text", "text": str(part)})
            wire.append({"role": m.role, "content": content})
        reply = self._post(self._request_body(wire, max_tokens, choices=None, logprobs=False))
        usage, choice = reply.usage or _Usage(), reply.choices[0]
        return ChatReply(
            text=choice.message.text(),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            finish_reason=choice.finish_reason or "stop",
        )

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    # ----------------------------------------------------------------- internals

    def _label_one(self, data: bytes, task: Task) -> dict[str, Answer] | ImageError | EndpointError:
        image = decode_image(data, max_pixels=self.config.max_image_pixels)
        if isinstance(image, ImageError):
            return image
        url = data_url(data)
        answers = {}
        for question in task.questions():
            try:
                answers[question.key] = self._ask(url, question)
            except EndpointError as exc:
                return exc
        return answers

    def _request_body(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int,
        *,
        choices: tuple[str, ...] | None,
        logprobs: bool,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.config.model, "messages": messages, "max_tokens": max_tokens}
        body["temperature"] = 0.0
        if logprobs:
            body["logprobs"] = True
        if choices and self.constraint == "structured_outputs":
            body["structured_outputs"] = {"choice": list(choices)}
        elif choices and self.constraint == "guided_choice":
            body["guided_choice"] = list(choices)
        return {**body, **self.extra_body}

    def _ask(self, image_url: str, question: Question) -> Answer:
        messages: list[dict[str, Any]] = []
        if question.system:
            messages.append({"role": "system", "content": question.system})
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": question.prompt},
                ],
            }
        )
        logprobs = self.use_logprobs and question.closed
        body = self._request_body(messages, question.max_tokens, choices=question.choices, logprobs=logprobs)
        try:
            reply = self._post(body)
        except EndpointError as exc:
            if not (logprobs and exc.refused_with and "logprobs" in str(exc).lower()):
                raise
            self.use_logprobs = False  # this endpoint refuses logprobs: stop asking
            body.pop("logprobs", None)
            reply = self._post(body)
        choice = reply.choices[0]
        text = choice.message.text().strip()
        value = question.match(text)
        tokens = (choice.logprobs.content if choice.logprobs else None) or []
        confidence = None
        if value is not None and tokens:  # a log-probability above 0 is rounding: at most certainty
            confidence = math.exp(min(0.0, sum(t.logprob for t in tokens)))
        return Answer(value=value, raw_text=text, confidence=confidence)

    def _post(self, body: dict[str, Any]) -> Completion:
        """POST to /chat/completions with retries on transient failures; raise EndpointError otherwise."""
        attempt = retry(
            retry=retry_if_exception(lambda e: isinstance(e, EndpointError) and e.transient),
            wait=wait_exponential(multiplier=0.2, max=5),
            stop=stop_after_attempt(self.config.retries + 1),
            reraise=True,
        )(self._post_once)
        return attempt(body)

    def _post_once(self, body: dict[str, Any]) -> Completion:
        where = f"{self.base_url}/chat/completions"
        try:
            response = self.http.post(where, json=body)
        except httpx.TimeoutException:
            raise EndpointError(
                ErrorCode.TIMEOUT,
                f"timeout: {where} gave no answer in {self.config.timeout_s}s",
                transient=True,
            ) from None
        except httpx.TransportError as exc:
            raise EndpointError(
                ErrorCode.UNAVAILABLE,
                f"unavailable: cannot reach {where}: {type(exc).__name__}",
                transient=True,
            ) from None
        if response.status_code == 429 or response.status_code >= 500:
            raise EndpointError(
                ErrorCode.UNAVAILABLE,
                f"unavailable: {where} answered {response.status_code}: {response.text[:200]}",
                transient=True,
            )
        if response.is_redirect:  # a POST must not be replayed elsewhere (httpx would turn it into a GET)
            raise EndpointError(
                ErrorCode.BACKEND_FAILED,
                f"backend_failed: {where} redirects ({response.status_code}) to "
                f"{response.headers.get('location', 'no location')}: give the endpoint's final URL as base_url",
                transient=False,
            )
        if response.status_code >= 400 or response.status_code < 200:
            raise EndpointError(
                ErrorCode.BACKEND_FAILED,
                f"backend_failed: {where} refused the request ({response.status_code}): {response.text[:300]}",
                transient=False,
                refused_with=response.status_code,
            )
        try:
            return read_completion(response)
        except ValueError as exc:
            raise EndpointError(ErrorCode.BACKEND_FAILED, f"backend_failed: {where} {exc}", transient=False) from None

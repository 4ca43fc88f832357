"""A conversation about an image: route each question to one of the deployment's tasks, or answer it freely.

As in conversation-guided vision-language processing, the model first classifies what the
user wants, then the chosen capability answers. Here the capabilities are the deployment's
tasks (classify, attributes, caption, score) plus free question answering (``question``),
and the choice is itself a closed-set task (:func:`route_task`): the model picks one of the
routes' names after reading their descriptions, so a route is always a real task, never a
name the model made up. The chosen task runs as ``/label`` would run it, and the reply carries
its answer in words plus, in the structured ``lancetag`` field, the route and the task's
result (label, confidence...).

The server keeps no state: an OpenAI client sends the whole conversation each turn, so earlier
turns and the image (the latest one sent) stay in context. Bounds (:class:`ChatBounds`) are
checked on the raw request before any image is decoded.

Example (the ``openai`` client; docs/conversation.md)::

    reply = client.chat.completions.create(model="lancetag", messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                     {"type": "text", "text": "Is this room a suite?"}]}])
    reply.choices[0].message.content, reply.model_extra["lancetag"]["route"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lance_io.tasks import ClassifyTask, GenerateTask, Task
from serve_apps.backends.base import ChatMessage

ROUTE_QUESTION = "question"
"""The route of free question answering: the model answers the conversation in its own words."""

QUESTION_DESCRIPTION = "any other question about the image, answered in free text"


class ChatRequestError(Exception):
    """A conversation the server refuses: the HTTP status and what to change."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class ChatBounds:
    """Limits of one conversation request, checked before anything is decoded."""

    max_messages: int = 24
    max_text_chars: int = 8000
    max_images: int = 4
    max_image_bytes: int = 20 * 1024 * 1024


def check_bounds(messages: Any, bounds: ChatBounds) -> None:
    """Raise ChatRequestError (413) when the conversation has too many turns, too long a text or too big an image."""
    if not isinstance(messages, list):
        return  # the parser says what is wrong with its shape
    if len(messages) > bounds.max_messages:
        raise ChatRequestError(
            413, f"too many messages: {len(messages)} > {bounds.max_messages}; start a new conversation"
        )
    images = 0
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for j, part in enumerate(parts if isinstance(parts, list) else []):
            if not isinstance(part, dict):
                continue
            where = f"messages[{i}].content[{j}]"
            text = part.get("text")
            if isinstance(text, str) and len(text) > bounds.max_text_chars:
                raise ChatRequestError(
                    413, f"{where}: {len(text)} characters exceeds {bounds.max_text_chars}; shorten the message"
                )
            url = image_url_of(part) if part.get("type") == "image_url" else None
            if isinstance(url, str):
                images += 1
                size = len(url.partition(",")[2]) * 3 // 4  # base64 -> bytes, before decoding it
                if size > bounds.max_image_bytes:
                    raise ChatRequestError(
                        413, f"{where}: image of about {size} bytes exceeds {bounds.max_image_bytes}; resize it"
                    )
    if images > bounds.max_images:
        raise ChatRequestError(413, f"{images} images exceed {bounds.max_images} per conversation")


def image_url_of(part: dict[str, Any]) -> Any:
    """Return the URL of an ``image_url`` part: ``{"image_url": {"url": U}}`` as OpenAI sends it, or
    ``{"image_url": U}`` as some clients do; anything else as it is, for the caller to refuse."""
    value = part.get("image_url")
    return value.get("url") if isinstance(value, dict) else value


def chat_routes(tasks: list[Task]) -> dict[str, Task | None]:
    """Return route name -> task (None for free question answering), in the deployment's order."""
    routes: dict[str, Task | None] = {}
    for task in tasks:
        if isinstance(task, GenerateTask):
            raise ValueError(f"chat_tasks: {task.name!r} generates text from table columns, not from an image")
        if task.name in routes or task.name == ROUTE_QUESTION:
            raise ValueError(f"chat_tasks: two routes named {task.name!r}; rename one task")
        routes[task.name] = task
    routes[ROUTE_QUESTION] = None
    return routes


def _spoken(text: str) -> str:
    """The user's words as literal prompt text (braces would read as placeholders)."""
    return " ".join(text.replace("{", "(").replace("}", ")").split())


def route_task(routes: dict[str, Task | None], question: str, earlier: list[str]) -> ClassifyTask:
    """Return the closed-set task whose answer is the route of ``question`` (after the ``earlier`` user turns)."""
    descriptions = {
        name: _spoken(task.description or f"{task.kind} task {name}") if task else QUESTION_DESCRIPTION
        for name, task in routes.items()
    }
    context = "".join(f'Earlier the user asked: "{_spoken(t)}"\n' for t in earlier[-2:])
    prompt = (
        f"{context}The user asks about this image: \"{_spoken(question)}\"\n"
        "Which capability answers it? Choose one of the capabilities:\n{{descriptions}}"
    )
    return ClassifyTask(
        name="route", labels=list(routes), descriptions=descriptions, prompt=prompt, answer_template="{label}"
    )


def user_texts(messages: list[ChatMessage]) -> list[str]:
    """Return the text of every user turn, in order."""
    return [" ".join(p for p in m.parts if isinstance(p, str)) for m in messages if m.role == "user"]


def latest_image(messages: list[ChatMessage]) -> Any | None:
    """Return the most recent image of the conversation (a PIL image), or None."""
    for message in reversed(messages):
        for part in reversed(message.parts):
            if not isinstance(part, str):
                return part
    return None


def answer_text(task: Task, result: dict[str, Any]) -> str:
    """Return a task's result record in words, for the assistant's reply."""
    if result.get("error"):
        return f"I could not answer with {task.name}: {result.get('error_message')}"
    confidence = result.get("confidence")
    sure = f" (confidence {confidence:.2f})" if isinstance(confidence, int | float) else ""
    if task.kind == "classify":
        return f"{task.name}: {result['label']}{sure}"
    if task.kind == "score":
        return f"{task.name}: {result['score']}{sure}"
    if task.kind == "attributes":
        listed = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in (result.get("attributes") or {}).items())
        return f"{task.name}: {listed}{sure}"
    return str(result.get("caption") or "")


def structured(route: str, route_result: dict[str, Any] | None, result: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """Return the ``lancetag`` field of a reply: the route, how sure the router was, and the task's result.

    ``route_confidence`` and ``route_probabilities`` are null when the client pinned the route;
    ``source`` says whether the result came from the ``model`` or from ``stored`` labels.
    """
    keep = (
        "label", "attributes", "caption", "score", "confidence", "probabilities", "error", "error_message",
        "task_hash", "provenance",
    )
    return {
        "route": route,
        "route_confidence": (route_result or {}).get("confidence"),
        "route_probabilities": (route_result or {}).get("probabilities"),
        "source": source,
        "result": {k: v for k, v in (result or {}).items() if k in keep and v is not None} if result else None,
    }


def check_options(payload: dict[str, Any]) -> None:
    """Raise ChatRequestError (400) for an OpenAI option the server would otherwise drop without a word.

    Their defaults pass (clients send ``n: 1``, ``logprobs: false``, ``tools: []``,
    ``response_format: {"type": "text"}``). Sampling options (``temperature``, ``top_p``, ``seed``...)
    are accepted and do not apply: answers are greedy, the same every time.
    """
    unsupported = []
    if payload.get("n") not in (None, 1):
        unsupported.append("n (one answer per request)")
    if payload.get("logprobs") or payload.get("top_logprobs"):
        unsupported.append("logprobs (a closed-set answer's probabilities are in the lancetag field)")
    if payload.get("tools") or payload.get("functions") or payload.get("tool_choice") not in (None, "none", "auto"):
        unsupported.append("tools")
    if (payload.get("response_format") or {"type": "text"}) != {"type": "text"}:
        unsupported.append("response_format")
    if unsupported:
        raise ChatRequestError(400, f"not supported by this server: {'; '.join(unsupported)}")
    stop = payload.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise ChatRequestError(400, "stop must be a string or a list of strings")


def apply_stop(text: str, finish_reason: str, stop: str | list[str] | None) -> tuple[str, str]:
    """Return ``text`` cut before the first of the ``stop`` strings (finish reason ``stop`` then), as OpenAI does."""
    cuts = [text.find(s) for s in ([stop] if isinstance(stop, str) else stop or []) if s and s in text]
    return (text[: min(cuts)], "stop") if cuts else (text, finish_reason)


def sse_events(completion: dict[str, Any], include_usage: bool) -> str:
    """Return a whole completion as the server-sent events of ``stream: true`` (one content chunk, then ``[DONE]``)."""
    import json

    choice = completion["choices"][0]
    head = {k: completion[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    chunks = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": choice["message"]["content"]},
                              "finish_reason": None}], "lancetag": completion.get("lancetag")},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]},
    ]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": completion["usage"]})
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"

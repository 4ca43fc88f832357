"""Parsing and checking of labeler HTTP requests, before anything reaches the model.

Every refusal is a :class:`RequestError` with the HTTP status and a message saying what to
change; nothing here is unpickled or trusted beyond its declared shape.
"""

import base64
import binascii
import json
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from serve_apps.backends.base import ChatMessage, decode_image
from serve_apps.chat import image_url_of

MiB = 1024 * 1024


@dataclass
class RequestError(Exception):
    """A request the labeler refuses: the HTTP status and a message saying what to change."""

    status: int
    message: str


@dataclass
class Limits:
    """Request limits, checked before anything reaches the model."""

    max_images: int = 64
    max_image_bytes: int = 20 * MiB


def _b64(value: Any, where: str) -> bytes:
    """Decode one base64 string (a data: URL prefix is allowed)."""
    if not isinstance(value, str):
        raise RequestError(400, f"{where}: expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if ";base64" not in head:
            raise RequestError(400, f"{where}: data: URL must be base64-encoded")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: not valid base64 ({len(value)} characters)") from None


async def bounded_body(request: Any, limit: int) -> bytes:
    """Return a Starlette request's body; a 413 as soon as it is declared or streamed over ``limit`` bytes
    (a chunked upload declares no length, so the count is kept while reading)."""
    declared = request.headers.get("content-length") or ""
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request of {declared} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds {limit} bytes (sent without a length, or longer than declared)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_label_request(content_type: str, body: bytes, limits: Limits) -> tuple[list[bytes], bool]:
    """Return (image bytes, keep_invalid) from a /label body; raise RequestError with a 4xx otherwise.

    ``keep_invalid`` is true when the caller asked for error records (``on_invalid: record``)
    instead of a 422 for images that cannot be decoded.
    """

    kind = content_type.split(";")[0].strip().lower()
    on_invalid = "reject"
    if kind == "application/json":
        try:
            payload = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, 'body is not valid JSON; send {"images": [base64, ...]}') from None
        if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
            raise RequestError(400, 'body must be an object with "images": a list of base64 strings')
        on_invalid = payload.get("on_invalid", "reject")
        if on_invalid not in ("reject", "record"):
            raise RequestError(400, 'on_invalid must be "reject" or "record"')
        if len(payload["images"]) > limits.max_images:
            raise RequestError(
                413, f"too many images: {len(payload['images'])} > {limits.max_images}; split the request"
            )
        images = [_b64(v, f"images[{i}]") for i, v in enumerate(payload["images"])]
    elif kind == "multipart/form-data":
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
        message = BytesParser(policy=HTTP).parsebytes(head + body)
        if not message.is_multipart():
            raise RequestError(400, "multipart body could not be parsed (check the boundary)")
        images = []
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True) or b""
            if name == "on_invalid":
                on_invalid = data.decode(errors="replace").strip()
            elif part.get_filename() is not None or name in ("image", "images"):
                images.append(data)
        if len(images) > limits.max_images:
            raise RequestError(
                413, f"too many images: {len(images)} > {limits.max_images}; split the request"
            )
    else:
        raise RequestError(
            415, f"unsupported content type {kind!r}: send application/json or multipart/form-data"
        )
    if not images:
        raise RequestError(400, "no images in the request")
    for i, data in enumerate(images):
        if len(data) > limits.max_image_bytes:
            raise RequestError(
                413, f"images[{i}]: {len(data)} bytes exceeds the limit of {limits.max_image_bytes}"
            )
    return images, on_invalid == "record"


def check_images(images: list[bytes]) -> None:
    """Raise a 422 RequestError naming every image Pillow cannot open (header check, no full decode)."""
    import io

    from PIL import Image

    bad = []
    for i, data in enumerate(images):
        try:
            Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:  # an image, and too large to decode: say so
            raise RequestError(
                413, f"images[{i}]: image_too_large: {exc}; resize it, or on_invalid=record for error records"
            ) from None
        except Exception:
            bad.append(i)
    if bad:
        shown = ", ".join(f"images[{i}]" for i in bad[:10])
        raise RequestError(
            422,
            f"not an image Pillow can open: {shown}; send PNG/JPEG/WebP, or on_invalid=record for error records",
        )


def parse_chat_messages(messages: Any) -> list[ChatMessage]:
    """Return OpenAI-style chat messages as ChatMessages with decoded images; RequestError otherwise."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, f"messages[{i}]: needs a role of system, user or assistant")
        content = m.get("content")
        parts: list[Any] = []
        if not isinstance(content, str | list | None):
            raise RequestError(400, f"messages[{i}].content: expected a string or a list of parts")
        for j, part in enumerate(
            [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        ):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise RequestError(400, f"{where}: expected an object with a type")
            if part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                url = image_url_of(part)
                if not isinstance(url, str):
                    raise RequestError(400, f'{where}: image_url must be {{"url": "data:image/...;base64,..."}}')
                if not url.startswith("data:"):
                    raise RequestError(
                        400, f"{where}: only data: URLs are accepted (this server fetches nothing)"
                    )
                image = decode_image(_b64(url, where))
                if not hasattr(image, "size"):
                    raise RequestError(422, f"{where}: {image.message}")  # type: ignore[union-attr]
                parts.append(image)
            else:
                raise RequestError(400, f"{where}: unsupported part type {part.get('type')!r}")
        if m["role"] == "user" and not parts:
            raise RequestError(400, f"messages[{i}]: a user turn needs content (text or an image)")
        out.append(ChatMessage(role=m["role"], parts=parts))
    return out


# ----------------------------------------------------------------------------- the deployment

"""sharegpt ``messages`` for one image row: normalise what sources bring, or build them from a template."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class InvalidMessages(ValueError):
    """Messages that cannot train one image row; the message says what to fix."""


def normalize_messages(raw: Any) -> list[dict[str, str]]:
    """Return sharegpt turns as ``[{"role", "content"}]`` with exactly one ``<image>`` placeholder.

    Accepts a JSON string or a list of turns with ``role``/``content`` or LLaMA-Factory's
    ``from``/``value`` keys (human/gpt roles). A row holds one image, so the turns must hold one
    placeholder; when they hold none, it is put at the start of the first user turn (LLaMA-Factory
    requires as many placeholders as images).
    """
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidMessages(f"messages are not valid JSON: {exc}") from exc
    if not isinstance(raw, list | tuple) or not raw:
        raise InvalidMessages("messages must be a non-empty list of turns")
    turns = []
    for turn in raw:
        if not isinstance(turn, Mapping):
            raise InvalidMessages(
                f"a turn must be an object with role and content, got {type(turn).__name__}"
            )
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES or not isinstance(content, str):
            raise InvalidMessages(
                f"a turn needs a role among {sorted(ROLE_ALIASES)} and a text content, got {dict(turn)}"
            )
        turns.append({"role": ROLE_ALIASES[role], "content": content})
    placeholders = sum(turn["content"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders > 1:
        raise InvalidMessages(
            f"the turns hold {placeholders} {IMAGE_PLACEHOLDER} placeholders; a row holds one image"
        )
    if placeholders == 0:
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is None:
            raise InvalidMessages("the turns have no user turn to hold the <image> placeholder")
        first_user["content"] = IMAGE_PLACEHOLDER + first_user["content"]
    return turns


def messages_from_template(
    prompt: str, answer: Any, fields: Mapping[str, Any]
) -> list[dict[str, str]] | None:
    """Return ``[user: prompt, assistant: answer]`` for one row, or None when the answer is missing.

    ``{name}`` in the prompt is replaced by the row's field `name` (truth, caption, metadata);
    the prompt gets an ``<image>`` placeholder at its start if it has none.
    """
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return None
    text = prompt.format_map(_Fields(fields)) if "{" in prompt else prompt
    if IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER + text
    return [{"role": "user", "content": text}, {"role": "assistant", "content": str(answer)}]


class _Fields(dict):
    """Format mapping that leaves unknown ``{names}`` as they are instead of raising."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        super().__init__({k: "" if v is None else v for k, v in fields.items()})

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"

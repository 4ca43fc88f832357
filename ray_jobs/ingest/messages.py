"""sharegpt ``messages`` for one image row: normalise what sources bring, or build them from a template."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from lance_io.reasons import ReasonError

IMAGE_PLACEHOLDER = "<image>"
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
SAMPLE_ROLES = {**ROLE_ALIASES, "observation": "observation", "function_call": "function_call", "function": "function_call"}
"""Roles a training sample may use: LLaMA-Factory's sharegpt tags (tool calls and results too)."""


class InvalidMessages(ReasonError):
    """Messages that cannot train one image row (``invalid_messages``); the message says what to fix."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_messages", message)

    def __str__(self) -> str:  # recorded as an error record's message, next to its reason
        return self.message


def normalize_turns(raw: Any, roles: Mapping[str, str] = SAMPLE_ROLES) -> list[dict[str, str]]:
    """Return sharegpt turns as ``[{"role", "content"}]``, roles renamed, placeholders untouched.

    Accepts a JSON string or a list of turns with ``role``/``content`` or LLaMA-Factory's
    ``from``/``value`` keys (human/gpt roles), in the order LLaMA-Factory trains on
    (:func:`turn_order_problem`): a sample it would skip is refused here, with what to fix.
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
        if role not in roles or not isinstance(content, str):
            raise InvalidMessages(
                f"a turn needs a role among {sorted(roles)} and a text content, got {dict(turn)}"
            )
        turns.append({"role": roles[role], "content": content})
    problem = turn_order_problem(turns)
    if problem is not None:
        raise InvalidMessages(problem)
    return turns


def turn_order_problem(turns: list[dict[str, str]]) -> str | None:
    """Return why LLaMA-Factory's sharegpt converter would skip these turns (it logs "Invalid role tag"
    and trains on without the sample), else None: a system turn only first, then a user (or
    observation) turn and an assistant (or function_call) turn in turn, ending with an assistant's."""
    offset = 1 if turns and turns[0]["role"] == "system" else 0
    body = turns[offset:]
    if not body:
        return "the turns hold no user turn and no answer"
    for k, turn in enumerate(body):
        expected = ("user", "observation") if k % 2 == 0 else ("assistant", "function_call")
        if turn["role"] not in expected:
            return (
                f"turn {k + offset} is {turn['role']}, where LLaMA-Factory expects {' or '.join(expected)}: "
                "turns alternate user and assistant, starting with the user (a system turn only first)"
            )
    if len(body) % 2:
        return "the turns end with a user turn: LLaMA-Factory trains on the assistant's answer, and there is none"
    return None


def placeholder_problem(turns: list[dict[str, str]], images: int) -> str | None:
    """Return what is wrong when the turns' ``<image>`` placeholders do not match ``images`` images, else None."""
    placeholders = sum(turn["content"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders == images:
        return None
    return (
        f"the turns hold {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {images} image(s); "
        f"put one {IMAGE_PLACEHOLDER} in the turns per image, in the order of the images list"
    )


def normalize_messages(raw: Any) -> list[dict[str, str]]:
    """Return sharegpt turns as ``[{"role", "content"}]`` with exactly one ``<image>`` placeholder.

    Accepts what :func:`normalize_turns` accepts (user, assistant and system turns). A row holds one image, so the turns must hold one
    placeholder; when they hold none, it is put at the start of the first user turn (LLaMA-Factory
    requires as many placeholders as images).
    """
    turns = normalize_turns(raw, ROLE_ALIASES)
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

"""Training conversations from labels, and the deterministic train/validation split.

A labeled row becomes the chat the labeler asks (``serve_apps.tasks``: the same prompt, the
same answer texts), so a fine-tuned model answers in the shape the labeler scores:

    user:      <image>Fill in the blank: this is a photo of a {}, you should select ... [cat, dog]
    assistant: this is a photo of dog.

Attribute tasks become one user/assistant turn per attribute; captions and scores likewise.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's image token in sharegpt content
Message = dict[str, str]


class LabelError(ValueError):
    """A label that the task cannot turn into an answer; ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def split_of(row_id: str, val_fraction: float) -> str:
    """Return ``"validation"`` or ``"train"`` for ``row_id``, from a hash of the id (stable across runs)."""
    bucket = int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big") / 2**64
    return "validation" if bucket < val_fraction else "train"


def in_split(row_id: str, split: str, val_fraction: float) -> bool:
    """Return whether ``row_id`` belongs to ``split`` (``"all"`` keeps every row)."""
    return split == "all" or split_of(row_id, val_fraction) == split


def load_task_config(task: str | None, task_config: dict[str, Any] | None) -> Any:
    """Return the typed task from a snapshot (preferred) or a task name/path."""
    from serve_apps.tasks import load_task, task_from_dict

    if task_config is not None:
        return task_from_dict(task_config, source=f"task snapshot {task or ''}".strip())
    if task is None:
        raise LabelError("task_missing", "a label column needs a task (or labels to build a classify task)")
    return load_task(task)


def classify_task_from_labels(name: str, labels: list[str]) -> Any:
    """Return the default classify task (the article's prompt and answer) over ``labels``."""
    from serve_apps.tasks import ClassifyTask

    return ClassifyTask(name=name, labels=labels)


def _answer(question: Any, value: str) -> str:
    """Return the answer text for ``value`` to ``question`` (the choice that means it, or the text itself)."""
    if question.values is None:
        return value
    for choice, known in zip(question.choices, question.values, strict=True):
        if known == value:
            return choice
    raise LabelError(
        "label_not_in_task",
        f"{value!r} is not an allowed answer to {question.key!r} (allowed: {', '.join(question.values)}); "
        "fix the label or add it to the task",
    )


def _values_by_key(questions: list[Any], label: Any) -> dict[str, str]:
    """Return question key -> label value: one value for one question, a JSON object for several."""
    if len(questions) == 1:
        if isinstance(label, dict):
            label = label.get(questions[0].key)
        return {questions[0].key: str(label)}
    values = json.loads(label) if isinstance(label, str) else label
    if not isinstance(values, dict):
        raise LabelError("label_not_object", f"attribute labels must be a JSON object, got {label!r}")
    return {q.key: str(values[q.key]) for q in questions if values.get(q.key) is not None}


def messages_from_label(questions: list[Any], label: Any) -> list[Message]:
    """Return the sharegpt turns (system?, user, assistant, ...) that teach ``label`` for ``questions``."""
    values = _values_by_key(questions, label)
    turns: list[Message] = []
    if questions and questions[0].system:
        turns.append({"role": "system", "content": questions[0].system})
    for question in questions:
        if question.key not in values:
            continue
        prefix = IMAGE_PLACEHOLDER if not any(t["role"] == "user" for t in turns) else ""
        turns.append({"role": "user", "content": prefix + question.prompt})
        turns.append({"role": "assistant", "content": _answer(question, values[question.key])})
    if not any(t["role"] == "user" for t in turns):
        raise LabelError("label_empty", f"label {label!r} answers none of the task's questions")
    return turns

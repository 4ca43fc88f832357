"""The one result record every backend returns: one :class:`LabelResult` per input image.

Backends answer each :class:`~lance_io.tasks.Question` of a task with an :class:`Answer`
and turn them into a record with :func:`assemble`, or report a failed image with
:func:`error_result`; so a record looks the same whichever backend produced it.

Example::

    r = LabelResult.model_validate_json(body)
    if r.ok:
        print(r.label, r.confidence, r.probabilities)
    else:
        print(r.error, r.error_message)   # e.g. image_decode_failed: cannot identify image file
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lance_io.tasks import Task


class ErrorCode(StrEnum):
    """Why a record carries no answer."""

    IMAGE_DECODE_FAILED = "image_decode_failed"
    """The bytes are not an image Pillow can open (truncated, not an image, unsupported)."""
    IMAGE_TOO_LARGE = "image_too_large"
    """The image exceeds the size or pixel limit."""
    INVALID_ANSWER = "invalid_answer"
    """The model's answer is outside the allowed set; ``raw_text`` holds what it said."""
    BACKEND_FAILED = "backend_failed"
    """The model or the remote endpoint raised; the message says what it said."""
    TIMEOUT = "timeout"
    """The backend or endpoint did not answer in time."""
    UNAVAILABLE = "unavailable"
    """The service is overloaded or down; retry later."""


@dataclass
class Provenance:
    """What produced a result: stored with every label so reruns can tell stale labels apart."""

    model_id: str
    adapter_id: str | None
    task_hash: str
    backend: str
    views: int = 1  # views of an image averaged for the answers (1: the image alone; see ImageViews.unsure_at)


class LabelResult(BaseModel):
    """The answer for one image (or the reason there is none), with provenance and timing.

    Exactly the fields of the task's kind are set: ``label`` (classify), ``attributes``
    (attributes), ``caption`` (caption), ``score`` (score). When ``error`` is set, they are
    all null and ``error_message`` says what went wrong and what to do.
    """

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="Task name")
    kind: str = Field(description="Task kind: classify, attributes, caption or score")
    label: str | None = None
    attributes: dict[str, str | None] | None = None
    caption: str | None = None
    score: int | None = None
    confidence: float | None = Field(None, description="Probability of the answer (joint for attributes)")
    probabilities: dict[str, float] | None = Field(
        None, description="value -> p over the closed set (sums to 1)"
    )
    attribute_confidence: dict[str, float] | None = None
    attribute_probabilities: dict[str, dict[str, float]] | None = None
    raw_text: str | None = Field(None, description="What the model said (per attribute: 'name=text; ...')")
    model_id: str
    adapter_id: str | None = None
    task_hash: str
    backend: str
    views: int = Field(
        1, ge=1,
        description="Views the labeler averages for an image's answer (1: the image alone); with the views' "
        "unsure_at, only an image whose answer from the image alone is that unsure gets them",
    )
    latency_ms: float = Field(0.0, description="This image's share of the backend call's wall time")
    error: ErrorCode | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        """True when the record carries an answer."""
        return self.error is None


@dataclass
class Answer:
    """A backend's answer to one question: the value, and for closed sets the distribution.

    ``value`` is None when the model's text matched no allowed value (then the record is
    ``invalid_answer``). ``probabilities`` maps each allowed value to p (sums to 1) when the
    backend can score the whole set; ``confidence`` is p(value), or for free text the mean
    per-token probability, when known.
    """

    value: str | None
    raw_text: str
    probabilities: dict[str, float] | None = None
    confidence: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def error_result(
    task: Task, provenance: Provenance, code: ErrorCode, message: str, *, raw_text: str | None = None
) -> LabelResult:
    """Return the record of an image that got no answer, with a reason code and an actionable message."""
    return LabelResult(
        task=task.name,
        kind=task.kind,
        model_id=provenance.model_id,
        adapter_id=provenance.adapter_id,
        task_hash=provenance.task_hash,
        backend=provenance.backend,
        views=provenance.views,
        error=code,
        error_message=message,
        raw_text=raw_text,
    )


def assemble(
    task: Task, answers: dict[str, Answer], provenance: Provenance, latency_ms: float
) -> LabelResult:
    """Return the record for one image from the answers to ``task.questions()`` (keyed by question key).

    Any answer whose value is None makes the whole record ``invalid_answer`` (with the raw text),
    never a coerced label.
    """
    base: dict[str, Any] = {
        "task": task.name,
        "kind": task.kind,
        "model_id": provenance.model_id,
        "adapter_id": provenance.adapter_id,
        "task_hash": provenance.task_hash,
        "backend": provenance.backend,
        "views": provenance.views,
        "latency_ms": round(latency_ms, 3),
    }
    if len(answers) == 1:
        base["raw_text"] = next(iter(answers.values())).raw_text
    else:
        base["raw_text"] = "; ".join(f"{k}={a.raw_text}" for k, a in answers.items())
    invalid = [k for k, a in answers.items() if a.value is None]
    if invalid:
        allowed = {q.key: q.values for q in task.questions()}
        key = invalid[0]
        shown = ", ".join((allowed.get(key) or ())[:8])
        return LabelResult(
            **base,
            error=ErrorCode.INVALID_ANSWER,
            error_message=(
                f"invalid_answer: the model answered {answers[key].raw_text!r} for {key!r}, "
                f"which is not one of [{shown}{', ...' if len(allowed.get(key) or ()) > 8 else ''}]"
            ),
        )
    if task.kind == "attributes":
        values = {k: a.value for k, a in answers.items()}
        conf = {k: a.confidence for k, a in answers.items() if a.confidence is not None}
        probs = {k: a.probabilities for k, a in answers.items() if a.probabilities is not None}
        joint = math.prod(conf.values()) if len(conf) == len(answers) else None
        return LabelResult(
            **base,
            attributes=values,
            confidence=joint,
            attribute_confidence=conf or None,
            attribute_probabilities=probs or None,
        )
    (key, answer), *_ = answers.items()
    fields: dict[str, Any] = {"confidence": answer.confidence, "probabilities": answer.probabilities}
    if task.kind == "classify":
        fields["label"] = answer.value
    elif task.kind == "score":
        fields["score"] = int(answer.value)  # type: ignore[arg-type]
    else:
        fields["caption"] = answer.value
    return LabelResult(**base, **fields)

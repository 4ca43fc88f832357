"""What a task writes into a table, and how those columns become training answers.

The one definition of a task's label columns, used by the tagging job (result records ->
columns), the LLaMA-Factory extension (columns -> chats), ``lancetag eval`` and ``lancetag
diff`` (which columns to compare). For a column prefix ``C``:

==========  ===========================================  =====================
kind        answer columns                               type
==========  ===========================================  =====================
classify    ``C``                                        string (one of labels)
score       ``C``                                        int32
caption     ``C``                                        string
attributes  ``C_<attribute>``, one per attribute         string
==========  ===========================================  =====================

plus ``C_confidence`` (float32), ``C_provenance`` (``model|adapter|task_hash``) and
``C_error`` (``reason: message``, null when the row got an answer). Ground truth follows the
same rule under its own prefix (``truth``, or ``truth_<attribute>``), so ``lancetag lf
register --label-column C`` trains on exactly what ``lancetag label --column C`` wrote.

Example::

    from lance_io.labels import answer_columns, messages_for_row
    task = load_task("fashion")
    answer_columns(task, "attrs")            # {'category': 'attrs_category', ...}
    messages_for_row(task, "attrs", row)     # [{'role': 'user', 'content': '<image>What is ...'}, ...]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import pyarrow as pa

from lance_io.reasons import ReasonError
from lance_io.tasks import ClassifyTask, Question, Task

IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's image token in sharegpt content
META_SUFFIXES = ("confidence", "provenance", "error")
KIND_KEY = "lancetag.kind"  # answer field metadata: the kind of the task that wrote the column
Message = dict[str, str]


class LabelError(ReasonError):
    """A stored label that the task cannot turn into a training answer."""


class LabelRecord(Protocol):
    """The fields of a labeler's result record that become columns (``serve_apps.results.LabelResult``)."""

    error: Any
    error_message: str | None
    label: str | None
    attributes: dict[str, str | None] | None
    caption: str | None
    score: int | None
    confidence: float | None
    model_id: str
    adapter_id: str | None
    task_hash: str


def provenance_of(model: str, adapter: str | None, task_hash: str) -> str:
    """Return the provenance string stored with each label: ``model|adapter|task_hash``."""
    return f"{model}|{adapter or ''}|{task_hash}"


def answer_columns(task: Task, column: str) -> dict[str, str]:
    """Return question key -> the column holding its answer under prefix ``column``."""
    if task.kind == "attributes":
        return {name: f"{column}_{name}" for name in task.attributes}  # type: ignore[union-attr]
    return {task.questions()[0].key: column}


def label_schema(task: Task, column: str) -> pa.Schema:
    """Return every column the task writes under prefix ``column``, answers first.

    Each answer field carries the task's kind in its metadata (``lancetag.kind``), so readers
    that know only the table (``lancetag eval``) can tell free text from a closed set.
    """
    answer_type = pa.int32() if task.kind == "score" else pa.string()
    kind = {KIND_KEY: task.kind}
    return pa.schema(
        [
            *(pa.field(name, answer_type, metadata=kind) for name in answer_columns(task, column).values()),
            pa.field(f"{column}_confidence", pa.float32()),
            pa.field(f"{column}_provenance", pa.string()),
            pa.field(f"{column}_error", pa.string()),
        ]
    )


def kind_of(schema: pa.Schema, column: str) -> str | None:
    """Return the task kind :func:`label_schema` stored with answer column ``column`` (None when unknown)."""
    metadata = (schema.field(column).metadata or {}) if column in schema.names else {}
    kind = metadata.get(KIND_KEY.encode())
    return kind.decode() if kind else None


def _answer_of(record: LabelRecord, task: Task, key: str) -> Any:
    if task.kind == "attributes":
        return (record.attributes or {}).get(key)
    return {"classify": record.label, "score": record.score, "caption": record.caption}[task.kind]


def results_to_batch(results: Sequence[LabelRecord], task: Task, column: str) -> pa.RecordBatch:
    """Turn result records (one per row, in order) into a batch of the task's label columns."""
    schema = label_schema(task, column)
    columns = answer_columns(task, column)
    values: dict[str, list] = {f.name: [] for f in schema}
    for r in results:
        ok = r.error is None
        for key, name in columns.items():
            values[name].append(_answer_of(r, task, key) if ok else None)
        values[f"{column}_confidence"].append(r.confidence if ok else None)
        values[f"{column}_provenance"].append(provenance_of(r.model_id, r.adapter_id, r.task_hash))
        values[f"{column}_error"].append(None if ok else f"{r.error}: {r.error_message}")
    return pa.record_batch([pa.array(values[f.name], f.type) for f in schema], schema=schema)


def answer_columns_in(names: Sequence[str], column: str) -> dict[str, str]:
    """Return key -> answer column found under prefix ``column`` in ``names``, without knowing the task.

    ``column`` itself when present (one answer), else every ``column_<key>`` that is not a
    metadata column (``_confidence``, ``_provenance``, ``_error``). Empty when none.
    """
    if column in names:
        return {column: column}
    prefix = f"{column}_"
    return {
        name.removeprefix(prefix): name
        for name in names
        if name.startswith(prefix) and name.removeprefix(prefix) not in META_SUFFIXES
    }


def classify_task_from_labels(name: str, labels: list[str]) -> ClassifyTask:
    """Return the default classify task (the article's prompt and answer) over ``labels``."""
    return ClassifyTask(name=name, labels=labels)


def _answer_text(question: Question, value: str) -> str:
    """Return the answer text for ``value`` (the choice that means it, or the free text itself)."""
    if question.values is None or question.choices is None:
        return value
    for choice, known in zip(question.choices, question.values, strict=True):
        if known == value:
            return choice
    raise LabelError(
        "label_not_in_task",
        f"{value!r} is not an allowed answer to {question.key!r} (allowed: {', '.join(question.values)}); "
        "fix the label or add it to the task",
    )


def messages_from_answers(questions: list[Question], values: Mapping[str, Any]) -> list[Message]:
    """Return the sharegpt turns (system?, user, assistant, ...) teaching ``values`` (question key -> value).

    One user/assistant turn per answered question, the image placeholder in the first user
    turn: the same prompts and answer texts the labeler asks and scores.
    """
    turns: list[Message] = []
    if questions and questions[0].system:
        turns.append({"role": "system", "content": questions[0].system})
    for question in questions:
        value = values.get(question.key)
        if value is None:
            continue
        prefix = IMAGE_PLACEHOLDER if not any(t["role"] == "user" for t in turns) else ""
        turns.append({"role": "user", "content": prefix + question.prompt})
        turns.append({"role": "assistant", "content": _answer_text(question, str(value))})
    if not any(t["role"] == "user" for t in turns):
        raise LabelError("label_missing", "the row has no answer to any of the task's questions")
    return turns


def messages_for_row(task: Task, column: str, row: Mapping[str, Any]) -> list[Message]:
    """Return the training chat of one row from its answer columns under prefix ``column``."""
    values = {key: row.get(name) for key, name in answer_columns(task, column).items()}
    return messages_from_answers(task.questions(), values)

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
generate    ``C`` and ``C_missing`` (input values the text  string, list<string>
            does not mention; empty when faithful)
==========  ===========================================  =====================

plus ``C_confidence`` (float32), ``C_provenance`` (``model|adapter|task_hash``, and
``|views=N`` when the answers averaged N views of each image; a generate task appends ``|``
and its inputs' key, :func:`inputs_key`) and ``C_error`` (``reason: message``, null when the
row got an answer). Ground truth follows the
same rule under its own prefix (``truth``, or ``truth_<attribute>``), so ``lancetag lf
register --label-column C`` trains on exactly what ``lancetag label --column C`` wrote.

Example::

    from lance_io.labels import answer_columns, messages_for_row
    task = load_task("fashion")
    answer_columns(task, "attrs")            # {'category': 'attrs_category', ...}
    messages_for_row(task, "attrs", row)     # [{'role': 'user', 'content': '<image>What is ...'}, ...]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from lance_io.reasons import ReasonError
from lance_io.tasks import ClassifyTask, GenerateTask, Question, Task

IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's image token in sharegpt content
META_SUFFIXES = ("confidence", "provenance", "error", "missing")
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
    views: int


def provenance_of(model: str, adapter: str | None, task_hash: str, views: int = 1) -> str:
    """Return the provenance string stored with each label: ``model|adapter|task_hash``, plus
    ``|views=N`` when the answers averaged N views of each image (they differ from the image alone's)."""
    return f"{model}|{adapter or ''}|{task_hash}" + (f"|views={views}" if views > 1 else "")


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
    missing = [pa.field(f"{column}_missing", pa.list_(pa.string()))] if task.kind == "generate" else []
    return pa.schema(
        [
            *(pa.field(name, answer_type, metadata=kind) for name in answer_columns(task, column).values()),
            *missing,
            pa.field(f"{column}_confidence", pa.float32()),
            pa.field(f"{column}_provenance", pa.string()),
            pa.field(f"{column}_error", pa.string()),
        ]
    )


def check_label_target(schema: pa.Schema, task: Task, column: str) -> None:
    """Refuse a table a label run cannot read (``column_missing``: no ``id``, or no ``image`` when
    the task looks at it) and a prefix ``column`` whose columns hold other data (``column_taken``).

    Columns a label run wrote carry the task kind on their answer field: a task of that kind relabels
    them in place, a task of another is refused. Any other column of that name (``truth``, ``id``, a
    manifest's metadata) would be overwritten row by row, so it is refused before any work.
    """
    needed = ["id", "image"] if not isinstance(task, GenerateTask) or task.image else ["id"]
    absent = [name for name in needed if name not in schema.names]
    if absent:
        raise ReasonError(
            "column_missing",
            f"the table has no {' or '.join(absent)} column: a label run reads an image table (`lancetag ingest` writes one)",
        )
    wanted = label_schema(task, column)
    answers = [name for name in answer_columns(task, column).values() if name in schema.names]
    labeled = bool(answers) and all(kind_of(schema, name) for name in answers)
    taken = [f.name for f in wanted if f.name in schema.names]
    if taken and not labeled:
        raise ReasonError(
            "column_taken",
            f"--column {column} would write {', '.join(taken)}, which the table already holds and no label run wrote; "
            "choose another --column (label columns are named <column>, <column>_confidence, <column>_provenance, "
            "<column>_error)",
        )
    kinds = {kind_of(schema, name) for name in answers}
    clashing = [f.name for f in wanted if f.name in schema.names and schema.field(f.name).type != f.type]
    if taken and (kinds != {task.kind} or clashing):
        raise ReasonError(
            "column_taken",
            f"--column {column} holds {' and '.join(sorted(k or '?' for k in kinds))} answers of an earlier label run, "
            f"and task {task.name!r} is a {task.kind} task; choose another --column",
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


def error_text(reason: str, message: str | None) -> str:
    """A row's ``_error`` value: ``<reason>: <message>``, once (the labeler's messages begin with their reason)."""
    if not message:
        return reason
    return message if message.startswith(f"{reason}:") else f"{reason}: {message}"


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
        values[f"{column}_provenance"].append(provenance_of(r.model_id, r.adapter_id, r.task_hash, r.views))
        values[f"{column}_error"].append(None if ok else error_text(r.error, r.error_message))
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
    return row_messages(task, column)(row)


def row_messages(task: Task, column: str) -> Callable[[Mapping[str, Any]], list[Message]]:
    """Return :func:`messages_for_row` for ``task`` and ``column``, its questions built once (for many rows)."""
    if isinstance(task, GenerateTask):
        return lambda row: _generated_messages(task, column, row)
    questions, columns = task.questions(), answer_columns(task, column)
    return lambda row: messages_from_answers(questions, {key: row.get(name) for key, name in columns.items()})


def _generated_messages(task: GenerateTask, column: str, row: Mapping[str, Any]) -> list[Message]:
    """The chat that teaches a generate task's text: its prompt filled from the row's inputs, then the text."""
    if row.get(column) is None:
        raise LabelError("label_missing", f"the row has no generated text in {column!r}")
    turns: list[Message] = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []
    prompt = task.render(input_values(task, row))
    turns.append({"role": "user", "content": (IMAGE_PLACEHOLDER if task.image else "") + prompt})
    turns.append({"role": "assistant", "content": str(row[column])})
    return turns


# ----------------------------------------------------------------------------- generate tasks


@dataclass
class GeneratedRecord:
    """One row's generated text (or the reason there is none) and the input values it omits."""

    text: str | None
    missing: list[str] | None
    model_id: str
    task_hash: str
    inputs: str
    adapter_id: str | None = None
    confidence: float | None = None
    error: str | None = None
    error_message: str | None = None


def input_values(task: GenerateTask, row: Mapping[str, Any]) -> dict[str, Any]:
    """Return input name -> the row's value of the column it is filled from."""
    return {name: row.get(column) for name, column in task.inputs.items()}


def input_provenance_columns(task: GenerateTask, names: Sequence[str]) -> list[str]:
    """Return the provenance columns (in ``names``) of the task's input columns, in input order, once each.

    ``X_provenance`` for an answer column ``X``; for ``P_attr`` (an attributes task under prefix
    ``P``) ``P_provenance``. Inputs with none (ingest metadata) contribute their values only.
    """
    found: list[str] = []
    for column in task.inputs.values():
        parts = column.split("_")
        candidates = ["_".join(parts[:i]) + "_provenance" for i in range(len(parts), 0, -1)]
        hit = next((c for c in candidates if c in names), None)
        if hit is not None and hit not in found:
            found.append(hit)
    return found


def inputs_key(task: GenerateTask, row: Mapping[str, Any], names: Sequence[str]) -> str:
    """Return what identifies a row's inputs: their provenance, then their values, ``;``-separated.

    Stored after the generator's provenance, so ``--relabel`` redoes a row whose inputs were
    relabeled or edited; :func:`inputs_key_sql` computes the same string in a Lance filter.
    """
    parts = [row.get(c) for c in input_provenance_columns(task, names)]
    parts += [row.get(c) for c in task.inputs.values()]
    return ";".join("" if p is None else str(p) for p in parts)


def inputs_key_sql(task: GenerateTask, names: Sequence[str]) -> str:
    """Return the SQL expression of :func:`inputs_key` over a table's columns (``names``)."""
    columns = [*input_provenance_columns(task, names), *task.inputs.values()]
    parts: list[str] = []
    for i, c in enumerate(columns):
        parts += [*(["';'"] if i else []), f"coalesce(CAST({c} AS string), '')"]
    return f"concat({', '.join(parts)})" if len(parts) > 1 else parts[0]


def generated_to_batch(records: Sequence[GeneratedRecord], task: GenerateTask, column: str) -> pa.RecordBatch:
    """Turn generated records (one per row, in order) into a batch of the task's columns."""
    schema = label_schema(task, column)
    ok = [r.error is None for r in records]
    values = {
        column: [r.text if good else None for r, good in zip(records, ok, strict=True)],
        f"{column}_missing": [r.missing if good else None for r, good in zip(records, ok, strict=True)],
        f"{column}_confidence": [r.confidence if good else None for r, good in zip(records, ok, strict=True)],
        f"{column}_provenance": [
            f"{provenance_of(r.model_id, r.adapter_id, r.task_hash)}|{r.inputs}" for r in records
        ],
        f"{column}_error": [None if good else error_text(r.error, r.error_message) for r, good in zip(records, ok, strict=True)],
    }
    return pa.record_batch([pa.array(values[f.name], f.type) for f in schema], schema=schema)

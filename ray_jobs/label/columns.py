"""The label columns a task writes, and how result records become those columns.

For a column prefix ``C`` every task writes ``C_confidence`` (float32), ``C_provenance``
(``model|adapter|task_hash``: what produced the row) and ``C_error`` (``reason: message``,
null when the row got an answer). The answer itself goes to:

- classify: ``C`` (string, always one of the task's labels)
- score: ``C`` (int32)
- caption: ``C`` (string)
- attributes: ``C_<attribute>`` (string), one column per attribute
"""

from __future__ import annotations

import pyarrow as pa

from serve_apps.results import LabelResult
from serve_apps.tasks import Task


def provenance_of(model: str, adapter: str | None, task_hash: str) -> str:
    """Return the provenance string stored with each label: ``model|adapter|task_hash``."""
    return f"{model}|{adapter or ''}|{task_hash}"


def answer_fields(task: Task, column: str) -> list[pa.Field]:
    """Return the columns holding the task's answer (one per attribute for attribute tasks)."""
    if task.kind == "attributes":
        return [pa.field(f"{column}_{name}", pa.string()) for name in task.attributes]  # type: ignore[attr-defined]
    return [pa.field(column, pa.int32() if task.kind == "score" else pa.string())]


def label_schema(task: Task, column: str) -> pa.Schema:
    """Return every column the task writes under prefix ``column``."""
    return pa.schema(
        [
            *answer_fields(task, column),
            pa.field(f"{column}_confidence", pa.float32()),
            pa.field(f"{column}_provenance", pa.string()),
            pa.field(f"{column}_error", pa.string()),
        ]
    )


def results_to_batch(results: list[LabelResult], task: Task, column: str) -> pa.RecordBatch:
    """Turn result records (one per row, in order) into a batch of the task's label columns."""
    schema = label_schema(task, column)
    values: dict[str, list] = {f.name: [] for f in schema}
    for r in results:
        ok = r.error is None
        if task.kind == "attributes":
            for name in task.attributes:  # type: ignore[attr-defined]
                values[f"{column}_{name}"].append((r.attributes or {}).get(name) if ok else None)
        else:
            answer = {"classify": r.label, "score": r.score, "caption": r.caption}[task.kind]
            values[column].append(answer if ok else None)
        values[f"{column}_confidence"].append(r.confidence if ok else None)
        values[f"{column}_provenance"].append(provenance_of(r.model_id, r.adapter_id, r.task_hash))
        values[f"{column}_error"].append(None if ok else f"{r.error}: {r.error_message}")
    return pa.record_batch([pa.array(values[f.name], f.type) for f in schema], schema=schema)

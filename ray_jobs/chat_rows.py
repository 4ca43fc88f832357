"""Stored labels of one table row, for the labeler's conversation route (``LabelerConfig.chat_tables``).

The Serve app knows no Lance: whoever deploys it (``lancetag serve --chat-table``) hands it
:func:`read_row`, which the replica calls when a request names a row (``lancetag.row``).
It returns plain data: the row's image bytes and, per task, the stored answer in the shape of a
labeler result record, or None when the row has no usable answer for that task.

Example::

    read_row("/data/shirts.lance", "3f2a...", {"fashion": (load_task("fashion").model_dump(), "attrs")})
    # {"image": b"\\x89PNG...", "labels": {"fashion": {"attributes": {...}, "confidence": 0.41, ...}}}
"""

from __future__ import annotations

from typing import Any

from lance_io.labels import answer_columns
from lance_io.sql import sql_string
from lance_io.tasks import task_from_dict


class RowNotFound(LookupError):
    """The table has no row with that id."""


def read_row(uri: str, row_id: str, tasks: dict[str, tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """Return ``{"image": bytes, "labels": {task name: stored result or None}}`` for row ``row_id`` of ``uri``.

    ``tasks`` maps a task name to (its task as a dict, the column prefix its labels were written
    under). A task whose columns the table lacks, or whose answer on this row is null or an
    error, maps to None: the caller runs the model instead.
    """
    import lance

    ds = lance.dataset(uri)
    names = set(ds.schema.names)
    typed = {name: (task_from_dict(data), prefix) for name, (data, prefix) in tasks.items()}
    wanted = ["image"]
    for task, prefix in typed.values():
        wanted += [c for c in (*answer_columns(task, prefix).values(), f"{prefix}_confidence", f"{prefix}_error",
                               f"{prefix}_provenance") if c in names]
    found = ds.to_table(columns=list(dict.fromkeys(wanted)), filter=f"id = {sql_string(row_id)}").to_pylist()
    if not found:
        raise RowNotFound(f"no row with id {row_id!r} in {uri}")
    row = found[0]
    labels: dict[str, dict[str, Any] | None] = {}
    for name, (task, prefix) in typed.items():
        answers = {key: row.get(column) for key, column in answer_columns(task, prefix).items()}
        if row.get(f"{prefix}_error") is not None or any(v is None for v in answers.values()):
            labels[name] = None
            continue
        stored: dict[str, Any] = {"confidence": row.get(f"{prefix}_confidence"), "provenance": row.get(f"{prefix}_provenance")}
        if task.kind == "attributes":
            stored["attributes"] = answers
        else:
            stored[{"classify": "label", "score": "score", "caption": "caption"}[task.kind]] = next(iter(answers.values()))
        labels[name] = stored
    return {"image": row["image"], "labels": labels}

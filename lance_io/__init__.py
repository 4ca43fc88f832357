"""Lance image tables: schema, append with dedup, errors record, fragment commits, versions, tasks.

This package knows tables and nothing of Ray or models; every other package reads and
writes tables through it. Names are imported on first use (PEP 562), so the pure-Python
modules (:mod:`lance_io.tasks`, :mod:`lance_io.reasons`, :mod:`lance_io.splits`) import
without Lance or pyarrow, as the vLLM labeling environment needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FragmentTodo": "lance_io.columns",
    "ensure_columns": "lance_io.columns",
    "plan_fragments": "lance_io.columns",
    "write_fragment": "lance_io.columns",
    "ErrorRecord": "lance_io.errors",
    "errors_uri": "lance_io.errors",
    "read_errors": "lance_io.errors",
    "record_errors": "lance_io.errors",
    "summarize_errors": "lance_io.errors",
    "ReasonError": "lance_io.reasons",
    "IMAGE_SCHEMA": "lance_io.schema",
    "content_hashes": "lance_io.schema",
    "image_id": "lance_io.schema",
    "AppendResult": "lance_io.table",
    "TableWriteError": "lance_io.table",
    "check_new_table_location": "lance_io.table",
    "append_images": "lance_io.table",
    "existing_ids": "lance_io.table",
    "open_table": "lance_io.table",
    "table_exists": "lance_io.table",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lance_io' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

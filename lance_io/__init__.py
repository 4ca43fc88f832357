"""Lance image tables: schema, append with dedup, errors record, fragment commits, versions.

This package knows tables and nothing of Ray or models; every other package reads and
writes tables through it.
"""

from lance_io.columns import FragmentCommit, FragmentTodo, ensure_columns, plan_fragments, write_fragment
from lance_io.errors import ErrorRecord, errors_uri, read_errors, record_errors, summarize_errors
from lance_io.schema import IMAGE_SCHEMA, content_hashes, image_id
from lance_io.table import (
    AppendResult,
    TableWriteError,
    append_images,
    existing_ids,
    open_table,
    table_exists,
)

__all__ = [
    "IMAGE_SCHEMA",
    "AppendResult",
    "ErrorRecord",
    "FragmentCommit",
    "FragmentTodo",
    "TableWriteError",
    "append_images",
    "content_hashes",
    "ensure_columns",
    "errors_uri",
    "existing_ids",
    "image_id",
    "open_table",
    "plan_fragments",
    "read_errors",
    "record_errors",
    "summarize_errors",
    "table_exists",
    "write_fragment",
]

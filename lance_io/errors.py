"""The errors record: inputs that failed, with a reason, next to the table they were meant for.

A table ``/data/hotel.lance`` keeps its errors in ``/data/hotel.errors.lance`` (a Lance
table too, append-only). Nothing that fails is ever replaced by a placeholder: it is here.

Example::

    from lance_io import ErrorRecord, record_errors, read_errors
    record_errors(uri, [ErrorRecord("photos/ab.jpg", "image_decode_failed", "truncated JPEG", job="ingest-1")])
    read_errors(uri).to_pandas()
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import lance
import pyarrow as pa

from lance_io.sql import sql_string

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("job", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("id", pa.string()),
        pa.field("at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def printable(text: str) -> str:
    """Return ``text`` as valid UTF-8: a file name's bytes that are not UTF-8 (which Python holds as lone
    surrogates, e.g. ``'bad\\udcffname.jpg'``) shown as ``\\xff``; any other lone surrogate as ``\\udXXX``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate no file name holds (JSON can spell one)
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class ErrorRecord:
    """One failed input: where it came from, a reason code, and what to do about it."""

    source: str
    reason: str
    message: str
    job: str
    stage: str = "ingest"
    id: str | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", printable(self.source))  # stored as text: a file name may not be
        object.__setattr__(self, "message", printable(self.message))


def errors_uri(table_uri: str) -> str:
    """Return the URI of the errors table that belongs to ``table_uri``."""
    base = table_uri.rstrip("/")
    base = base.removesuffix(".lance")
    return f"{base}.errors.lance"


def record_errors(
    table_uri: str, errors: list[ErrorRecord], *, storage_options: dict[str, str] | None = None
) -> None:
    """Append ``errors`` to the errors table of ``table_uri`` (one commit)."""
    if not errors:
        return
    rows = pa.Table.from_pylist([e.__dict__ for e in errors], schema=ERRORS_SCHEMA)
    uri = errors_uri(table_uri)
    try:
        lance.dataset(uri, storage_options=storage_options)
        mode = "append"
    except (ValueError, FileNotFoundError, OSError):
        mode = "create"
    lance.write_dataset(rows, uri, mode=mode, storage_options=storage_options)


def read_errors(
    table_uri: str, *, job: str | None = None, storage_options: dict[str, str] | None = None
) -> pa.Table:
    """Return the recorded errors of ``table_uri`` (of one ``job`` if given); empty if none."""
    try:
        ds = lance.dataset(errors_uri(table_uri), storage_options=storage_options)
    except (ValueError, FileNotFoundError, OSError):
        return ERRORS_SCHEMA.empty_table()
    job_filter = f"job = {sql_string(job)}" if job else None
    return ds.to_table(filter=job_filter)


def summarize_errors(errors: list[ErrorRecord]) -> dict[str, int]:
    """Return error counts by reason code, most frequent first."""
    return dict(Counter(e.reason for e in errors).most_common())

"""How CLI commands print: JSON for scripts (``--json``), rich tables for people; KEY=VALUE options.

Failures are not printed here: they raise, and :mod:`ray_jobs.cli.errors` prints them.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import date, datetime
from typing import Annotated, Any

import typer

from lance_io.reasons import ReasonError

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts")]


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


def to_jsonable(value: Any) -> Any:
    """Return ``value`` as plain JSON types (dataclasses, pydantic models, datetimes included)."""
    return json.loads(json.dumps(value, default=_default))


def emit_json(value: Any) -> None:
    """Print ``value`` as one line of JSON on stdout."""
    typer.echo(json.dumps(value, default=_default))


def key_values(items: list[str] | None, flag: str, form: str, reason: str = "bad_option") -> dict[str, str]:
    """Return repeated ``KEY=VALUE`` options as a dict; raise ``reason`` for an item without ``=`` or key."""
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ReasonError(reason, f"{flag} needs {form}, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    """Print a list of flat dicts as a table for people."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = list(rows[0]) if rows else []
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(json.dumps(v, default=_default) if isinstance(v, dict | list) else str(v) for v in row.values()))
    Console().print(table)

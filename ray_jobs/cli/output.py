"""How CLI commands print: JSON for scripts (``--json``), rich tables for people; KEY=VALUE options.

Failures are not printed here: they raise, and :mod:`ray_jobs.cli.errors` prints them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from datetime import date, datetime
from typing import Annotated, Any, TextIO

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


_json_out: TextIO | None = None  # the real stdout while json_stdout() is active


@contextmanager
def json_stdout(enabled: bool = True) -> Iterator[None]:
    """Keep stdout for the JSON object alone: meanwhile, whatever else writes to stdout goes to stderr.

    Libraries log to stdout (LLaMA-Factory's logger, transformers' warnings, subprocesses), so
    the redirect is at the file-descriptor level; :func:`emit_json` writes to the saved stdout.
    """
    global _json_out
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    _json_out = os.fdopen(saved, "w")
    try:
        with redirect_stdout(sys.stderr):  # for a sys.stdout not backed by fd 1 (an embedding app's)
            yield
    finally:
        sys.stdout.flush()
        _json_out.flush()
        os.dup2(saved, 1)
        _json_out.close()
        _json_out = None


def emit_json(value: Any) -> None:
    """Print ``value`` as one line of JSON on stdout (the real one while :func:`json_stdout` is active)."""
    out = _json_out or sys.stdout
    out.write(json.dumps(value, default=_default) + "\n")
    out.flush()


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

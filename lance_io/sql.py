"""Literals for Lance's SQL filters, quoted so that any string value is data, never syntax."""

from __future__ import annotations

from collections.abc import Iterable


def sql_string(value: str) -> str:
    """Return ``value`` as a SQL string literal (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def sql_strings(values: Iterable[str]) -> str:
    """Return ``values`` as a comma-separated list of SQL string literals, for ``IN (...)``."""
    return ", ".join(sql_string(v) for v in values)

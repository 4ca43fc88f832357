"""Faithfulness of generated text: which given attribute values it mentions, and the rate over a table.

The fashion article asks for a description that "contains every given attribute". The check
is deterministic and literal, so a flag means what it says: the text and the value are both
lower-cased and split into words at anything that is not a letter or digit (``short_sleeve``,
``short-sleeve`` and ``Short sleeve`` are the same two words); a value is mentioned when its
words occur in the text consecutively and in order, each word exactly or as its plural
(``+s``/``+es``). Synonyms do not count: "tee" does not mention ``t-shirt``.

Example::

    missing_values("A slim-fit cotton shirt with short sleeves.", {"fabric": "cotton", "sleeve": "short_sleeve"})
    # []
    missing_values("A cotton shirt.", {"fabric": "cotton", "pattern": "striped"})
    # ['striped']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """Return the lower-cased words of ``text`` (letters and digits; ``_``, ``-`` and punctuation split)."""
    return _WORD.findall(text.casefold())


def _same(text_word: str, value_word: str) -> bool:
    return text_word in (value_word, value_word + "s", value_word + "es")


def mentions(text: str, value: str) -> bool:
    """Return whether ``text`` mentions ``value``: its words, consecutive and in order, singular or plural."""
    wanted, have = words(value), words(text)
    if not wanted:
        return True
    n = len(wanted)
    return any(
        all(_same(have[i + k], wanted[k]) for k in range(n)) for i in range(len(have) - n + 1)
    )


def missing_values(
    text: str, values: Mapping[str, Any], *, unchecked: Iterable[str] = ()
) -> list[str]:
    """Return the values (in input order, once each) that ``text`` does not mention.

    Null values and those in ``unchecked`` (compared by their words: ``none``, ``not
    applicable``) are never required.
    """
    skip = {tuple(words(v)) for v in unchecked}
    out: list[str] = []
    for value in values.values():
        if value is None or tuple(words(str(value))) in skip or str(value) in out:
            continue
        if not mentions(text, str(value)):
            out.append(str(value))
    return out


@dataclass
class FaithfulnessReport:
    """Faithfulness of a generate column: rows checked, rows that omit a value, and the rate."""

    column: str
    checked: int
    unfaithful: int
    omitted: dict[str, int]

    @property
    def rate(self) -> float | None:
        """Share of checked rows whose text mentions every given value (None when none were checked)."""
        return None if not self.checked else round(1 - self.unfaithful / self.checked, 6)

    def as_dict(self) -> dict[str, Any]:
        """Return the report as plain data (for --json and metrics.json)."""
        return {
            "column": self.column,
            "checked": self.checked,
            "unfaithful": self.unfaithful,
            "faithful_rate": self.rate,
            "omitted": dict(self.omitted),
        }


def faithfulness(column: str, missing: Iterable[list[str] | None]) -> FaithfulnessReport:
    """Return the report of a generate column from its ``C_missing`` values (null rows were not generated)."""
    checked = unfaithful = 0
    omitted: dict[str, int] = {}
    for row in missing:
        if row is None:
            continue
        checked += 1
        if row:
            unfaithful += 1
            for value in row:
                omitted[value] = omitted.get(value, 0) + 1
    return FaithfulnessReport(column, checked, unfaithful, dict(sorted(omitted.items(), key=lambda kv: -kv[1])))


def table_faithfulness(
    table: str,
    column: str,
    *,
    version: int | str | None = None,
    where: str | None = None,
    storage_options: dict[str, str] | None = None,
) -> FaithfulnessReport:
    """Return the faithfulness of generate column ``column`` of ``table`` (its ``C_missing``) at ``version``."""
    from lance_io import open_table
    from lance_io.scan import TableReadError, scan_batches
    from ray_jobs.evaluation.job import SCAN_BATCH

    ds = open_table(table, version, storage_options=storage_options)
    if f"{column}_missing" not in ds.schema.names:
        raise TableReadError("column_missing", f"no {column}_missing column: {column!r} was not written by a generate task")
    batches = scan_batches(ds, [f"{column}_missing"], where=where, batch_size=SCAN_BATCH)
    return faithfulness(column, (row for batch in batches for row in batch.column(0).to_pylist()))

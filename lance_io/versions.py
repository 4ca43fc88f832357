"""Versions for data scientists: what each version did, tags, restore, diff, cleanup.

Every lancetag write stores its job parameters in the transaction of the version it creates
(``lancetag.*`` properties), so the history reads as ingest -> label -> train -> re-label.

Example::

    from lance_io.versions import list_versions, tag_version, diff_versions
    for v in list_versions(uri): print(v.version, v.operation, v.properties.get("lancetag.job"))
    tag_version(uri, "zero-shot", 12)
    diff_versions(uri, "zero-shot", "fine-tuned", column="attrs").changed  # rows, any attribute
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import lance
import pyarrow as pa

from lance_io.labels import answer_columns_in
from lance_io.reasons import ReasonError
from lance_io.schema import ID
from lance_io.table import open_table

RUN_KEY_PREFIX = "lancetag.run."


@dataclass(frozen=True)
class VersionInfo:
    """One version of a table: when, what operation, with which job parameters, its tags."""

    version: int
    timestamp: datetime
    operation: str
    rows: int
    properties: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ColumnDiff:
    """How one column differs between two versions, on the rows present in both."""

    column: str
    before: dict[str | None, int]
    after: dict[str | None, int]
    changed: int
    changed_ids: list[str]


@dataclass(frozen=True)
class VersionDiff:
    """Rows added and removed between two versions and, for a label column, how its answers changed.

    ``columns`` holds one :class:`ColumnDiff` per answer column under the compared prefix (one
    for classify/score/caption, one per attribute); ``changed`` counts the rows present in both
    versions whose value changed in any of them.
    """

    before: int
    after: int
    added: int
    removed: int
    added_ids: list[str]
    removed_ids: list[str]
    columns: list[ColumnDiff] = field(default_factory=list)
    changed: int = 0
    changed_ids: list[str] = field(default_factory=list)


def _tags_by_version(ds: lance.LanceDataset) -> dict[int, list[str]]:
    by_version: dict[int, list[str]] = {}
    for name, tag in ds.tags.list().items():
        by_version.setdefault(tag["version"], []).append(name)
    return by_version


def _run_properties(transaction: object) -> dict[str, str]:
    """Job summaries stored by :func:`record_run`, flattened to ``lancetag.*`` properties."""
    updates = getattr(getattr(getattr(transaction, "operation", None), "table_metadata_updates", None), "updates", None)
    properties: dict[str, str] = {}
    for key, value in (updates or {}).items():
        if key.startswith(RUN_KEY_PREFIX) and value:
            summary = json.loads(value)
            properties["lancetag.run"] = key.removeprefix(RUN_KEY_PREFIX)
            properties.update({f"lancetag.{k}": str(v) for k, v in summary.items()})
    return properties


def list_versions(
    uri: str, *, last: int | None = None, storage_options: dict[str, str] | None = None
) -> list[VersionInfo]:
    """Return the table's versions (the newest ``last`` of them, or all), oldest first, with operation, job properties and tags.

    Each version's transaction is one read: at 1,500 versions listing all of them takes seconds,
    the newest 50 a fraction of one.
    """
    ds = open_table(uri, storage_options=storage_options)
    tags = _tags_by_version(ds)
    infos = []
    everything = ds.versions()
    for v in everything[-last:] if last else everything:
        number = v["version"]
        try:
            transaction = ds.read_transaction(number)
            operation = type(transaction.operation).__name__ if transaction else "unknown"
        except TypeError:  # pylance 14.0.2 cannot read a compaction that remapped an index (lancetag maintain)
            transaction, operation = None, "Rewrite"
        properties = dict(transaction.transaction_properties or {}) if transaction else {}
        properties.update(_run_properties(transaction))
        infos.append(
            VersionInfo(
                version=number,
                timestamp=v["timestamp"],
                operation=operation,
                rows=int(v["metadata"].get("total_rows", 0)),
                properties=properties,
                tags=sorted(tags.get(number, [])),
            )
        )
    return infos


def record_run(
    uri: str, run_id: str, summary: dict[str, object], *, storage_options: dict[str, str] | None = None
) -> int:
    """Store a job's parameters and counts in the table as a new version; return that version.

    The summary is kept under the table metadata key ``lancetag.run.<run_id>`` and shows in
    :func:`list_versions` as that version's ``properties``.
    """
    ds = open_table(uri, storage_options=storage_options)
    ds.update_metadata({f"{RUN_KEY_PREFIX}{run_id}": json.dumps(summary, sort_keys=True, default=str)})
    return open_table(uri, storage_options=storage_options).version


def run_summaries(uri: str, *, storage_options: dict[str, str] | None = None) -> dict[str, dict[str, object]]:
    """Return every recorded job summary of the table, by run id."""
    metadata = open_table(uri, storage_options=storage_options).metadata
    metadata = metadata() if callable(metadata) else metadata
    return {k.removeprefix(RUN_KEY_PREFIX): json.loads(v) for k, v in metadata.items() if k.startswith(RUN_KEY_PREFIX)}


TAG_NAME = re.compile(r"(?!\d+$)(?!\.)(?!.*\.\.)(?!.*\.lock$)[A-Za-z0-9._-]{1,200}")
"""Lance's rule for a tag (letters, digits, '.', '-', '_'; no leading '.', no '..', no '.lock' end),
not all digits (it would read as a version number) and short enough for a file name."""


def tag_name(name: str | None) -> str | None:
    """Return ``name`` if it can be a tag (:data:`TAG_NAME`), else raise ``bad_tag``; so a job checks its tag up front."""
    if name is not None and not TAG_NAME.fullmatch(name):
        raise ReasonError(
            "bad_tag", f"{name[:80]!r} cannot be a tag: use up to 200 letters, digits, '.', '-' and '_', not all digits, "
            "not starting with '.', without '..' or a '.lock' ending"
        )
    return name


def tag_version(
    uri: str, name: str, version: int | None = None, *, storage_options: dict[str, str] | None = None
) -> int:
    """Point tag ``name`` at ``version`` (default: the latest), moving it if it exists; return the version.

    A name :func:`tag_name` refuses is ``bad_tag``.
    """
    tag_name(name)
    ds = open_table(uri, storage_options=storage_options)
    version = ds.version if version is None else int(version)
    if name in ds.tags.list():
        ds.tags.update(name, version)
    else:
        ds.tags.create(name, version)
    return version


def restore_version(uri: str, version: int | str, *, storage_options: dict[str, str] | None = None) -> int:
    """Make ``version`` (number or tag) the latest again, as a new version; return its number."""
    ds = open_table(uri, version, storage_options=storage_options)
    ds.restore()
    return open_table(uri, storage_options=storage_options).version


def _column_by_id(ds: lance.LanceDataset, column: str) -> dict[str, str | None]:
    if column not in ds.schema.names:
        return {}
    table = ds.to_table(columns=[ID, column])
    values = table.column(column)
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
    return dict(zip(table.column(ID).to_pylist(), values.to_pylist(), strict=True))


def diff_versions(
    uri: str,
    before: int | str,
    after: int | str,
    *,
    column: str | None = None,
    max_ids: int = 100,
    storage_options: dict[str, str] | None = None,
) -> VersionDiff:
    """Compare two versions (numbers or tags): rows added/removed and, for ``column``, its changes.

    ``column`` is a label column prefix (:func:`lance_io.labels.answer_columns_in`): ``label``
    compares that column, ``attrs`` compares every ``attrs_<attribute>`` answer column. Only
    ``id`` and those columns are read. Id lists are cut at ``max_ids``; counts are exact.
    """
    a = open_table(uri, before, storage_options=storage_options)
    b = open_table(uri, after, storage_options=storage_options)
    ids_a = set(a.to_table(columns=[ID]).column(ID).to_pylist())
    ids_b = set(b.to_table(columns=[ID]).column(ID).to_pylist())
    added, removed = sorted(ids_b - ids_a), sorted(ids_a - ids_b)
    diffs: list[ColumnDiff] = []
    changed_any: set[str] = set()
    if column is not None:
        # the union of both versions' answer columns: a prefix labeled only in `after` still compares
        answers = {**answer_columns_in(a.schema.names, column), **answer_columns_in(b.schema.names, column)}
        if not answers:
            raise ReasonError(
                "column_missing",
                f"neither version {before} nor {after} of {uri} has a column {column!r} or {column}_<attribute> "
                "answer columns; give the prefix `lancetag label --column` wrote",
            )
        common = ids_a & ids_b
        for name in sorted(answers.values()):
            va, vb = _column_by_id(a, name), _column_by_id(b, name)
            changed = sorted(i for i in common if va.get(i) != vb.get(i))
            changed_any.update(changed)
            diffs.append(
                ColumnDiff(
                    column=name,
                    before=dict(Counter(va.get(i) for i in ids_a).most_common()),
                    after=dict(Counter(vb.get(i) for i in ids_b).most_common()),
                    changed=len(changed),
                    changed_ids=changed[:max_ids],
                )
            )
    return VersionDiff(
        before=a.version,
        after=b.version,
        added=len(added),
        removed=len(removed),
        added_ids=added[:max_ids],
        removed_ids=removed[:max_ids],
        columns=diffs,
        changed=len(changed_any),
        changed_ids=sorted(changed_any)[:max_ids],
    )

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
from dataclasses import dataclass, field
from datetime import datetime

import lance
import pyarrow as pa
import pyarrow.compute as pc

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


DIFF_VALUES = 100
"""Most values a column's distribution lists (a caption column holds a value per row)."""


@dataclass(frozen=True)
class ColumnDiff:
    """How one column differs between two versions: its distribution in each, and its changes on the rows in both.

    ``before``/``after``: rows per value, most first, for the :data:`DIFF_VALUES` values most rows
    hold in the two versions together; ``values_before``/``values_after``: how many distinct values
    each version holds (more than are listed when the lists are cut).
    """

    column: str
    before: dict[str | None, int]
    after: dict[str | None, int]
    values_before: int
    values_after: int
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


def _by_id(ds: lance.LanceDataset, names: list[str], side: str) -> pa.Table:
    """Return ``id``, a ``side`` presence flag and ``names`` (as strings, ``side:<name>``; null where the
    version lacks the column), one row per distinct id (an id held twice keeps its last row)."""
    present = [n for n in names if n in ds.schema.names]
    table = ds.to_table(columns=[ID, *present])
    if pc.count_distinct(table.column(ID)).as_py() < table.num_rows:
        grouped = table.group_by(ID, use_threads=False).aggregate([(n, "last") for n in present])
        table = pa.table({ID: grouped.column(ID), **{n: grouped.column(f"{n}_last") for n in present}})
    columns = {ID: table.column(ID), side: pa.repeat(True, table.num_rows)}
    for n in names:
        values = table.column(n) if n in present else pa.nulls(table.num_rows, pa.string())
        columns[f"{side}:{n}"] = values.cast(pa.large_string())
    return pa.table(columns)


def _sorted_ids(ids: pa.ChunkedArray, limit: int) -> list[str]:
    """Return the first ``limit`` of ``ids`` in sorted order."""
    return ids.take(pc.sort_indices(ids)[:limit]).to_pylist() if limit else []


Distribution = dict[str | None, int]


def _distributions(before: pa.ChunkedArray, after: pa.ChunkedArray) -> tuple[Distribution, Distribution, int, int]:
    """Return rows per value in each version for the :data:`DIFF_VALUES` values most rows hold in both
    together (each dict: the values that version holds, most rows first, ties by value), and how many
    distinct values each version holds."""
    counted = [pc.value_counts(values) for values in (before, after)]
    tables = [pa.table({"value": c.field("values"), side: c.field("counts")}).filter(pc.is_valid(c.field("values")))
              for c, side in zip(counted, ("a", "b"), strict=True)]
    joined = tables[0].join(tables[1], keys="value", join_type="full outer")  # null is no join key: added below
    joined = joined.append_column("rows", pc.add(pc.fill_null(joined.column("a"), 0), pc.fill_null(joined.column("b"), 0)))
    top = joined.take(pc.sort_indices(joined, [("rows", "descending"), ("value", "ascending")])[:DIFF_VALUES])
    rows = {v: (n or 0, m or 0) for v, n, m in zip(*(top.column(c).to_pylist() for c in ("value", "a", "b")), strict=True)}
    if before.null_count or after.null_count:
        rows[None] = (before.null_count, after.null_count)
    listed = sorted(rows, key=lambda v: (-sum(rows[v]), v is None, v))[:DIFF_VALUES]

    def side(k: int) -> Distribution:
        return {v: rows[v][k] for v in sorted(listed, key=lambda v: (-rows[v][k], v is None, v)) if rows[v][k]}

    return side(0), side(1), len(counted[0]), len(counted[1])


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
    ``id`` and those columns are read, and the two versions are joined on ``id`` in Arrow (no
    Python object per row). Id lists are cut at ``max_ids``; counts are exact.
    """
    a = open_table(uri, before, storage_options=storage_options)
    b = open_table(uri, after, storage_options=storage_options)
    names: list[str] = []
    if column is not None:
        # the union of both versions' answer columns: a prefix labeled only in `after` still compares
        answers = {**answer_columns_in(a.schema.names, column), **answer_columns_in(b.schema.names, column)}
        if not answers:
            raise ReasonError(
                "column_missing",
                f"neither version {before} nor {after} of {uri} has a column {column!r} or {column}_<attribute> "
                "answer columns; give the prefix `lancetag label --column` wrote",
            )
        names = sorted(answers.values())
    joined = _by_id(a, names, "a").join(_by_id(b, names, "b"), keys=ID, join_type="full outer")
    in_a, in_b = pc.fill_null(joined.column("a"), False), pc.fill_null(joined.column("b"), False)
    ids, both = joined.column(ID), pc.and_(in_a, in_b)
    added, removed = ids.filter(pc.and_not(in_b, in_a)), ids.filter(pc.and_not(in_a, in_b))
    diffs: list[ColumnDiff] = []
    changed_any = pa.chunked_array([pa.repeat(False, joined.num_rows)])
    for name in names:
        va, vb = joined.column(f"a:{name}"), joined.column(f"b:{name}")
        differs = pc.or_kleene(pc.not_equal(va, vb), pc.xor(pc.is_null(va), pc.is_null(vb)))
        changed = pc.and_(both, pc.fill_null(differs, False))
        changed_any = pc.or_(changed_any, changed)
        changed_ids = ids.filter(changed)
        before_rows, after_rows, values_before, values_after = _distributions(va.filter(in_a), vb.filter(in_b))
        diffs.append(
            ColumnDiff(
                column=name,
                before=before_rows,
                after=after_rows,
                values_before=values_before,
                values_after=values_after,
                changed=len(changed_ids),
                changed_ids=_sorted_ids(changed_ids, max_ids),
            )
        )
    changed_ids = ids.filter(changed_any)
    return VersionDiff(
        before=a.version,
        after=b.version,
        added=len(added),
        removed=len(removed),
        added_ids=_sorted_ids(added, max_ids),
        removed_ids=_sorted_ids(removed, max_ids),
        columns=diffs,
        changed=len(changed_ids),
        changed_ids=_sorted_ids(changed_ids, max_ids),
    )

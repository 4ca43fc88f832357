"""`lancetag diff`: what changed between two versions of a table, read a fragment at a time.

Lance versions share fragments: a label run writes new label files for the fragments it touched
and leaves their rows where they were, an append adds fragments, compaction replaces some. So
the two versions are compared fragment by fragment, one fragment held at a time:

- **shared**: the same files for ``id`` and the compared columns, and the same deletions, in
  both versions: the same rows. Nothing to compare; their values are counted once, for both
  distributions (without ``column``, not even read).
- **in place**: the same ``id`` file and row count: each row keeps its address, so the rows
  both versions hold are compared row for row. A row only one of them holds (deleted, or
  rewritten elsewhere by an update) joins the moved rows.
- **moved**: the rows of fragments one version holds and the other does not (appended,
  compacted, deleted whole), and those above. They are matched by id, the k-th row of an id in
  one version with its k-th row in the other; the rest are added or removed. These alone are
  held together, so memory follows what moved, not the table; past :data:`MATCH_ROWS` (a
  compaction moves every row it rewrites) they are split by a hash of the id into buckets, files
  of a temporary folder, and matched a bucket at a time.

Everything is counted in rows (an id two rows hold is two rows); id lists hold distinct ids,
sorted, cut at ``max_ids``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lance_io.labels import answer_columns_in
from lance_io.reasons import ReasonError
from lance_io.scan import require_columns
from lance_io.schema import ID, id_hashes
from lance_io.table import open_table

DIFF_VALUES = 100
"""Most values a column's distribution lists (a caption column holds a value per row)."""
READ_ROWS = 131_072
"""Rows read (and held) at a time: fragments are read together until they hold this many."""
IO_BUFFER = 16 * 2**20
"""Bytes Lance reads ahead (its default buffers hundreds of MB on fragments of a million rows)."""
MATCH_ROWS = 250_000
"""Moved rows (of both versions together) matched by id at once; more are split into buckets by id."""
MAX_BUCKETS = 256
"""Most buckets (two files each, open while the rows are split): past 64M moved rows, buckets hold more."""
ADDRESS = "_rowaddr"
TEXT = pa.large_string()


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


class _Ids:
    """Rows counted, and the first ``limit`` of their distinct ids in sorted order."""

    def __init__(self, limit: int) -> None:
        self.rows, self.limit, self.first = 0, limit, pa.array([], TEXT)

    def add(self, ids: pa.ChunkedArray) -> None:
        self.rows += len(ids)
        if self.limit and len(ids):
            merged = pc.unique(pa.concat_arrays([self.first, *ids.cast(TEXT).chunks]))
            self.first = merged.take(pc.bottom_k_unstable(merged, min(self.limit, len(merged))))

    def sorted(self) -> list[str]:
        return self.first.take(pc.sort_indices(self.first)).to_pylist()


class _Counts:
    """Rows per value of one column in one version, a batch at a time (piled up in Arrow, summed now and then)."""

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []

    def add(self, values: pa.ChunkedArray) -> None:
        counted = pc.value_counts(values)
        self.parts.append(pa.table({"value": counted.field("values"), "rows": counted.field("counts")}))
        if len(self.parts) > 64:
            self.parts = [self.table()]

    def table(self) -> pa.Table:
        if len(self.parts) == 1:  # counted in one go: each value once already
            return self.parts[0]
        parts = self.parts or [pa.table({"value": pa.array([], TEXT), "rows": pa.array([], pa.int64())})]
        summed = pa.concat_tables(parts).group_by("value").aggregate([("rows", "sum")])
        return pa.table({"value": summed.column("value"), "rows": summed.column("rows_sum")})


Distribution = dict[str | None, int]


def _distributions(before: pa.Table, after: pa.Table) -> tuple[Distribution, Distribution]:
    """Return rows per value in each version for the :data:`DIFF_VALUES` values most rows hold in both
    together; each dict lists the values that version holds, most rows first, ties by value."""
    valid = [t.filter(pc.is_valid(t.column("value"))) for t in (before, after)]
    joined = valid[0].rename_columns(["value", "a"]).join(valid[1].rename_columns(["value", "b"]), keys="value",
                                                          join_type="full outer")  # null is no join key: added below
    joined = joined.append_column("rows", pc.add(pc.fill_null(joined.column("a"), 0), pc.fill_null(joined.column("b"), 0)))
    top = joined.take(pc.sort_indices(joined, [("rows", "descending"), ("value", "ascending")])[:DIFF_VALUES])
    rows = {v: (n or 0, m or 0) for v, n, m in zip(*(top.column(c).to_pylist() for c in ("value", "a", "b")), strict=True)}
    nulls = [pc.sum(t.filter(pc.is_null(t.column("value"))).column("rows")).as_py() or 0 for t in (before, after)]
    if any(nulls):
        rows[None] = (nulls[0], nulls[1])
    listed = sorted(rows, key=lambda v: (-sum(rows[v]), v is None, v))[:DIFF_VALUES]

    def side(k: int) -> Distribution:
        return {v: rows[v][k] for v in sorted(listed, key=lambda v: (-rows[v][k], v is None, v)) if rows[v][k]}

    return side(0), side(1)


class _Tally:
    """What the diff has counted so far: rows added, removed and changed, and each version's values."""

    def __init__(self, names: list[str], max_ids: int) -> None:
        self.names = names
        self.added, self.removed, self.changed_any = _Ids(max_ids), _Ids(max_ids), _Ids(max_ids)
        self.changed = {n: _Ids(max_ids) for n in names}
        self.before = {n: _Counts() for n in names}
        self.after = {n: _Counts() for n in names}

    def count(self, before: pa.Table | None, after: pa.Table | None) -> None:
        """Add rows of each version to its distributions (the same table for both: a shared fragment)."""
        for n in self.names:
            if before is not None:
                self.before[n].add(before.column(n))
            if after is not None:
                self.after[n].add(after.column(n))

    def in_place(self, a: pa.Table, b: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Compare the rows of in-place fragments that both versions hold (the same row address); return the
        rows only ``a`` (the version before) holds and those only ``b`` holds: deleted, or moved elsewhere."""
        if a.column(ADDRESS).equals(b.column(ADDRESS)):  # no row deleted on either side: row for row
            self._changes(b.column(ID), [(a.column(n), b.column(n)) for n in self.names])
            return a.slice(0, 0), b.slice(0, 0)
        in_b = pc.is_in(a.column(ADDRESS), value_set=b.column(ADDRESS))
        in_a = pc.is_in(b.column(ADDRESS), value_set=a.column(ADDRESS))
        both_a, both_b = a.filter(in_b), b.filter(in_a)  # the same addresses, in the same (scan) order
        self._changes(both_b.column(ID), [(both_a.column(n), both_b.column(n)) for n in self.names])
        return a.filter(pc.invert(in_b)), b.filter(pc.invert(in_a))

    def by_id(self, a: pa.Table, b: pa.Table) -> None:
        """Match rows that moved by id, an id's k-th row in ``a`` with its k-th in ``b``; count the changes of
        the matched ones, the rest of ``a`` as removed and of ``b`` as added."""
        matched = _matched_by_hash(a, b)
        if matched is not None:
            in_a, in_b = matched
            both_a, both_b = a.take(in_a), b.take(in_b)
            self._changes(both_b.column(ID), [(both_a.column(n), both_b.column(n)) for n in self.names])
            self.removed.add(a.column(ID).filter(_left_out(in_a, a.num_rows)))
            self.added.add(b.column(ID).filter(_left_out(in_b, b.num_rows)))
            return
        keys = [ID, "k"]
        joined = _flagged(_with_occurrence(a), "a", keys).join(_flagged(_with_occurrence(b), "b", keys), keys=keys,
                                                                join_type="full outer")
        in_a, in_b = pc.fill_null(joined.column("a"), False), pc.fill_null(joined.column("b"), False)
        both = pc.and_(in_a, in_b)
        self._changes(joined.column(ID).filter(both),
                      [(joined.column(f"a:{n}").filter(both), joined.column(f"b:{n}").filter(both)) for n in self.names])
        self.removed.add(joined.column(ID).filter(pc.and_not(in_a, in_b)))
        self.added.add(joined.column(ID).filter(pc.and_not(in_b, in_a)))

    def _changes(self, ids: pa.ChunkedArray, values: list[tuple[pa.ChunkedArray, pa.ChunkedArray]]) -> None:
        """Count the rows whose value differs between the versions, per column and in any."""
        changed_any = pa.chunked_array([pa.repeat(False, len(ids))])
        for n, (va, vb) in zip(self.names, values, strict=True):
            changed = pc.fill_null(pc.or_kleene(pc.not_equal(va, vb), pc.xor(pc.is_null(va), pc.is_null(vb))), False)
            self.changed[n].add(ids.filter(changed))
            changed_any = pc.or_(changed_any, changed)
        self.changed_any.add(ids.filter(changed_any))

    def result(self, before: int, after: int) -> VersionDiff:
        columns = []
        for n in self.names:
            counts_before, counts_after = self.before[n].table(), self.after[n].table()
            rows_before, rows_after = _distributions(counts_before, counts_after)
            columns.append(ColumnDiff(n, rows_before, rows_after, counts_before.num_rows, counts_after.num_rows,
                                      self.changed[n].rows, self.changed[n].sorted()))
        return VersionDiff(before, after, self.added.rows, self.removed.rows, self.added.sorted(), self.removed.sorted(),
                           columns, self.changed_any.rows, self.changed_any.sorted())


class _Moved:
    """The rows that moved, pooled for the match by id: held, or, when more than :data:`MATCH_ROWS` may
    come, split by a hash of the id into as many buckets (files of a temporary folder) as keep each
    below it. All rows of an id fall in one bucket, so a bucket is matched on its own."""

    def __init__(self, expected_rows: int, empty: tuple[pa.Table, pa.Table]) -> None:
        self.buckets = min(MAX_BUCKETS, max(1, -(-expected_rows // MATCH_ROWS)))
        self.empty = empty
        self.held: tuple[list[pa.Table], list[pa.Table]] = ([], [])
        self.rows = [0, 0]
        self.folder = tempfile.TemporaryDirectory(prefix="lancetag-diff-") if self.buckets > 1 else None
        self.writers: dict[tuple[int, int], pa.ipc.RecordBatchFileWriter] = {}

    def add(self, side: int, rows: pa.Table) -> None:
        """Pool ``rows`` of the version before (``side`` 0) or after (1)."""
        if not rows.num_rows:  # an empty slice would keep its table's buffers alive
            return
        self.rows[side] += rows.num_rows
        if self.folder is None:
            self.held[side].append(rows)
            return
        bucket = id_hashes(rows.column(ID)) % self.buckets
        rows = rows.take(np.argsort(bucket, kind="stable"))
        start = 0
        for b, count in enumerate(np.bincount(bucket, minlength=self.buckets)):
            if count:
                if (side, b) not in self.writers:
                    self.writers[side, b] = pa.ipc.new_file(self._path(side, b), rows.schema)
                self.writers[side, b].write_table(rows.slice(start, count))
            start += count

    def pairs(self) -> Iterator[tuple[pa.Table, pa.Table]]:
        """Each bucket's rows of both versions (one pair when held), the folder removed after the last."""
        if self.folder is None:
            yield pa.concat_tables([self.empty[0], *self.held[0]]), pa.concat_tables([self.empty[1], *self.held[1]])
            return
        for writer in self.writers.values():
            writer.close()
        with self.folder:
            for b in range(self.buckets):
                yield self._read(0, b), self._read(1, b)

    def _path(self, side: int, bucket: int) -> Path:
        return Path(self.folder.name) / f"{side}-{bucket}.arrow"

    def _read(self, side: int, bucket: int) -> pa.Table:
        if (side, bucket) not in self.writers:
            return self.empty[side]
        with pa.OSFile(str(self._path(side, bucket))) as source:
            return pa.ipc.open_file(source).read_all()


def _flagged(rows: pa.Table, side: str, keys: list[str]) -> pa.Table:
    """``rows`` for a join: the keys as they are, the values named ``side:<name>``, a ``side`` flag."""
    others = {f"{side}:{n}": rows.column(n) for n in rows.column_names if n not in keys and n != ADDRESS}
    return pa.table({**{k: rows.column(k) for k in keys}, **others, side: pa.repeat(True, rows.num_rows)})


def _scan(ds: lance.LanceDataset, fragment_ids: list[int], names: list[str], *, keys: bool = True) -> Iterator[pa.Table]:
    """``names`` (as text; null where this version lacks the column) of some fragments' rows, after
    their ``id`` and row address unless not ``keys``, about :data:`READ_ROWS` rows at a time."""
    present = [n for n in names if n in ds.schema.names]
    columns = [ID, *present] if keys else present

    def as_text(rows: pa.Table) -> pa.Table:
        table = {ID: rows.column(ID)} if keys else {}
        for n in names:
            table[n] = rows.column(n).cast(TEXT) if n in present else pa.nulls(rows.num_rows, TEXT)
        if keys:
            table[ADDRESS] = rows.column(ADDRESS)
        return pa.table(table)

    if not fragment_ids:  # an empty list of fragments would scan them all
        yield as_text(ds.scanner(columns=columns, with_row_address=keys, limit=0).to_table())
        return
    fragments = [ds.get_fragment(i) for i in fragment_ids]
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in ds.scanner(columns=columns, fragments=fragments, with_row_address=keys, scan_in_order=True,
                            batch_size=READ_ROWS, io_buffer_size=IO_BUFFER).to_batches():
        pending.append(batch)
        rows += batch.num_rows
        if rows >= READ_ROWS:
            yield as_text(pa.Table.from_batches(pending))
            pending, rows = [], 0
    if pending:
        yield as_text(pa.Table.from_batches(pending))


def _read(ds: lance.LanceDataset, fragment_ids: list[int], names: list[str]) -> pa.Table:
    """:func:`_scan`'s rows in one table."""
    return pa.concat_tables(_scan(ds, fragment_ids, names))


def _matched_by_hash(a: pa.Table, b: pa.Table) -> tuple[np.ndarray, np.ndarray] | None:
    """The positions in ``a`` and ``b`` of the rows whose ids match, found by sorting the ids' hashes, when
    each side holds every hash once (every id once, as lancetag's tables do); None when a hash repeats or
    an id is null: those rows are matched by a join. Two ids of one hash are told apart by comparing them."""
    if a.column(ID).null_count or b.column(ID).null_count:
        return None
    hashes_a, hashes_b = id_hashes(a.column(ID)), id_hashes(b.column(ID))
    order_a = np.argsort(hashes_a, kind="stable")
    sorted_a, sorted_b = hashes_a[order_a], np.sort(hashes_b)
    if (sorted_a[1:] == sorted_a[:-1]).any() or (sorted_b[1:] == sorted_b[:-1]).any():
        return None
    at = np.minimum(np.searchsorted(sorted_a, hashes_b), max(len(sorted_a) - 1, 0))
    in_b = np.flatnonzero(sorted_a[at] == hashes_b) if len(sorted_a) else np.empty(0, np.int64)
    in_a = order_a[at[in_b]]
    same = pc.equal(a.column(ID).take(in_a), b.column(ID).take(in_b)).to_numpy()  # else two ids, one hash: neither has a match
    return in_a[same], in_b[same]


def _left_out(taken: np.ndarray, rows: int) -> pa.Array:
    """A mask of the ``rows`` positions not in ``taken``."""
    mask = np.ones(rows, dtype=bool)
    mask[taken] = False
    return pa.array(mask)


def _with_occurrence(rows: pa.Table) -> pa.Table:
    """Add ``k``: 0 for an id's first row (by row address), 1 for its second, ..."""
    order = pc.sort_indices(rows, [(ID, "ascending"), (ADDRESS, "ascending")])
    ids = rows.column(ID).take(order).to_numpy(zero_copy_only=False)
    starts = np.ones(len(ids), dtype=bool)
    starts[1:] = ids[1:] != ids[:-1]
    positions = np.arange(len(ids))
    occurrence = np.empty(len(ids), dtype=np.int64)
    occurrence[order.to_numpy()] = positions - np.maximum.accumulate(np.where(starts, positions, 0))
    return rows.append_column("k", pa.array(occurrence))


def _made_of(fragment: lance.LanceFragment, fields: set[int]) -> tuple:
    """Row count and the file (and column in it) each of ``fields`` is read from: two fragments alike
    in these hold the same values of those fields at the same offsets."""
    meta = fragment.metadata
    where = sorted((field_id, f.path, column) for f in meta.files
                   for field_id, column in zip(f.fields, f.column_indices, strict=True) if field_id in fields)
    return meta.physical_rows, tuple(where)


def _deletions(fragment: lance.LanceFragment) -> object:
    return fragment.metadata.to_json().get("deletion_file")


def _field_ids(ds: lance.LanceDataset, names: list[str]) -> set[int]:
    return {f.id() for f in ds.lance_schema.fields() if f.name() in names}


@dataclass
class _Fragments:
    """The two versions' fragments, sorted by how they can be compared (module docstring), in table order."""

    shared: list[int]
    in_place: list[int]
    moved_before: list[int]
    moved_after: list[int]
    moved_rows: int = 0
    """At most how many rows moved: the live rows of moved fragments, the deletions in-place fragments differ by."""


def _sort_fragments(a: lance.LanceDataset, b: lance.LanceDataset, names: list[str]) -> _Fragments:
    in_a = {f.fragment_id: f for f in a.get_fragments()}
    in_b = {f.fragment_id: f for f in b.get_fragments()}
    id_field = _field_ids(a, [ID]) | _field_ids(b, [ID])
    compared = _field_ids(a, names) | _field_ids(b, names) | id_field
    sorted_ = _Fragments([], [], [], [])
    for i, fb in in_b.items():
        fa = in_a.get(i)
        if fa is None or fa.metadata.overlays or fb.metadata.overlays or _made_of(fa, id_field) != _made_of(fb, id_field):
            continue
        alike = _made_of(fa, compared) == _made_of(fb, compared) and _deletions(fa) == _deletions(fb)
        (sorted_.shared if alike else sorted_.in_place).append(i)
    matched = set(sorted_.shared) | set(sorted_.in_place)
    sorted_.moved_before = [i for i in in_a if i not in matched]
    sorted_.moved_after = [i for i in in_b if i not in matched]
    sorted_.moved_rows = (sum(in_a[i].metadata.num_rows for i in sorted_.moved_before)
                          + sum(in_b[i].metadata.num_rows for i in sorted_.moved_after)
                          + sum(abs(in_a[i].metadata.num_deletions - in_b[i].metadata.num_deletions) for i in sorted_.in_place))
    return sorted_


def _chunks(ds: lance.LanceDataset, fragment_ids: list[int]) -> Iterator[list[int]]:
    """Consecutive runs of ``fragment_ids`` of about :data:`READ_ROWS` rows: what is read and held at a time."""
    rows_in = {f.fragment_id: f.metadata.physical_rows for f in ds.get_fragments()}
    chunk: list[int] = []
    rows = 0
    for i in fragment_ids:
        chunk.append(i)
        rows += rows_in[i]
        if rows >= READ_ROWS:
            yield chunk
            chunk, rows = [], 0
    if chunk:
        yield chunk


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
    ``id`` and those columns are read, a fragment at a time (module docstring). Id lists are cut
    at ``max_ids``; counts are exact.
    """
    a = open_table(uri, before, storage_options=storage_options)
    b = open_table(uri, after, storage_options=storage_options)
    require_columns(a, [ID], uri=uri)  # rows are told apart by id
    require_columns(b, [ID], uri=uri)
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
    tally = _Tally(names, max_ids)
    fragments = _sort_fragments(a, b, names)
    if names:
        for rows in _scan(b, fragments.shared, names, keys=False):
            tally.count(rows, rows)
    moved = _Moved(fragments.moved_rows, (_read(a, [], names), _read(b, [], names)))
    for chunk in _chunks(b, fragments.in_place):
        rows = _read(a, chunk, names), _read(b, chunk, names)
        tally.count(*rows)
        for side, left in enumerate(tally.in_place(*rows)):
            moved.add(side, left)
    # a version whose moved rows are none leaves nothing for the other's to match (an append): counted as they are read
    removed_all = not fragments.moved_after and not moved.rows[1]
    added_all = not fragments.moved_before and not moved.rows[0]
    for rows in _scan(a, fragments.moved_before, names):
        tally.count(rows, None)
        if removed_all:
            tally.removed.add(rows.column(ID))
        else:
            moved.add(0, rows)
    for rows in _scan(b, fragments.moved_after, names):
        tally.count(None, rows)
        if added_all:
            tally.added.add(rows.column(ID))
        else:
            moved.add(1, rows)
    for rows_a, rows_b in moved.pairs():
        tally.by_id(rows_a, rows_b)
    return tally.result(a.version, b.version)

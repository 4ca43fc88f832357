"""Table maintenance: compact small fragments, index new rows, drop old versions and orphan files.

A table that is appended to and labeled for months collects: small fragments (each small
append is one), rows the ``id`` index does not cover yet (appends after its creation), one
manifest per commit (a label run commits per fragment) plus the data files only old versions
use (a label commit replaces a fragment's label file; compaction replaces whole fragments),
and files no version references at all (what a killed writer leaves in ``data/``). Nothing in
Lance removes any of it by default. :func:`maintain_table` does, in this order:

0. **duplicates**: a table whose ``id`` is declared not nullable (an images or samples table:
   the id is a content hash) holds each id once. Writers check before they commit and repair a
   raced append right after it (``table.drop_concurrent_duplicates``); a writer killed between
   the two leaves the later copy. This step deletes every copy but the one at the lowest row
   address (the first committed, short of compaction), in one commit. It reads the ``id``
   column twice and holds 8 bytes per row (a hash of each id), never the ids themselves.
1. **index**: ``optimize_indices`` folds unindexed rows into the indexes (the ``id`` BTREE).
   First, because Lance never merges an indexed fragment with an unindexed one.
2. **compact**: fragments smaller than ``target_rows_per_fragment`` are merged (Lance
   ``Compaction.plan``), each task committed on its own. A task that a concurrent label
   commit touched conflicts and is planned again (``attempts`` rounds); the label side
   relocates its rows by ``id``. Only Lance operations are used, no knowledge of any job.
   Rows are read as many as make about 64 MB, at most 64 (``lance_io.scan.rows_per_batch``):
   Lance writes each batch as a page, and a later scan holds a page at a time.
3. **versions**: removes versions that are older than ``older_than`` and not among the last
   ``retain_versions``, never the latest, a tagged version, a version pinned by a registered
   LLaMA-Factory dataset (``dataset_info.json`` of ``dataset_dirs``) or named in a training
   lineage file (``protect_lineage``). Only the removable versions are passed to Lance
   (``cleanup_old_versions(versions=[...])``), so nothing else can go.
4. **orphans**: deletes files in ``data/`` that no remaining version references and that were
   last modified more than ``orphan_age`` ago. A writer running right now also has
   unreferenced files (written, not yet committed): the age is what keeps them safe, so it
   must exceed the longest time any writer keeps a written file uncommitted.

``older_than`` must likewise exceed how long a writer or reader holds a version open: a commit
whose read version was removed fails. Run one maintenance at a time per table.

Example::

    from lance_io.maintenance import maintain_table
    report = maintain_table("/data/hotel.lance", dataset_dirs=["data/"], protect_lineage=["runs/a"])
    report.versions_removed, report.bytes_freed, report.protected
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import lance
import numpy as np
from lance.optimize import Compaction
from pyarrow import fs as pafs

from lance_io.image_size import LINEAGE_FILE
from lance_io.reasons import ReasonError
from lance_io.scan import rows_per_batch
from lance_io.schema import ID, id_hashes
from lance_io.storage import table_filesystem
from lance_io.table import DEFAULT_MAX_ROWS_PER_FILE, open_table

DATASET_INFO = "dataset_info.json"  # LLaMA-Factory's dataset registry file
COMPACTION_BATCH_ROWS = 64
"""Most rows read per batch while compacting; fewer when they are large (lance #2263: compaction memory)."""


@dataclass(frozen=True)
class MaintenanceReport:
    """What :func:`maintain_table` did; ``protected`` maps a kept version to why it was kept."""

    table: str
    version_before: int
    version_after: int
    fragments_before: int
    fragments_after: int
    duplicate_rows_removed: int = 0
    fragments_compacted: int = 0
    fragments_written: int = 0
    files_compacted: int = 0
    compaction_conflicts: int = 0
    index_optimized: bool = False
    unindexed_rows_before: int = 0
    unindexed_rows_after: int = 0
    versions_removed: int = 0
    versions_kept: int = 0
    orphan_files_removed: int = 0
    orphan_files_too_young: int = 0
    bytes_freed: int = 0
    protected: dict[int, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict (``lancetag maintain --json``)."""
        out = asdict(self)
        out["protected"] = {str(v): why for v, why in sorted(self.protected.items())}
        return out


def _same_table(a: str, b: str) -> bool:
    """Whether two table URIs name the same table (local paths compared after resolving)."""
    a, b = a.removeprefix("file://").rstrip("/"), b.removeprefix("file://").rstrip("/")
    if "://" in a or "://" in b:
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def _read_json(path: Path, what: str) -> Any:
    """Read a JSON file the caller pointed at; refuse (never guess) when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReasonError(
            f"bad_{what}", f"cannot read {path}: {exc}; fix or drop it (the versions it pins must not be guessed)"
        ) from None


def pinned_versions(
    uri: str,
    tags: dict[str, int],
    *,
    dataset_dirs: Sequence[str | Path] = (),
    lineage: Sequence[str | Path] = (),
) -> tuple[dict[int, list[str]], list[str]]:
    """Return (version -> reasons it is pinned, warnings) from dataset registries and lineage files.

    A ``dataset_info.json`` entry pins its ``lance`` block's ``version`` or ``tag`` when its
    ``uri`` is this table; a lineage file (or a folder holding ``lancetag_lineage.json``) pins
    every ``datasets[].version`` of this table. Entries without a version read the latest.
    """
    pins: dict[int, list[str]] = {}
    warnings: list[str] = []

    def pin(version: Any, tag: Any, why: str) -> None:
        if isinstance(version, int) and not isinstance(version, bool):
            pins.setdefault(version, []).append(why)
        elif isinstance(tag, str) and tag:
            if tag in tags:
                pins.setdefault(tags[tag], []).append(f"{why} (tag {tag})")
            else:
                warnings.append(f"{why} reads tag {tag!r}, which the table does not have")

    for folder in dataset_dirs:
        path = Path(folder) / DATASET_INFO if Path(folder).is_dir() else Path(folder)
        info = _read_json(path, "dataset_info")
        for name, entry in (info.items() if isinstance(info, dict) else ()):
            block = entry.get("lance") if isinstance(entry, dict) else None
            if isinstance(block, dict) and _same_table(str(block.get("uri", "")), uri):
                pin(block.get("version"), block.get("tag"), f"dataset {name} ({path})")
    for item in lineage:
        path = Path(item) / LINEAGE_FILE if Path(item).is_dir() else Path(item)
        record = _read_json(path, "lineage")
        for used in record.get("datasets", []) if isinstance(record, dict) else ():
            if isinstance(used, dict) and _same_table(str(used.get("uri", "")), uri):
                pin(used.get("version"), used.get("tag"), f"lineage {path} (dataset {used.get('dataset')})")
    return pins, warnings


def _is_conflict(exc: BaseException) -> bool:
    return "conflict" in str(exc).lower() or "preempted" in str(exc).lower()


def compact_fragments(
    uri: str, *, target_rows_per_fragment: int, attempts: int = 3, storage_options: dict[str, str] | None = None
) -> dict[str, int]:
    """Merge fragments below ``target_rows_per_fragment``, one commit per compaction task.

    A task that conflicts with a concurrent commit (a label commit on one of its fragments) is
    planned again, up to ``attempts`` rounds; its written files are left for orphan cleanup.
    Returns fragments removed and written, files removed, and the conflicts left.
    """
    totals = {"fragments_removed": 0, "fragments_added": 0, "files_removed": 0, "conflicts": 0}
    for _ in range(attempts):
        ds = open_table(uri, storage_options=storage_options)
        options = {"target_rows_per_fragment": target_rows_per_fragment,
                   "batch_size": rows_per_batch(ds, most=COMPACTION_BATCH_ROWS)}  # 5 MB photos: 12, not 320 MB pages
        conflicts = 0
        for task in Compaction.plan(ds, options).tasks:
            try:
                rewrite = task.execute(ds)
                metrics = Compaction.commit(open_table(uri, storage_options=storage_options), [rewrite])
            except OSError as exc:
                if not _is_conflict(exc):
                    raise
                conflicts += 1
                continue
            totals["fragments_removed"] += metrics.fragments_removed
            totals["fragments_added"] += metrics.fragments_added
            totals["files_removed"] += metrics.files_removed
        totals["conflicts"] = conflicts
        if conflicts == 0:
            break
    return totals


def remove_duplicate_ids(uri: str, *, storage_options: dict[str, str] | None = None) -> int:
    """Delete every row whose ``id`` a row at a lower address holds; return how many went.

    Only for tables whose ``id`` is declared not nullable (one row per id by design); any other
    table is left alone and 0 returned. Two scans of the ``id`` column: the first keeps a 64-bit
    hash per row and finds the hashes seen twice, the second keeps only the rows with those.
    """
    ds = open_table(uri, storage_options=storage_options)
    field = ds.schema.field(ID) if ID in ds.schema.names else None
    if field is None or field.nullable:
        return 0
    hashes = [id_hashes(batch.column(ID)) for batch in ds.to_batches(columns=[ID])]
    if not hashes:
        return 0
    hashes = np.sort(np.concatenate(hashes))
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    del hashes
    if not len(repeated):
        return 0
    first: dict[str, int] = {}
    later: list[int] = []
    for batch in ds.to_batches(columns=[ID], with_row_address=True):
        candidates = np.isin(id_hashes(batch.column(ID)), repeated)
        for row_id, address in zip(
            batch.column(ID).filter(candidates).to_pylist(),
            batch.column("_rowaddr").filter(candidates).to_pylist(),
            strict=True,
        ):
            kept = first.setdefault(row_id, address)
            if kept != address:
                later.append(max(kept, address))
                first[row_id] = min(kept, address)
    if later:
        ds.delete(f"_rowaddr IN ({', '.join(map(str, sorted(later)))})")
    return len(later)


def _unindexed_rows(ds: lance.LanceDataset) -> int:
    return sum(int(ds.stats.index_stats(idx["name"])["num_unindexed_rows"]) for idx in ds.list_indices())


def _removable_versions(
    ds: lance.LanceDataset, keep: set[int], *, older_than: timedelta, retain_versions: int
) -> list[int]:
    """Versions old enough, not among the last ``retain_versions``, not latest and not in ``keep``."""
    versions = sorted(ds.versions(), key=lambda v: v["version"])
    recent = {v["version"] for v in versions[-max(retain_versions, 1) :]}
    out = []
    for v in versions:
        stamp: datetime = v["timestamp"]
        now = datetime.now(stamp.tzinfo)  # Lance gives local naive times
        if v["version"] not in recent and v["version"] not in keep and now - stamp > older_than:
            out.append(v["version"])
    return out


def _referenced_data_files(uri: str, storage_options: dict[str, str] | None) -> set[str]:
    """Names of the data files any existing version of the table references."""
    ds = open_table(uri, storage_options=storage_options)
    names: set[str] = set()
    for v in ds.versions():
        try:
            old = ds.checkout_version(v["version"])
        except (OSError, ValueError):  # removed meanwhile: its files are garbage anyway
            continue
        for fragment in old.get_fragments():
            names.update(os.path.basename(f.path) for f in fragment.metadata.files)
    return names


def remove_orphan_files(
    uri: str, *, min_age: timedelta, storage_options: dict[str, str] | None = None
) -> tuple[int, int, int]:
    """Delete ``data/`` files no version references, last modified over ``min_age`` ago.

    Returns (files removed, bytes removed, unreferenced files kept because they are younger).
    The listing is taken before the references are read, so a file committed in between counts
    as referenced.
    """
    filesystem, root = table_filesystem(uri, storage_options)
    listing = filesystem.get_file_info(pafs.FileSelector(f"{root}/data", allow_not_found=True))
    files = [f for f in listing if f.type == pafs.FileType.File]
    if not files:
        return 0, 0, 0
    referenced = _referenced_data_files(uri, storage_options)
    cutoff = time.time() - min_age.total_seconds()
    removed = freed = young = 0
    for info in files:
        if info.base_name in referenced:
            continue
        if info.mtime is None or info.mtime.timestamp() > cutoff:
            young += 1
            continue
        filesystem.delete_file(info.path)
        removed += 1
        freed += info.size or 0
    return removed, freed, young


def maintain_table(
    uri: str,
    *,
    retain_versions: int = 10,
    older_than: timedelta = timedelta(days=1),
    protect_lineage: Sequence[str | Path] = (),
    dataset_dirs: Sequence[str | Path] = (),
    compact: bool = True,
    target_rows_per_fragment: int = DEFAULT_MAX_ROWS_PER_FILE,
    orphan_age: timedelta | None = timedelta(hours=1),
    storage_options: dict[str, str] | None = None,
) -> MaintenanceReport:
    """Index new rows, compact small fragments, drop removable old versions and old orphan files; return a report.

    ``dataset_dirs`` are LLaMA-Factory dataset folders (or ``dataset_info.json`` files) and
    ``protect_lineage`` training lineage files (or output folders): the versions they pin are
    never removed, nor are tagged ones. ``orphan_age=None`` leaves unreferenced files alone.
    Safe while ingest and labeling run (see the module docstring for the two ages).
    """
    started = time.perf_counter()
    if retain_versions < 1:
        raise ReasonError("bad_retention", "retain_versions must be at least 1 (the latest version always stays)")
    ds = open_table(uri, storage_options=storage_options)
    version_before, fragments_before = ds.version, len(ds.get_fragments())
    # Read the pins first: a registry that cannot be read stops maintenance before anything changes.
    tags = {name: int(t["version"]) for name, t in ds.tags.list().items()}
    pins, warnings = pinned_versions(uri, tags, dataset_dirs=dataset_dirs, lineage=protect_lineage)
    protected = {v: list(why) for v, why in pins.items()}
    for name, version in tags.items():
        protected.setdefault(version, []).append(f"tag {name}")

    duplicates_removed = 0
    try:
        duplicates_removed = remove_duplicate_ids(uri, storage_options=storage_options)
    except OSError as exc:  # a concurrent commit on the same fragments won; the next run removes them
        if not _is_conflict(exc):
            raise
        warnings.append(f"duplicate ids not removed: {exc}")
    ds = open_table(uri, storage_options=storage_options)
    unindexed_before = _unindexed_rows(ds)
    index_optimized = False
    if ds.list_indices() and unindexed_before:
        try:
            ds.optimize.optimize_indices()
            index_optimized = True
        except OSError as exc:  # a concurrent commit won; the next run indexes these rows
            if not _is_conflict(exc):
                raise
            warnings.append(f"index not optimized: {exc}")

    # After indexing: Lance does not merge indexed fragments with unindexed ones.
    compaction = {"fragments_removed": 0, "fragments_added": 0, "files_removed": 0, "conflicts": 0}
    if compact:
        compaction = compact_fragments(
            uri, target_rows_per_fragment=target_rows_per_fragment, storage_options=storage_options
        )
    ds = open_table(uri, storage_options=storage_options)

    existing = {v["version"] for v in ds.versions()}
    missing = sorted(v for v in pins if v not in existing)
    warnings += [f"version {v} is pinned by {'; '.join(pins[v])} but no longer exists" for v in missing]
    removable = _removable_versions(ds, set(protected), older_than=older_than, retain_versions=retain_versions)
    removed_versions = freed = 0
    if removable:
        stats = ds.cleanup_old_versions(versions=removable, error_if_tagged_old_versions=False)
        removed_versions, freed = stats.old_versions, stats.bytes_removed

    orphans_removed = orphans_young = 0
    if orphan_age is not None:
        orphans_removed, orphan_bytes, orphans_young = remove_orphan_files(
            uri, min_age=orphan_age, storage_options=storage_options
        )
        freed += orphan_bytes

    ds = open_table(uri, storage_options=storage_options)
    return MaintenanceReport(
        table=uri,
        version_before=version_before,
        version_after=ds.version,
        fragments_before=fragments_before,
        fragments_after=len(ds.get_fragments()),
        duplicate_rows_removed=duplicates_removed,
        fragments_compacted=compaction["fragments_removed"],
        fragments_written=compaction["fragments_added"],
        files_compacted=compaction["files_removed"],
        compaction_conflicts=compaction["conflicts"],
        index_optimized=index_optimized,
        unindexed_rows_before=unindexed_before,
        unindexed_rows_after=_unindexed_rows(ds),
        versions_removed=removed_versions,
        versions_kept=len(ds.versions()),
        orphan_files_removed=orphans_removed,
        orphan_files_too_young=orphans_young,
        bytes_freed=freed,
        protected={v: why for v, why in sorted(protected.items()) if v in existing},
        warnings=warnings,
        seconds=round(time.perf_counter() - started, 3),
    )

"""Versions for data scientists: what each version did, tags, restore (the diff: :mod:`lance_io.diff`).

Every lancetag write stores its job parameters in the transaction of the version it creates
(``lancetag.*`` properties), so the history reads as ingest -> label -> train -> re-label.

Example::

    from lance_io.diff import diff_versions
    from lance_io.versions import list_versions, tag_version
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

from lance_io.reasons import ReasonError
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


def _tags_by_version(ds: lance.LanceDataset) -> dict[int, list[str]]:
    by_version: dict[int, list[str]] = {}
    for name, tag in ds.tags.list().items():
        by_version.setdefault(tag["version"], []).append(name)
    return by_version


def _run_properties(transaction: object) -> dict[str, str]:
    """Job summaries stored by :func:`record_run`, flattened to ``lancetag.*`` properties."""
    properties: dict[str, str] = {}
    for key, value in _metadata_updates(transaction).items():
        if key.startswith(RUN_KEY_PREFIX) and value:
            summary = json.loads(value)
            properties["lancetag.run"] = key.removeprefix(RUN_KEY_PREFIX)
            properties.update({f"lancetag.{k}": str(v) for k, v in summary.items()})
    return properties


def list_versions(
    uri: str, *, last: int | None = None, storage_options: dict[str, str] | None = None
) -> list[VersionInfo]:
    """Return the table's versions (the newest ``last`` of them, or all), oldest first, with operation, job properties and tags.

    Each listed version's manifest and transaction are read (a manifest lists every fragment): at
    1,000 versions of a 1M-row table listing all of them takes seconds, the newest 50 under one.
    """
    ds = open_table(uri, storage_options=storage_options)
    tags = _tags_by_version(ds)
    infos = []
    if last:  # the newest versions' numbers without reading a manifest, then only their manifests
        newest = sorted(ref["version"] for ref in ds.version_refs())[-last:]
        listed = [open_table(uri, n, storage_options=storage_options).get_version() for n in newest]
    else:
        listed = ds.versions()
    for v in listed:
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


def recorded_runs(
    uri: str, *, storage_options: dict[str, str] | None = None
) -> dict[str, tuple[int | None, dict[str, object]]]:
    """Return every job summary :func:`record_run` stored, by run id: (the version that stored it, the summary).

    The latest metadata holds every run, but a restore rolls it back: the runs after the restored
    version are read from the transactions of the versions that stored them. The version is None
    for a run whose version ``lancetag maintain`` removed (the metadata keeps its summary).
    """
    ds = open_table(uri, storage_options=storage_options)
    runs: dict[str, tuple[int | None, dict[str, object]]] = {}
    for entry in ds.versions():
        for key, value in _metadata_updates(ds.read_transaction(entry["version"])).items():
            if key.startswith(RUN_KEY_PREFIX) and value:
                runs[key.removeprefix(RUN_KEY_PREFIX)] = (entry["version"], json.loads(value))
    metadata = ds.metadata() if callable(ds.metadata) else ds.metadata
    for key, value in metadata.items():
        if key.startswith(RUN_KEY_PREFIX):
            run = key.removeprefix(RUN_KEY_PREFIX)
            runs[run] = (runs[run][0] if run in runs else None, json.loads(value))
    return runs


def run_summaries(uri: str, *, storage_options: dict[str, str] | None = None) -> dict[str, dict[str, object]]:
    """Return every recorded job summary of the table, by run id (:func:`recorded_runs` without the versions)."""
    return {run: summary for run, (_, summary) in recorded_runs(uri, storage_options=storage_options).items()}


def _metadata_updates(transaction: object) -> dict[str, str]:
    """The table metadata a version's transaction set (``record_run``'s summaries are there)."""
    updates = getattr(getattr(getattr(transaction, "operation", None), "table_metadata_updates", None), "updates", None)
    return dict(updates or {})


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
    """Make ``version`` (number or tag) the latest again, as a new version; return its number.

    The training samples (:mod:`lance_io.samples`) go back with it: those ``version`` had are the
    new version's.
    """
    from lance_io.samples import restore_samples

    ds = open_table(uri, version, storage_options=storage_options)
    old = ds.version  # restore() moves ds to the version it makes
    ds.restore()
    restored = open_table(uri, storage_options=storage_options).version
    restore_samples(uri, old, restored, storage_options=storage_options)
    return restored

"""Read helpers: open a table at a version or tag, scan columns with a filter, list fragments.

Pure Lance (no Ray, no training library): the LLaMA-Factory extension and the jobs read tables
through these so that "which rows of which version" is decided in one place.

Example::

    from lance_io.scan import open_at, scan_batches
    ds = open_at("/data/photos.lance", "v3")          # a tag, or a version number
    for batch in scan_batches(ds, ["id", "truth"], where="truth IS NOT NULL"):
        ...
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import lance
import pyarrow as pa
from pydantic import AfterValidator

from lance_io.reasons import ReasonError
from lance_io.schema import ID
from lance_io.sql import sql_strings


class TableReadError(ReasonError):
    """A table, version, tag or column that cannot be read; ``reason`` is a stable code."""


# Lance reports I/O and SQL failures as ValueError/OSError whose text is the only clue; these
# markers turn the texts we have met into reasons. Checked in order: the first match wins.
_LANCE_REASONS = (
    ("permission_denied", ("Permission denied", "os error 13", "AccessDenied", "InvalidAccessKeyId",
                           "SignatureDoesNotMatch", "403 Forbidden")),
    ("storage_full", ("No space left", "os error 28")),
    ("storage_unreachable", ("error sending request", "Connection refused", "connection closed", "timed out",
                             "dns error")),
    ("bad_where", ("Error parsing statement", "Error tokenizing statement", "sql parser error", "No field named",
                   "Schema error", "Error parsing function", "Error resolving filter expression",
                   "Error applying filter expression")),
    ("version_not_found", ("Version not found error", "Ref not found error")),
    ("table_not_found", ("was not found", "Not found", "Not a directory", "os error 2)", "os error 20")),
)
_RUST_LOCATION = re.compile(r",\s*/\S+\.rs:\d+:\d+")


def lance_reason(err: BaseException) -> str | None:
    """Return the reason code of a Lance I/O or SQL error we recognise by its text, else None."""
    text = str(err)
    return next((reason for reason, markers in _LANCE_REASONS if any(m in text for m in markers)), None)


def lance_detail(err: BaseException) -> str:
    """Return a Lance error's text on one line, without the Rust source locations it appends."""
    return " ".join(_RUST_LOCATION.sub("", str(err)).split())[:400]


def _open_error(uri: str, err: BaseException) -> TableReadError:
    reason = lance_reason(err)
    detail = lance_detail(err)
    if reason == "permission_denied":
        return TableReadError(
            reason, f"cannot read {uri}: permission denied ({detail}); check the permissions of its folder, "
            "or the bucket's credentials and policy"
        )
    if reason == "storage_unreachable":
        return TableReadError(
            reason, f"cannot reach the object store of {uri} ({detail}); check the endpoint "
            "(storage options, $LANCETAG_STORAGE_OPTIONS) and that the store is up, then rerun"
        )
    return TableReadError(
        "table_not_found", f"no Lance table at {uri} ({detail}); check the path, or create the table with "
        f"`lancetag ingest SOURCE --table {uri}`"
    )


def one_predicate(where: str | None) -> str | None:
    """Return ``where`` unchanged; :class:`TableReadError` (``bad_where``) if a ``;`` outside quotes ends it early.

    Lance parses ``WHERE <where>`` as statements and keeps the first without a word: ``a = 1; b = 2``
    would select on ``a = 1`` alone.
    """
    quote = None
    for at, char in enumerate(where or ""):
        if quote:
            quote = None if char == quote else quote  # '' inside a string closes and reopens it
        elif char in "'\"`":
            quote = char
        elif char == ";" and where[at + 1 :].strip():  # type: ignore[index]
            raise TableReadError(
                "bad_where", f"{where!r} is more than one SQL statement (text after ';'); give one predicate, "
                "joining conditions with AND or OR"
            )
    return where


Predicate = Annotated[str | None, AfterValidator(one_predicate)]
"""The type of a model's ``where`` field: one SQL predicate (checked by :func:`one_predicate`), or None."""


@contextmanager
def translated_where(ds: lance.LanceDataset, where: str | None) -> Iterator[None]:
    """Refuse a ``where`` of several statements, and turn Lance's error for an invalid one into
    :class:`TableReadError` (``bad_where``)."""
    one_predicate(where)
    try:
        yield
    except (ValueError, OSError) as err:
        if not where or isinstance(err, ReasonError):
            raise
        reason = lance_reason(err)
        if reason != "bad_where" and not (reason is None and "Invalid user input" in str(err)):
            raise
        raise TableReadError(
            "bad_where",
            f"{where!r} is not a valid SQL predicate on {ds.uri} ({lance_detail(err)}); "
            f"columns are {', '.join(ds.schema.names)}",
        ) from err


@dataclass(frozen=True)
class FragmentInfo:
    """One fragment of a table version: its id and physical row count."""

    fragment_id: int
    num_rows: int


def parse_version(ref: int | str | None) -> int | str | None:
    """Return ``ref`` as a version number if it is one (``"7"`` -> 7), else the tag name or None."""
    if ref is None or isinstance(ref, int):
        return ref
    text = str(ref).strip()
    return int(text) if text.isdigit() else text


def open_at(
    uri: str, version: int | str | None = None, *, storage_options: dict[str, str] | None = None
) -> lance.LanceDataset:
    """Open the table at ``uri`` at a version number or tag (latest when None).

    Raises :class:`TableReadError` with reason ``table_not_found``, ``version_not_found``,
    ``permission_denied`` or ``storage_unreachable``.
    """
    ref = parse_version(version)
    try:
        latest = lance.dataset(uri, storage_options=storage_options)
    except (ValueError, OSError) as err:
        raise _open_error(uri, err) from err
    if ref is None:
        return latest
    try:
        return latest.checkout_version(ref)
    except (ValueError, OSError, KeyError) as err:
        known = [v["version"] for v in latest.versions()][-5:]
        tags = sorted(latest.tags.list())
        raise TableReadError(
            "version_not_found",
            f"{uri} has no version {ref!r} (no such version number or tag; latest versions {known}, "
            f"tags {tags}); pick one of them",
        ) from err


def require_columns(ds: lance.LanceDataset, columns: Sequence[str], *, uri: str = "") -> None:
    """Raise :class:`TableReadError` (``column_missing``) unless every column exists in ``ds``."""
    names = set(ds.schema.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise TableReadError(
            "column_missing",
            f"{uri or ds.uri} (version {ds.version}) has no column {', '.join(missing)}; "
            f"columns are {', '.join(ds.schema.names)}",
        )


def check_where(ds: lance.LanceDataset, where: str | None, *, new_columns: Sequence[str] = ()) -> None:
    """Raise :class:`TableReadError` (``bad_where``) unless ``where`` is valid SQL on ``ds`` (plans, reads nothing).

    ``new_columns`` are columns a job adds before it filters (a label run's own columns): a
    predicate may name them although ``ds`` does not have them yet.
    """
    if not where:
        return
    try:
        with translated_where(ds, where):
            ds.scanner(filter=where, columns=[ds.schema.names[0]]).explain_plan()
    except TableReadError as err:
        unknown = re.search(r"No field named ([^\s.]+)", str(err.__cause__))
        if not (unknown and unknown.group(1).strip('"`') in new_columns):
            raise


def list_fragments(ds: lance.LanceDataset) -> list[FragmentInfo]:
    """Return the fragments of this version, in table order."""
    return [FragmentInfo(f.fragment_id, f.count_rows()) for f in ds.get_fragments()]


READ_BATCH_BYTES = 64 * 2**20
"""Bytes of whole rows (images included) a scan holds in one batch: :func:`rows_per_batch`."""


def rows_per_batch(ds: lance.LanceDataset, most: int = 256) -> int:
    """Return how many of ``ds``'s rows make about :data:`READ_BATCH_BYTES`, at most ``most``.

    From the sizes of its data files in the manifest (no read): 256 rows of 1 KB images, about 50 of
    1.3 MB photos, 12 of 5 MB ones. Summing them takes 39 ms at 10,000 fragments, so it is done
    once per version and process: a stream reads one fragment per shard. (A table deleted and
    written again at the same path restarts at version 1; a stale size only misjudges the batch.)
    """
    key = (ds.uri, ds.version)
    if key not in _TABLE_BYTES:
        if len(_TABLE_BYTES) >= 256:
            _TABLE_BYTES.clear()
        fragments = ds.get_fragments()
        _TABLE_BYTES[key] = (sum(f.metadata.physical_rows for f in fragments),
                             sum(d.file_size_bytes or 0 for f in fragments for d in f.data_files()))
    rows, size = _TABLE_BYTES[key]
    return max(1, min(most, READ_BATCH_BYTES * rows // size)) if size and rows else most


_TABLE_BYTES: dict[tuple[str, int], tuple[int, int]] = {}
"""Rows and data file bytes of the versions :func:`rows_per_batch` has seen."""


def scan_batches(
    ds: lance.LanceDataset,
    columns: Sequence[str],
    *,
    where: str | None = None,
    fragment_ids: Sequence[int] | None = None,
    batch_size: int = 256,
) -> Iterator[pa.RecordBatch]:
    """Yield record batches of ``columns`` (rows matching ``where``), optionally of some fragments only."""
    fragments = None
    if fragment_ids is not None:
        fragments = [ds.get_fragment(i) for i in fragment_ids]
        if any(f is None for f in fragments):
            raise TableReadError(
                "fragment_not_found",
                f"{ds.uri} version {ds.version} has no fragment among {list(fragment_ids)}",
            )
    with translated_where(ds, where):
        scanner = ds.scanner(
            columns=list(columns), filter=where, fragments=fragments, batch_size=batch_size, scan_in_order=True
        )
        yield from scanner.to_batches()


ID_LOOKUP = 2000
"""Ids per ``IN (...)`` lookup in :func:`rows_with_ids`: the ``id`` index answers each in one probe."""
TAKE_ROWS = 64
"""Rows whose columns :func:`rows_with_ids` reads at a time: what it holds is this many images, whatever their size."""


def rows_with_ids(
    ds: lance.LanceDataset,
    ids: Sequence[str],
    columns: Sequence[str],
    *,
    where: str | None = None,
    with_row_address: bool = False,
    id_column: str = ID,
) -> Iterator[pa.Table]:
    """Yield ``columns`` of the rows whose ``id_column`` is in ``ids`` (and that match ``where``), ``TAKE_ROWS`` at a time.

    Only those rows' columns are read, so fetching the images of a sample costs the sample, not the
    table. Each lookup finds its rows' row ids first (the id column alone), then reads their columns
    ``TAKE_ROWS`` rows at a time: 2,000 photos of 5 MB are never in memory at once. Asked only for
    the id and ``_rowid`` (a label commit locating its rows), the lookup's own read is the answer.
    An id several rows hold brings each of them once. Rows come in table order within a lookup.
    """
    unique = list(dict.fromkeys(ids))
    wanted = [*columns, "_rowaddr"] if with_row_address else list(columns)
    located_only = set(columns) <= {id_column, "_rowid"}  # the lookup reads all that is asked: no take
    for start in range(0, len(unique), ID_LOOKUP):
        matching = f"(`{id_column}` IN ({sql_strings(unique[start : start + ID_LOOKUP])}))"  # quoted: any column name
        found = ds.to_table(columns=[id_column], with_row_id=True, with_row_address=with_row_address,
                            filter=matching if where is None else f"{matching} AND ({where})")
        if located_only:
            yield found.select(wanted)
            continue
        row_ids = found.column("_rowid")
        for at in range(0, len(row_ids), TAKE_ROWS):
            yield ds._take_rows(row_ids.slice(at, TAKE_ROWS), columns=wanted)  # by row id: these rows only


def count_rows(ds: lance.LanceDataset, where: str | None = None) -> int:
    """Return the number of rows matching ``where`` in this version (``bad_where`` for invalid SQL)."""
    with translated_where(ds, where):
        return ds.count_rows(filter=where)

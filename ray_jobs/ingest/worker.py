"""How a worker gets and checks the images of a batch of items: read, hash, skip known content, validate.

Input rows (``WORK_SCHEMA``): an index into the driver's items and how to get the bytes. Output
rows (``RESULT_SCHEMA``): a status (``ok``, ``error``, ``skip``, ``known``) and, for ``ok``, the
image columns. Content already in the table (``known``) is not decoded: it was validated when it
was added, so a rerun costs a read and a hash per image. :mod:`ray_jobs.ingest.write` turns the
``ok`` rows into data files of the table.
"""

from __future__ import annotations

import bisect
import errno
import functools
import json
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import lance
import numpy as np
import pyarrow as pa

from lance_io import existing_ids
from lance_io.schema import content_hashes
from lance_io.storage import is_object_uri, pyarrow_filesystem, resolve_storage_options
from ray_jobs.ingest.decode import (
    IMAGE_EXTENSIONS,
    SNIFF_BYTES,
    is_mac_metadata,
    sniff_format,
    validate_image,
)
from ray_jobs.ingest.fetch import Fetcher
from ray_jobs.ingest.items import ImageInfo, IngestError
from ray_jobs.ingest.object_reads import ObjectMissing, ObjectTooLarge, ObjectUnreadable, read_range
from ray_jobs.ingest.object_reads import read_object as get_object
from ray_jobs.ingest.options import IngestOptions

WORK_SCHEMA = pa.schema(
    [
        ("idx", pa.int64()),
        ("locator", pa.string()),
        ("path", pa.binary()),  # os.fsencode: a file name need not be UTF-8 (see work_path)
        ("url", pa.string()),
        ("data", pa.large_binary()),
        ("scan", pa.bool_()),
    ]
)
RESULT_SCHEMA = pa.schema(
    [
        ("idx", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("id", pa.string()),
        ("sha256", pa.string()),
        ("image", pa.large_binary()),
        ("size_bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("exif_orientation", pa.int8()),
        ("frames", pa.int32()),
    ]
)
SKIP = "skip"
T = TypeVar("T")
KNOWN = "known"
_EMPTY = dict.fromkeys(RESULT_SCHEMA.names)
_fetchers: dict[str, Fetcher] = {}


def work_path(row: dict) -> str:
    """Return a work row's ``path`` as the driver listed it (carried as bytes: on POSIX a file name is
    bytes, and one that is not UTF-8 must still reach the file)."""
    return os.fsdecode(row["path"])


def read_batch(
    rows: list[dict], options: IngestOptions, options_json: str, storage_options: dict[str, str] | None = None
) -> list[bytes | IngestError | str]:
    """Return each work row's bytes (or why there are none, or ``SKIP``), in order: the I/O half of a batch.

    URLs and objects wait on the network, so up to ``fetch_threads`` of them are read at once.
    ``storage_options`` are the table's, used for source objects when the environment has none.
    """
    urls = [row for row in rows if row["locator"] == "url"]
    fetched: dict[int, bytes | IngestError | str] = {}
    if urls:
        fetcher = _fetcher(options_json, options)
        with ThreadPoolExecutor(min(options.fetch_threads, len(urls))) as pool:
            bodies = pool.map(lambda row: one_input(fetcher.fetch, row["url"]), urls)
            fetched = {row["idx"]: body for row, body in zip(urls, bodies, strict=True)}
    remote = [row for row in rows if row["locator"] in ("object", "member") or _remote_cell(row)]
    if remote:
        with ThreadPoolExecutor(min(options.fetch_threads, len(remote))) as pool:
            bodies = pool.map(lambda row: one_input(_read_remote, row, options.max_bytes, storage_options), remote)
            fetched.update({row["idx"]: body for row, body in zip(remote, bodies, strict=True)})
    return [one_input(_bytes_of, row, fetched, options) for row in rows]


def one_input(read: Callable[..., T], *args: Any) -> T | IngestError:
    """Return ``read(*args)``, or an ``internal`` error of this one input when it raises what nothing
    above expects (a bug): the job goes on and the input is accounted for, its exception the message."""
    try:
        return read(*args)
    except Exception as exc:  # one input's unforeseen failure must not end the whole job
        return IngestError("internal", f"{type(exc).__name__}: {exc} (a bug in lancetag: please report it)")


def check_batch(
    rows: list[dict],
    datas: list[bytes | IngestError | str],
    options: IngestOptions,
    known_in: lance.LanceDataset | None = None,
) -> pa.Table:
    """Return one result row per work row from its bytes: hash, skip known content, validate (the CPU half).

    ``known_in`` is the table being ingested into: content already in it comes back as ``known``.
    """
    hashes = [content_hashes(d) if isinstance(d, bytes) and d else None for d in datas]
    known = _known_ids(known_in, [h[0] for h in hashes if h is not None])
    columns: dict[str, list] = {name: [] for name in RESULT_SCHEMA.names}
    for row, data, hashed in zip(rows, datas, hashes, strict=True):
        if hashed is not None and hashed[0] in known:
            result = {**_EMPTY, "idx": row["idx"], "status": KNOWN, "id": hashed[0]}
        else:
            checked = one_input(_result, row["idx"], data, hashed, options)
            result = checked if isinstance(checked, dict) else _result(row["idx"], checked, None, options)
        for name, value in result.items():
            columns[name].append(value)
    arrays = [
        binary_column(columns[f.name]) if f.name == "image" else pa.array(columns[f.name], f.type)
        for f in RESULT_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=RESULT_SCHEMA)


def _bytes_of(
    row: dict, fetched: dict[int, bytes | IngestError | str], options: IngestOptions
) -> bytes | IngestError | str:
    if row["locator"] in ("url", "object", "member") or _remote_cell(row):
        data = fetched[row["idx"]]
    elif row["locator"] == "path":
        data = read_file(work_path(row), options.max_bytes, scan=row["scan"])
    elif row["locator"] == "cell":
        data = read_cell(row["url"], work_path(row), options.max_bytes)
    else:
        data = row["data"] or b""
    # a scanned file, object or tar member that is macOS metadata (``._photo.jpg``) is no image: skipped
    return SKIP if row["scan"] and not isinstance(data, IngestError | str) and is_mac_metadata(data) else data


def read_cell(
    file: str, span: str, max_bytes: int, table_options: dict[str, str] | None = None
) -> bytes | IngestError:
    """Return the image bytes at ``span`` (``"format:stamp:row[/position]:column"``, ``items.Cell``) of an Arrow or Parquet file or a Lance table."""
    from ray_jobs.ingest.sources.objectstore import listing_failure

    form, stamp, place, column = span.split(":", 3)
    row, _, position = place.partition("/")
    options_json = json.dumps(_object_options(file, table_options) or {}) if is_object_uri(file) else "{}"
    try:
        if form == "parquet":
            value = _parquet_cell(file, stamp, int(row), column, options_json)
        elif form == "lance":
            value = _lance_cell(file, int(stamp), int(row), column, options_json)
        else:
            value = _arrow_table(file, stamp).column(column)[int(row)]
        if position:  # an image in a row's list of images
            value = value[int(position)]
    except FileNotFoundError:
        return IngestError("not_found", f"no such file {file} (moved or deleted since it was listed?)")
    except _FileChanged:
        return IngestError("source_changed", f"{file} changed since it was listed (size and time differ); rerun")
    except (KeyError, IndexError, ValueError, pa.ArrowException) as exc:  # ValueError: Lance's (a version cleaned up)
        return IngestError("unreadable", f"cannot read row {row} of {file}: {exc}")
    except OSError as exc:
        return IngestError(*listing_failure(exc))
    if isinstance(value, pa.StructScalar):  # a Hugging Face Image: {"bytes", "path"}
        value = value["bytes"]
    buffer = value.as_buffer() if value.is_valid else None
    if buffer is None or buffer.size == 0:
        return IngestError("missing_location", "the row has no image bytes")
    if buffer.size > max_bytes:
        return IngestError("too_large", f"{buffer.size} bytes is over the limit of {max_bytes} (raise --max-bytes)")
    return buffer.to_pybytes()


class _FileChanged(Exception):
    """The file a cell points into is not the one the driver listed."""


def _checked_filesystem(file: str, stamp: str, options_json: str):  # -> (pyarrow filesystem, path)
    from pyarrow.fs import LocalFileSystem

    from ray_jobs.ingest.sources.cells import file_stamp

    filesystem, path = pyarrow_filesystem(file, json.loads(options_json) or None) if is_object_uri(file) else (LocalFileSystem(), file)
    if file_stamp(filesystem, path) != stamp:
        raise _FileChanged(file)
    return filesystem, path


# Cached per worker process, by file and stamp: a file rewritten under the same name is opened anew.
@functools.lru_cache(maxsize=4)
def _arrow_table(file: str, stamp: str) -> pa.Table:
    """A Hugging Face Arrow file (an IPC stream), memory-mapped: reading a cell pages in that cell only."""
    _checked_filesystem(file, stamp, "{}")
    return pa.ipc.open_stream(pa.memory_map(file)).read_all()


_cell_cache_lock = threading.Lock()


def _parquet_cell(file: str, stamp: str, row: int, column: str, options_json: str) -> pa.Scalar:
    """Row ``row`` of ``column``: its row group's column is read once and kept (a task's rows are consecutive)."""
    _, starts = _parquet_layout(file, stamp, options_json)
    group = bisect.bisect_right(starts, row) - 1
    with _cell_cache_lock:  # the fetch threads of a task want the same group: read it once
        values = _row_group(file, stamp, group, column, options_json)
    return values[row - starts[group]]


@functools.lru_cache(maxsize=8)
def _parquet_layout(file: str, stamp: str, options_json: str):  # -> (pq.ParquetFile, first row of each row group)
    import pyarrow.parquet as pq

    filesystem, path = _checked_filesystem(file, stamp, options_json)
    parquet = pq.ParquetFile(path, filesystem=filesystem)
    starts = [0]
    for group in range(parquet.metadata.num_row_groups - 1):
        starts.append(starts[-1] + parquet.metadata.row_group(group).num_rows)
    return parquet, starts


@functools.lru_cache(maxsize=2)
def _row_group(file: str, stamp: str, group: int, column: str, options_json: str) -> pa.ChunkedArray:
    parquet, _ = _parquet_layout(file, stamp, options_json)
    return parquet.read_row_group(group, columns=[column]).column(column)


LANCE_BLOCK_ROWS = 64
"""Rows of a Lance table a worker takes at once: a task's cells are consecutive offsets."""


def _lance_cell(table: str, version: int, row: int, column: str, options_json: str) -> pa.Scalar:
    """Row offset ``row`` of ``column`` in ``version`` of the Lance table ``table``, taken a block at a time."""
    block = row // LANCE_BLOCK_ROWS
    with _cell_cache_lock:
        values = _lance_block(table, version, block, column, options_json)
    return values[row - block * LANCE_BLOCK_ROWS]


@functools.lru_cache(maxsize=4)
def _lance_version(table: str, version: int, options_json: str) -> tuple[lance.LanceDataset, int]:
    """The table at ``version`` and its row count (counted once: it may read deletion files)."""
    dataset = lance.dataset(table, version=version, storage_options=json.loads(options_json) or None)
    return dataset, dataset.count_rows()


@functools.lru_cache(maxsize=2)
def _lance_block(table: str, version: int, block: int, column: str, options_json: str) -> pa.ChunkedArray:
    dataset, rows = _lance_version(table, version, options_json)
    start = block * LANCE_BLOCK_ROWS
    offsets = list(range(start, min(start + LANCE_BLOCK_ROWS, rows)))
    return dataset.take(offsets, columns=[column]).column(column)


def _remote_cell(row: dict) -> bool:
    return row["locator"] == "cell" and is_object_uri(row["url"])


def _read_remote(row: dict, max_bytes: int, table_options: dict[str, str] | None) -> bytes | IngestError | str:
    if row["locator"] == "object":
        return read_object(row["url"], max_bytes, table_options, scan=row["scan"])
    if row["locator"] == "cell":
        return read_cell(row["url"], work_path(row), max_bytes, table_options)
    return read_member(row["url"], work_path(row), max_bytes, table_options)


def _object_options(uri: str, table_options: dict[str, str] | None) -> dict[str, str] | None:
    """Storage options to read a source object: ``$LANCETAG_STORAGE_OPTIONS`` as the driver listed with it;
    where this worker's environment lacks it (a cluster started elsewhere), the table's own options."""
    return resolve_storage_options(uri) or table_options


def read_object(
    uri: str, max_bytes: int, table_options: dict[str, str] | None = None, *, scan: bool = False
) -> bytes | IngestError | str:
    """Return an object's bytes, an ``IngestError``, or ``SKIP`` for a listed object that is no image."""
    from ray_jobs.ingest.sources.objectstore import listing_failure

    keep = None
    if scan and Path(uri).suffix.lower() not in IMAGE_EXTENSIONS:
        keep = lambda head: sniff_format(head[:SNIFF_BYTES]) is not None  # noqa: E731
    try:
        data = get_object(uri, _object_options(uri, table_options), max_bytes, keep)
    except ObjectMissing:
        return IngestError("not_found", "no such object (deleted since it was listed?)")
    except ObjectTooLarge:
        return IngestError("too_large", f"the object is over the limit of {max_bytes} bytes (raise --max-bytes)")
    except ObjectUnreadable as exc:
        return IngestError(*listing_failure(exc.cause))
    return SKIP if data is None else data


def read_member(
    shard: str, span: str, max_bytes: int, table_options: dict[str, str] | None = None
) -> bytes | IngestError:
    """Return the bytes of the tar member at ``span`` (``"offset:size"``) of ``shard``, or why not."""
    from ray_jobs.ingest.sources.objectstore import listing_failure

    offset, size = (int(part) for part in span.split(":"))
    if size > max_bytes:
        return IngestError("too_large", f"{size} bytes is over the limit of {max_bytes} (raise --max-bytes)")
    try:
        if is_object_uri(shard):
            data = read_range(shard, _object_options(shard, table_options), offset, size)
        else:
            with open(shard, "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
    except (FileNotFoundError, ObjectMissing):
        return IngestError("not_found", "no such shard (deleted since it was listed?)")
    except ObjectUnreadable as exc:
        return IngestError(*listing_failure(exc.cause))
    except OSError as exc:
        return IngestError(*listing_failure(exc))
    if len(data) < size:
        return IngestError("truncated", f"the shard ends inside this member ({len(data)} of {size} bytes)")
    return data


def _known_ids(dataset: lance.LanceDataset | None, ids: list[str]) -> set[str]:
    """Return which of ``ids`` the table already holds (none when it does not exist yet)."""
    if dataset is None or not ids:
        return set()
    try:
        return existing_ids(dataset, ids)
    except (OSError, ValueError):  # unreachable: the driver's commit-time check dedups anyway
        return set()


def binary_column(values: list[bytes | None]) -> pa.Array:
    """Return a ``large_binary`` array over one joined buffer of `values`.

    One ``bytes.join`` and a zero-copy wrap: ``pa.array`` on hundreds of MB of image bytes grows
    its buffers step by step and is an order of magnitude slower here.
    """
    lengths = np.fromiter((0 if v is None else len(v) for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    nulls = sum(v is None for v in values)
    validity = pa.array([v is not None for v in values], pa.bool_()).buffers()[1] if nulls else None
    data = b"".join(v for v in values if v is not None)
    buffers = [validity, pa.py_buffer(offsets), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.large_binary(), len(values), buffers, null_count=nulls)


def read_file(path: str, max_bytes: int, *, scan: bool = False) -> bytes | IngestError | str:
    """Return a file's bytes, an ``IngestError``, or ``SKIP`` for a scanned file that is no image."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            return IngestError("not_a_file", "not a regular file (a directory, device, FIFO or socket)")
        size = info.st_size
        with open(path, "rb") as handle:
            data = b""
            if scan and Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
                data = handle.read(SNIFF_BYTES)  # a scanned file without an image name: sniff first
                if sniff_format(data) is None:
                    return SKIP
            if size > max_bytes:
                return IngestError(
                    "too_large", f"{size} bytes is over the limit of {max_bytes} (raise --max-bytes)"
                )
            # Sized to the file (a read of max_bytes would allocate max_bytes); a file that grew
            # since stat is still read to the limit, and then refused as too large.
            data += handle.read(size + 1 - len(data))
            if len(data) > size:
                data += handle.read(max_bytes + 1 - len(data))
            return data
    except FileNotFoundError:
        return IngestError("not_found", "no such file (moved or deleted since it was listed?)")
    except ValueError:  # os.stat's "embedded null byte"
        return IngestError("not_found", "the path holds a NUL byte, which no file name can")
    except PermissionError:
        return IngestError("unreadable", "permission denied: the ingest user cannot read this file")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return IngestError("symlink_loop", "the path is a symlink loop")
        return IngestError("unreadable", f"cannot read: {exc.strerror or exc}")


def _result(
    idx: int, data: bytes | IngestError | str, hashed: tuple[str, str] | None, options: IngestOptions
) -> dict:
    """Return every result column for one item (None where it does not apply)."""
    if data == SKIP:
        return {**_EMPTY, "idx": idx, "status": SKIP}
    info = (
        data
        if isinstance(data, IngestError)
        else validate_image(data, max_pixels=options.max_pixels, max_bytes=options.max_bytes)
    )
    if isinstance(info, IngestError):
        return {**_EMPTY, "idx": idx, "status": "error", "reason": info.reason, "message": info.message}
    assert isinstance(info, ImageInfo) and isinstance(data, bytes) and hashed is not None
    image_id, sha256 = hashed
    return {
        "idx": idx,
        "status": "ok",
        "reason": None,
        "message": None,
        "id": image_id,
        "sha256": sha256,
        "image": data,
        "size_bytes": len(data),
        "width": info.width,
        "height": info.height,
        "format": info.format,
        "mode": info.mode,
        "exif_orientation": info.exif_orientation,
        "frames": info.frames,
    }


def _fetcher(key: str, options: IngestOptions) -> Fetcher:
    # One client (connection pool, per-host slots) per worker process and options.
    if key not in _fetchers:
        _fetchers[key] = Fetcher(options)
    return _fetchers[key]


def options_key(options: IngestOptions) -> str:
    """Return the options as JSON, the form Ray tasks receive them in."""
    return json.dumps(options.model_dump(mode="json"), sort_keys=True)

"""Manifests and existing tables: CSV, JSONL, JSON, Parquet (file or folder) and Lance tables.

A URL list in CSV/JSONL/Parquet form is a manifest with a ``url`` column. Relative paths resolve
against ``--manifest-root`` (default: the manifest's folder) and cannot leave it unless allowed.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from lance_io.schema import IMAGE_SCHEMA
from lance_io.storage import is_object_uri, pyarrow_filesystem, resolve_storage_options
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources.base import ListedSource, SourceError
from ray_jobs.ingest.sources.cells import Rows, lance_rows_with_cells, parquet_dataset_rows
from ray_jobs.ingest.sources.tabular import ColumnMapping, RowContext, map_columns, rows_to_items

BATCH_ROWS = 1024
IMAGE_TABLE_COLUMNS = frozenset(IMAGE_SCHEMA.names)
"""The columns of a lancetag image table: as a Lance source, they mean what ingest computes again."""
Batches = Callable[[], Iterator[pa.RecordBatch] | Rows]


def manifest_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of a CSV, JSONL or JSON manifest (one row per image), local or on object storage."""
    if is_object_uri(location):
        return _object_manifest(location, options)
    path = Path(location)
    if not path.is_file():
        raise SourceError(f"{location} is not a file")
    table = _read_manifest(path)
    mapping = map_columns(table.schema, options.columns, location)
    return _tabular(location, "manifest", mapping, lambda: iter(table.to_batches(BATCH_ROWS)), path.parent, options)


def _object_manifest(location: str, options: IngestOptions) -> ListedSource:
    """A manifest on object storage: read on the driver (it is the listing); its relative paths are keys."""
    filesystem, key = pyarrow_filesystem(location, resolve_storage_options(location))
    try:
        with filesystem.open_input_stream(key) as stream:
            data = stream.read()
    except OSError as exc:
        raise SourceError(f"cannot read the manifest {location}: {exc}") from exc
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / Path(key).name
        copy.write_bytes(data)
        table = _read_manifest(copy)
    mapping = map_columns(table.schema, options.columns, location)
    context = RowContext(
        name=location, kind="manifest", root=Path("."), options=options, object_root=location.rsplit("/", 1)[0]
    )
    batches = table.to_batches(BATCH_ROWS)
    return ListedSource("manifest", lambda: rows_to_items(iter(batches), mapping, context), mapping.metadata_fields)


def parquet_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of a Parquet file or folder of Parquet files, read in batches."""
    import pyarrow.dataset as pads

    if is_object_uri(location):
        return _object_parquet(location, options)
    if not Path(location).exists():
        raise SourceError(f"{location} does not exist")
    try:  # absolute paths: the files are listed and read by Ray tasks, whose working directory may differ
        dataset = pads.dataset(str(Path(location).resolve()), format="parquet")
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"cannot read the Parquet source {location}: {exc}") from exc
    root = Path(location) if Path(location).is_dir() else Path(location).parent
    mapping = map_columns(dataset.schema, options.columns, location)
    rows = functools.partial(parquet_dataset_rows, dataset, mapping.image_column, dataset.filesystem, str)
    return _tabular(location, "parquet", mapping, rows, root, options)


def _object_parquet(location: str, options: IngestOptions) -> ListedSource:
    """Parquet on object storage: streamed in batches through pyarrow (never read whole); relative paths are keys."""
    import pyarrow.dataset as pads
    from pyarrow import fs as pafs

    filesystem, key = pyarrow_filesystem(location, resolve_storage_options(location))
    try:
        folder = filesystem.get_file_info(key.rstrip("/")).type == pafs.FileType.Directory
        dataset = pads.dataset(key.rstrip("/"), filesystem=filesystem, format="parquet")
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"cannot read the Parquet source {location}: {exc}") from exc
    mapping = map_columns(dataset.schema, options.columns, location)
    root = location.rstrip("/") if folder else location.rsplit("/", 1)[0]
    context = RowContext(name=location, kind="parquet", root=Path("."), options=options, object_root=root)
    scheme = location.partition("://")[0]
    rows = functools.partial(parquet_dataset_rows, dataset, mapping.image_column, filesystem, lambda f: f"{scheme}://{f}")
    return ListedSource("parquet", lambda: rows_to_items(rows(), mapping, context), mapping.metadata_fields)


def lance_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of an existing Lance table (any schema with image bytes, paths or URLs).

    Image bytes stay in the table: a Ray task lists the other columns and the workers take the
    images (``cells.lance_rows_with_cells``).
    """
    import lance

    storage = resolve_storage_options(location) if is_object_uri(location) else None
    location = location if is_object_uri(location) else str(Path(location).resolve())  # the workers open it too
    try:
        dataset = lance.dataset(location, storage_options=storage)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{location} is not a readable Lance table: {exc}") from exc
    # A lancetag image table's own columns mean what ingest computes again; another table's `id` is its data.
    computed = IMAGE_TABLE_COLUMNS if set(dataset.schema.names) >= IMAGE_TABLE_COLUMNS else frozenset()
    mapping = map_columns(dataset.schema, options.columns, location, computed=computed)
    image = mapping.roles.get("image")
    in_place = (
        lance_rows_with_cells(dataset, location, image, bool({"path", "url"} & set(mapping.roles)), storage)
        if image is not None
        else None
    )
    batches = in_place or (lambda: dataset.to_batches(batch_size=BATCH_ROWS))
    return _tabular(location, "lance", mapping, batches, Path(location).parent, options)


def _tabular(
    location: str, kind: str, mapping: ColumnMapping, batches: Batches, default_root: Path, options: IngestOptions
) -> ListedSource:
    root = Path(options.manifest_root) if options.manifest_root else default_root
    context = RowContext(name=location, kind=kind, root=root, options=options)
    return ListedSource(kind, lambda: rows_to_items(batches(), mapping, context), mapping.metadata_fields)


def _json_line(path: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:  # its own line/column would say "line 1" of every line
        raise SourceError(f"cannot read the manifest {path}: line {number}: {exc.msg} (column {exc.colno})") from exc


def _read_manifest(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            import pyarrow.csv as pacsv

            return pacsv.read_csv(path)
        if suffix in (".jsonl", ".ndjson"):
            with path.open(encoding="utf-8") as lines:
                return pa.Table.from_pylist([_json_line(path, n, line) for n, line in enumerate(lines, 1) if line.strip()])
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise SourceError(f"{path} must hold a JSON list of objects (one per image)")
            return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:  # e.g. a column mixing strings and numbers
        raise SourceError(f"cannot read the manifest {path}: {exc}; give each column one type") from exc
    except OverflowError as exc:  # JSON integers have no size limit; Arrow's have 64 bits
        raise SourceError(f"cannot read the manifest {path}: a number does not fit in 64 bits ({exc})") from exc
    except UnicodeEncodeError as exc:  # a JSON \ud800 escape: half of a character, which no column can hold
        raise SourceError(
            f"cannot read the manifest {path}: a value holds {exc.object[exc.start:exc.end]!r}, half of a character "
            "(a lone \\uD800-\\uDFFF escape), not text; fix that value"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise SourceError(f"cannot read the manifest {path}: {exc}") from exc
    raise SourceError(f"{path}: a manifest is .csv, .jsonl, .json or .parquet")

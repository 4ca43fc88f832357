"""Rows whose image bytes stay in their file: the driver lists the other columns, the workers read the images.

Sources that hold images inline (a Hugging Face dataset's Arrow files, a Parquet file with an
image column, an existing Lance table) would otherwise send every image through the driver, as work rows. Here each
image becomes a :class:`~ray_jobs.ingest.items.Cell` (file, row, column) and a worker reads it
(``worker.read_cell``). Whether a row has image bytes, which decides how it is located, is known
without reading them: from the Arrow offsets, or from a Parquet row group's statistics (no null);
a row group with a null image, or without statistics, is read whole and sent to the driver, as before.
A Parquet file is listed by a Ray task, so its footer stays off the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyarrow.fs import LocalFileSystem

from ray_jobs.ingest.items import Cell

BATCH_ROWS = 1024
Rows = Iterator[list[dict[str, Any]]]


def image_values_type(dtype: pa.DataType) -> tuple[bool, bool]:
    """Return (bytes readable as a cell, is an Image struct ``{bytes, path}``) for an image column's type."""
    struct = pa.types.is_struct(dtype)
    values = dtype.field("bytes").type if struct and dtype.get_field_index("bytes") >= 0 else dtype
    return pa.types.is_binary(values) or pa.types.is_large_binary(values), struct


def _cell_value(cell: Cell | None, path: str | None, struct: bool) -> Any:
    return {"bytes": cell, "path": path} if struct else cell


def file_stamp(filesystem: Any, path: str) -> str:
    """A file's size and modification time (``pyarrow.fs``): equal stamps, the same file as listed."""
    from pyarrow.fs import FileType

    info = filesystem.get_file_info(path)
    if info.type == FileType.NotFound:
        raise FileNotFoundError(path)
    return f"{info.size}-{info.mtime_ns}"


def arrow_rows_with_cells(dataset: Any, image_column: str | None, location: str) -> Rows | None:
    """Yield a Hugging Face dataset's rows, ``BATCH_ROWS`` at a time, each image's bytes replaced by its :class:`Cell`.

    The driver then never reads an image: it reads the other columns and the lengths of the image
    cells (the Arrow offsets, not the bytes), and the workers read the bytes from the dataset's
    memory-mapped Arrow files. None when the images cannot be read that way: no image column, a
    list of images per row, an index mapping (``select``), or Arrow files outside ``location``
    (a ModelScope folder's cache is private to the driver's machine).
    """
    files = [Path(f["filename"]) for f in dataset.cache_files]
    root = Path(location).resolve()
    if image_column is None or dataset._indices is not None or not files:
        return None
    if not all(f.resolve().is_relative_to(root) for f in files):
        return None
    table: pa.Table = dataset.data.table
    column = table.column(image_column)
    readable, struct = image_values_type(column.type)
    if not readable:
        return None
    values = pc.struct_field(column, "bytes") if struct else column
    counts = [_arrow_rows(f) for f in files]
    if sum(counts) != table.num_rows:
        return None
    local = LocalFileSystem()
    stamps = [file_stamp(local, str(f)) for f in files]
    lengths = pc.binary_length(values)  # from the offsets: the bytes stay unread
    paths = pc.struct_field(column, "path") if struct and column.type.get_field_index("path") >= 0 else None
    rest = table.drop_columns([image_column])

    def rows() -> Rows:
        file_index, first_row = 0, 0
        for start in range(0, table.num_rows, BATCH_ROWS):
            batch = rest.slice(start, BATCH_ROWS).to_pylist()
            sizes = lengths.slice(start, BATCH_ROWS).to_pylist()
            names = paths.slice(start, BATCH_ROWS).to_pylist() if paths is not None else [None] * len(batch)
            for offset, (row, size, name) in enumerate(zip(batch, sizes, names, strict=True)):
                number = start + offset
                while number >= first_row + counts[file_index]:
                    first_row += counts[file_index]
                    file_index += 1
                cell = Cell(str(files[file_index]), number - first_row, image_column, "arrow", stamps[file_index]) if size else None
                row[image_column] = _cell_value(cell, name, struct)
            yield batch

    return rows()


def _arrow_rows(path: Path) -> int:
    """Rows of a Hugging Face Arrow file (an IPC stream), from its record batches' headers."""
    with pa.memory_map(str(path)) as source:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def parquet_dataset_rows(dataset: Any, image_column: str | None, filesystem: Any, uri_of: Callable[[str], str]) -> Rows:
    """Yield a ``pyarrow.dataset`` of Parquet files in batches: images as cells when ``image_column``
    holds bytes (``parquet_rows_with_cells``), else its record batches as they are."""
    if image_column in dataset.schema.names and image_values_type(dataset.schema.field(image_column).type)[0]:
        yield from parquet_rows_with_cells(dataset.files, image_column, filesystem, uri_of)
    else:
        yield from dataset.to_batches(batch_size=BATCH_ROWS)


def parquet_rows_with_cells(
    files: list[str], image_column: str, filesystem: Any, uri_of: Callable[[str], str]
) -> Rows:
    """Yield the rows of Parquet ``files``, a row group at a time, each image as a :class:`Cell`.

    ``files`` are paths in ``filesystem`` (``pyarrow.fs``); ``uri_of`` names one for the workers
    (a local path, or ``s3://bucket/key``). Each file is listed in a Ray task
    (``remote.stream_on_worker``): its footer, which grows with its row groups (about 55 MB
    parsed for 10,000 of them), never enters the driver.
    """
    from ray_jobs.ingest.remote import stream_on_worker

    for file in files:
        yield from stream_on_worker(_parquet_file_rows, file, uri_of(file), image_column, filesystem)


def _parquet_file_rows(file: str, uri: str, image_column: str, filesystem: Any) -> Rows:
    """The rows of one Parquet file. A row group whose statistics do not show every image present
    (no null) is read whole: the driver then holds its bytes."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file, filesystem=filesystem)
    stamp = file_stamp(filesystem, file)
    schema = parquet.schema_arrow
    dtype = schema.field(image_column).type if image_column in schema.names else pa.null()  # a file without it: read whole
    readable, struct = image_values_type(dtype)
    leaf = f"{image_column}.bytes" if struct else image_column
    others = [name for name in schema.names if name != image_column]
    with_path = struct and dtype.get_field_index("path") >= 0
    first_row, pending = 0, []
    for group in range(parquet.metadata.num_row_groups):
        meta = parquet.metadata.row_group(group)
        if readable and _every_value_present(meta, leaf):
            table = parquet.read_row_group(group, columns=others + ([f"{image_column}.path"] if with_path else []))
            rows = table.to_pylist()
            for offset, row in enumerate(rows):
                path = (row.get(image_column) or {}).get("path") if with_path else None
                row[image_column] = _cell_value(Cell(uri, first_row + offset, image_column, "parquet", stamp), path, struct)
        else:
            rows = parquet.read_row_group(group).to_pylist()
        pending.extend(rows)  # small row groups travel together: one object per batch
        whole = len(pending) - len(pending) % BATCH_ROWS
        for start in range(0, whole, BATCH_ROWS):
            yield pending[start : start + BATCH_ROWS]
        pending = pending[whole:]
        first_row += meta.num_rows
    if pending:
        yield pending


def _every_value_present(meta: Any, leaf: str) -> bool:
    """True when a row group's statistics show no null in the column ``leaf``.

    (Whether a value is empty they cannot say: Parquet writers keep no min/max of values over a
    few KB. An empty one is an error record from the worker, ``missing_location``.)"""
    for index in range(meta.num_columns):
        column = meta.column(index)
        if column.path_in_schema == leaf:
            stats = column.statistics
            return stats is not None and stats.has_null_count and stats.null_count == 0
    return False


def lance_rows_with_cells(
    dataset: Any, location: str, image_column: str, fallback: bool
) -> Callable[[], Rows] | None:
    """Return a function yielding a Lance table's rows, ``BATCH_ROWS`` at a time, each image as a :class:`Cell`.

    The driver scans the other columns of the version it opened; the workers take the images from
    that version by row offset. None when the images cannot be read that way: the column holds
    no bytes (a struct, paths), or it may hold nulls while another column (``fallback``: a path
    or URL role) could locate the image instead.
    """
    field = dataset.schema.field(image_column)
    if not (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)):
        return None
    if field.nullable and fallback:
        return None
    others = [name for name in dataset.schema.names if name != image_column]
    version = str(dataset.version)

    def rows() -> Rows:
        number = 0
        for batch in dataset.to_batches(columns=others, batch_size=BATCH_ROWS):
            listed = batch.to_pylist() if others else [{} for _ in range(batch.num_rows)]
            for row in listed:
                row[image_column] = Cell(location, number, image_column, "lance", version)
                number += 1
            yield listed

    return rows

"""Rows whose image bytes stay in their file: the driver lists the other columns, the workers read the images.

Sources that hold images inline (a Hugging Face dataset's Arrow files, a Parquet file with an
image column or a list of images per row, an existing Lance table) would otherwise send every
image through the driver, as work rows. Here each image becomes a
:class:`~ray_jobs.ingest.items.Cell` (file, row, column, position in the row's list) and a worker
reads it (``worker.read_cell``). Whether an image has bytes, which decides how it is located, is
known without the driver reading them: from the Arrow offsets, or from a Parquet row group's
statistics (no null), else from the bytes read by the Ray task that lists the Parquet file, never
by the driver: a Parquet file's footer and bytes stay off the driver.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyarrow.fs import LocalFileSystem

from ray_jobs.ingest.items import Cell

BATCH_ROWS = 1024
CHECKED_ROWS = 64
"""Rows of a Lance table listed at once where the listing reads the images too: their bytes are held at once."""
Rows = Iterator[list[dict[str, Any]]]


@dataclass(frozen=True)
class ImageLayout:
    """How an image column holds its images: bytes or an ``Image`` struct ``{bytes, path}``, one per row or a list."""

    readable: bool
    """Bytes a worker can read as a cell (binary, or a struct's ``bytes``)."""
    struct: bool
    listed: bool
    """A list of images per row (a multi-image training sample)."""
    with_path: bool
    """The struct names a path too (Hugging Face's ``Image``), which stands in for missing bytes."""


def image_layout(dtype: pa.DataType) -> ImageLayout:
    """Return how a column of type ``dtype`` holds images (``readable`` False: not as bytes)."""
    listed = pa.types.is_list(dtype) or pa.types.is_large_list(dtype)
    element = dtype.value_type if listed else dtype
    struct = pa.types.is_struct(element)
    values = element.field("bytes").type if struct and element.get_field_index("bytes") >= 0 else element
    readable = pa.types.is_binary(values) or pa.types.is_large_binary(values)
    return ImageLayout(readable, struct, listed, struct and element.get_field_index("path") >= 0)


def file_stamp(filesystem: Any, path: str) -> str:
    """A file's size and modification time (``pyarrow.fs``): equal stamps, the same file as listed."""
    from pyarrow.fs import FileType

    info = filesystem.get_file_info(path)
    if info.type == FileType.NotFound:
        raise FileNotFoundError(path)
    return f"{info.size}-{info.mtime_ns}"


@dataclass
class _Images:
    """What the listing knows of a slice of an image column: per image, whether it has bytes and its path."""

    present: list[bool]
    paths: list[str | None]
    counts: list[int | None] | None
    """Images per row for a list column (None: a null list); None for one image per row."""


def _images_of(column: pa.Array | pa.ChunkedArray, layout: ImageLayout, *, bytes_known: bool) -> _Images:
    """Read presence and paths from ``column`` (which may hold only the struct's ``path``).

    ``bytes_known``: every image is known to have bytes (Parquet statistics); else each image's
    length is taken from the column's offsets (the bytes themselves are not looked at)."""
    counts = None
    if layout.listed:
        counts = pc.list_value_length(column).to_pylist()
        column = pc.list_flatten(column)
    paths = pc.struct_field(column, "path").to_pylist() if layout.with_path else [None] * len(column)
    if bytes_known:
        present = [True] * len(column)
    else:
        values = pc.struct_field(column, "bytes") if layout.struct else column
        present = [bool(size) for size in pc.binary_length(values).to_pylist()]  # null or empty: no bytes
    return _Images(present, paths, counts)


def _image_values(
    images: _Images, struct: bool, first_row: int, cell_of: Callable[[int, int | None], Cell]
) -> list[Any]:
    """Each row's image value for ``tabular._locate``: a :class:`Cell` where there are bytes (in an
    ``Image`` struct with its path), a list of them for a list column. The slice starts at row
    ``first_row``; ``cell_of(row, position)`` names the cell of a row and position in its list."""

    def value(index: int, row: int, position: int | None) -> Any:
        cell = cell_of(first_row + row, position) if images.present[index] else None
        return {"bytes": cell, "path": images.paths[index]} if struct else cell

    if images.counts is None:
        return [value(row, row, None) for row in range(len(images.present))]
    values: list[Any] = []
    index = 0
    for row, count in enumerate(images.counts):
        values.append(None if count is None else [value(index + k, row, k) for k in range(count)])
        index += count or 0
    return values


def arrow_rows_with_cells(dataset: Any, image_column: str | None, location: str) -> Rows | None:
    """Yield a Hugging Face dataset's rows, ``BATCH_ROWS`` at a time, each image's bytes replaced by its :class:`Cell`.

    The driver then never reads an image: it reads the other columns and the lengths of the image
    cells (the Arrow offsets, not the bytes), and the workers read the bytes from the dataset's
    memory-mapped Arrow files. None when the images cannot be read that way: no image column, an
    index mapping (``select``), or Arrow files outside ``location`` (a ModelScope folder's cache
    is private to the driver's machine).
    """
    files = [Path(f["filename"]) for f in dataset.cache_files]
    root = Path(location).resolve()
    if image_column is None or dataset._indices is not None or not files:
        return None
    if not all(f.resolve().is_relative_to(root) for f in files):
        return None
    table: pa.Table = dataset.data.table
    column = table.column(image_column)
    layout = image_layout(column.type)
    if not layout.readable:
        return None
    counts = [_arrow_rows(f) for f in files]
    if sum(counts) != table.num_rows:
        return None
    local = LocalFileSystem()
    stamps = [file_stamp(local, str(f)) for f in files]
    starts = [sum(counts[:n]) for n in range(len(counts))]
    rest = table.drop_columns([image_column])

    def cell_of(number: int, position: int | None) -> Cell:
        file = bisect.bisect_right(starts, number) - 1
        return Cell(str(files[file]), number - starts[file], image_column, "arrow", stamps[file], position)

    def rows() -> Rows:
        for start in range(0, table.num_rows, BATCH_ROWS):
            # an image-only set leaves no column, whose slices pyarrow does not cut at the table's end
            rows_here = min(BATCH_ROWS, table.num_rows - start)
            batch = rest.slice(start, BATCH_ROWS).to_pylist() if rest.num_columns else [{} for _ in range(rows_here)]
            images = _images_of(column.slice(start, BATCH_ROWS), layout, bytes_known=False)
            for row, value in zip(batch, _image_values(images, layout.struct, start, cell_of), strict=True):
                row[image_column] = value
            yield batch

    return rows()


def _arrow_rows(path: Path) -> int:
    """Rows of a Hugging Face Arrow file (an IPC stream), from its record batches' headers."""
    with pa.memory_map(str(path)) as source:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def parquet_dataset_rows(dataset: Any, image_column: str | None, filesystem: Any, uri_of: Callable[[str], str]) -> Rows:
    """Yield a ``pyarrow.dataset`` of Parquet files in batches: images as cells when ``image_column``
    holds bytes (``parquet_rows_with_cells``), else its record batches as they are."""
    if image_column in dataset.schema.names and image_layout(dataset.schema.field(image_column).type).readable:
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
    parsed for 10,000 of them), and any image bytes the listing must read never enter the driver.
    """
    from ray_jobs.ingest.remote import stream_on_worker

    for file in files:
        yield from stream_on_worker(_parquet_file_rows, file, uri_of(file), image_column, filesystem)


def _parquet_file_rows(file: str, uri: str, image_column: str, filesystem: Any) -> Rows:
    """The rows of one Parquet file, its images as cells.

    Where a row group's statistics show every image present (no null, no empty list), only the
    other columns are read, and for a list of images the struct's paths (which give each row's
    count). Elsewhere this task reads the image column itself to see which images have bytes
    (the bytes are read twice then, here and by the worker that ingests them) and sends on
    cells and paths only."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file, filesystem=filesystem)
    stamp = file_stamp(filesystem, file)
    schema = parquet.schema_arrow
    dtype = schema.field(image_column).type if image_column in schema.names else pa.null()
    layout = image_layout(dtype)  # not readable (a file without the column): its rows as they are
    others = [name for name in schema.names if name != image_column or not layout.readable]
    columns = (parquet.schema.column(n).path for n in range(len(parquet.schema)))
    leaves = [leaf for leaf in columns if leaf == image_column or leaf.startswith(f"{image_column}.")]
    bytes_leaf = next((leaf for leaf in leaves if not layout.struct or leaf.endswith(".bytes")), None)
    path_leaf = next((leaf for leaf in leaves if layout.with_path and leaf.endswith(".path")), None)

    def cell_of(row: int, position: int | None) -> Cell:
        return Cell(uri, row, image_column, "parquet", stamp, position)

    first_row, pending = 0, []
    for group in range(parquet.metadata.num_row_groups):
        meta = parquet.metadata.row_group(group)
        wanted, known = _image_read(meta, image_column, layout, bytes_leaf, path_leaf)
        table = parquet.read_row_group(group, columns=others + wanted)  # one read per row group
        rows = table.select(others).to_pylist() if others else [{} for _ in range(meta.num_rows)]
        if layout.readable:
            images = (
                _images_of(table.column(image_column), layout, bytes_known=known)
                if wanted
                else _Images([True] * meta.num_rows, [None] * meta.num_rows, None)
            )
            for row, value in zip(rows, _image_values(images, layout.struct, first_row, cell_of), strict=True):
                row[image_column] = value
        pending.extend(rows)  # small row groups travel together: one object per batch
        whole = len(pending) - len(pending) % BATCH_ROWS
        for start in range(0, whole, BATCH_ROWS):
            yield pending[start : start + BATCH_ROWS]
        pending = pending[whole:]
        first_row += meta.num_rows
    if pending:
        yield pending


def _image_read(
    meta: Any, column: str, layout: ImageLayout, bytes_leaf: str | None, path_leaf: str | None
) -> tuple[list[str], bool]:
    """What of the image column a row group's read needs, and whether every image is known to have bytes:
    nothing or the paths where the statistics vouch for every image (a list's paths give each row's
    count), else the column itself."""
    if not layout.readable:
        return [], False
    known = bytes_leaf is not None and _every_value_present(meta, bytes_leaf)
    if known and path_leaf is not None:
        return [path_leaf], True
    if known and not layout.listed:
        return [], True
    return [column], False


def _every_value_present(meta: Any, leaf: str) -> bool:
    """True when a row group's statistics show no null in the column ``leaf`` (for a list, no null
    or empty list either: Parquet counts those as nulls of the leaf).

    (Whether a value is empty they cannot say: Parquet writers keep no min/max of values over a
    few KB. An empty one is an error record from the worker, ``missing_location``.)"""
    for index in range(meta.num_columns):
        column = meta.column(index)
        if column.path_in_schema == leaf:
            stats = column.statistics
            return stats is not None and stats.has_null_count and stats.null_count == 0
    return False


def lance_rows_with_cells(
    dataset: Any, location: str, image_column: str, fallback: bool, storage_options: dict[str, str] | None
) -> Callable[[], Rows] | None:
    """Return a function yielding a Lance table's rows, ``BATCH_ROWS`` at a time, each image as a :class:`Cell`.

    A Ray task (``remote.stream_on_worker``) scans the other columns of the version the driver
    opened; the workers take the images from that version by row offset. Where the image column
    may hold nulls and another column (``fallback``: a path or URL role) could locate an image
    instead, the task reads the image column too, to see which rows have bytes: then an image's
    bytes are read twice, by that task and by the worker that ingests it, never by the driver.
    None when the column holds no bytes (a struct, a list, paths).
    """
    field = dataset.schema.field(image_column)
    if not (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)):
        return None
    from ray_jobs.ingest.remote import stream_on_worker

    check = field.nullable and fallback
    version = dataset.version
    return lambda: stream_on_worker(_lance_table_rows, location, version, image_column, check, storage_options)


def _lance_table_rows(
    location: str, version: int, image_column: str, check: bool, storage_options: dict[str, str] | None
) -> Rows:
    """The rows of ``version`` of a Lance table, its images as cells (``check``: only those with bytes)."""
    import lance

    dataset = lance.dataset(location, version=version, storage_options=storage_options)
    others = [name for name in dataset.schema.names if name != image_column]
    number = 0
    columns, rows = ([*others, image_column], CHECKED_ROWS) if check else (others, BATCH_ROWS)
    for batch in dataset.to_batches(columns=columns, batch_size=rows):
        present = pc.binary_length(batch.column(image_column)).to_pylist() if check else [True] * batch.num_rows
        listed = batch.select(others).to_pylist() if others else [{} for _ in range(batch.num_rows)]
        for row, has in zip(listed, present, strict=True):
            row[image_column] = Cell(location, number, image_column, "lance", str(version)) if has else None
            number += 1
        yield listed

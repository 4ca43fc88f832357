"""Rows of a table (manifest, Parquet, Lance, Hugging Face Arrow) into input items, through a column mapping.

Roles a column can play: ``path`` (local file, relative to the root), ``url``, ``image`` (inline
bytes, or Hugging Face's ``{bytes, path}`` struct), ``images`` (a list of those, paths or URLs: one
training sample over several images), ``truth`` (ground-truth label) and ``messages`` (sharegpt
turns). Columns playing no role pass through as user metadata columns.

A row with ``messages`` is a training sample (:mod:`ray_jobs.ingest.samples`): over its one image,
or over its ``images`` in order, whose count must match the ``<image>`` placeholders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from lance_io.storage import is_object_uri
from ray_jobs.ingest.items import Cell, InputItem, SampleSpec
from ray_jobs.ingest.messages import InvalidMessages, normalize_messages, normalize_turns, placeholder_problem
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources.base import SourceError, inside_root, object_item, pass_through_columns

ROLES = ("path", "url", "image", "images", "truth", "messages")
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "path": ("path", "file", "file_name", "filename", "filepath", "image_path"),
    "url": ("url", "image_url", "URL"),
    "image": ("image", "image_bytes", "bytes", "img"),
    "images": ("images",),
    "truth": ("truth", "label", "class", "category"),
    "messages": ("messages", "conversations"),
}


@dataclass
class ColumnMapping:
    """Which column plays which role; the others pass through as metadata."""

    roles: dict[str, str]
    metadata_fields: dict[str, pa.DataType] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)  # table column -> the source column it is kept from

    def metadata_of(self, row: dict[str, Any]) -> dict[str, Any]:
        """Return the pass-through values of a source row, by table column."""
        return {name: row.get(self.renamed.get(name, name)) for name in self.metadata_fields}

    @property
    def image_column(self) -> str | None:
        """The column whose image bytes a source can leave in place for the workers: the image, else the list of images."""
        return self.roles.get("image") or self.roles.get("images")


def map_columns(
    schema: pa.Schema, explicit: dict[str, str], where: str, *, computed: frozenset[str] = frozenset()
) -> ColumnMapping:
    """Return the mapping for a table: explicit roles first, then the usual column names; the other
    columns pass through (``base.pass_through_columns``, which ``computed`` goes to)."""
    unknown = set(explicit) - set(ROLES)
    if unknown:
        raise SourceError(f"unknown column roles {sorted(unknown)}; roles are {', '.join(ROLES)}")
    missing = {role: col for role, col in explicit.items() if col not in schema.names}
    if missing:
        raise SourceError(f"{where} has no column {missing} (columns: {', '.join(schema.names)})")
    roles = dict(explicit)
    for role, candidates in DEFAULT_COLUMNS.items():
        if role in roles:
            continue
        for column in candidates:
            if (
                column in schema.names
                and column not in roles.values()
                and _fits(role, schema.field(column).type)
            ):
                roles[role] = column
                break
    if not {"path", "url", "image", "images"} & set(roles):
        raise SourceError(
            f"{where} has no path, url or image column (columns: {', '.join(schema.names)}); "
            "name one with --column path=COL, url=COL or image=COL"
        )
    kept = pass_through_columns(schema.names, set(roles.values()), computed=computed)
    return ColumnMapping(
        roles,
        {name: schema.field(column).type for name, column in kept.items()},
        {name: column for name, column in kept.items() if name != column},
    )


def _fits(role: str, dtype: pa.DataType) -> bool:
    if role == "image":
        return _is_binary(dtype) or (pa.types.is_struct(dtype) and dtype.get_field_index("bytes") >= 0)
    if role == "images":
        return pa.types.is_list(dtype) or pa.types.is_large_list(dtype)
    if role in ("path", "url"):
        return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    return True


def _is_binary(dtype: pa.DataType) -> bool:
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype)


@dataclass
class RowContext:
    """What turning rows into items needs: names for messages, the root paths must stay in, labels."""

    name: str
    kind: str
    root: Path
    options: IngestOptions
    label_names: list[str] | None = None
    object_root: str | None = None
    """The manifest's prefix when it is on object storage: relative paths are keys under it."""


def rows_to_items(
    batches: Iterable[pa.RecordBatch | list[dict[str, Any]]], mapping: ColumnMapping, context: RowContext
) -> Iterator[InputItem]:
    """Yield one item per row of `batches` (Arrow batches, or rows as dicts)."""
    row_number = 0
    for batch in batches:
        for row in batch if isinstance(batch, list) else batch.to_pylist():
            if "images" in mapping.roles and isinstance(row.get(mapping.roles["images"]), list):
                yield from _sample_items(row, row_number, mapping, context)
            else:
                yield _row_item(row, row_number, mapping, context)
            row_number += 1


def _sample_items(row: dict[str, Any], number: int, mapping: ColumnMapping, ctx: RowContext) -> Iterator[InputItem]:
    """Yield one item per image of a row with an ``images`` list, all belonging to the row's sample."""
    images = row[mapping.roles["images"]]
    name = f"{ctx.name}#{number}"
    spec = SampleSpec(source=ctx.name, source_kind=ctx.kind, index=number, images=len(images), messages=None)
    raw = row.get(mapping.roles["messages"]) if "messages" in mapping.roles else None
    try:
        spec.messages = normalize_turns(raw)
        problem = placeholder_problem(spec.messages, len(images))
        spec.error = None if problem is None else ("placeholder_mismatch", f"{problem} (row {number})")
    except InvalidMessages as exc:
        spec.error = ("invalid_messages", f"{exc} (row {number})")
    metadata = mapping.metadata_of(row)
    if not images:
        yield InputItem(source=name, source_kind=ctx.kind, locator="none", skip="text-only sample", sample=spec)
        return
    for position, image in enumerate(images):
        url = image if isinstance(image, str) and image.startswith(("http://", "https://")) else None
        path = image if isinstance(image, str) and url is None else None
        item = _locate(None if isinstance(image, str) else image, url, path, f"{name}/images/{position}", ctx)
        item.sample, item.sample_position, item.metadata = spec, position, dict(metadata)
        yield item


def _row_item(row: dict[str, Any], number: int, mapping: ColumnMapping, ctx: RowContext) -> InputItem:
    roles = mapping.roles
    get: Callable[[str], Any] = lambda role: row.get(roles[role]) if role in roles else None  # noqa: E731
    item = _locate(get("image"), get("url"), get("path"), f"{ctx.name}#{number}", ctx)
    item.metadata = mapping.metadata_of(row)
    truth = get("truth")
    if ctx.label_names is not None and isinstance(truth, int) and truth == -1:
        truth = None  # a ClassLabel's "no label" (as `datasets` writes a test split without answers)
    elif (
        truth is not None
        and ctx.label_names is not None
        and isinstance(truth, int)
        and 0 <= truth < len(ctx.label_names)
    ):
        truth = ctx.label_names[truth]
    item.truth = None if truth is None else str(truth)
    raw_messages = get("messages")
    if raw_messages is not None and item.error is None:
        try:
            item.messages = normalize_messages(raw_messages)
        except InvalidMessages as exc:
            item.error = ("invalid_messages", str(exc))
    return item


def _locate(image: Any, url: Any, path: Any, row_name: str, ctx: RowContext) -> InputItem:
    if isinstance(image, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        image, path = image.get("bytes"), path or image.get("path")
    if isinstance(image, Cell):  # bytes left in their Arrow file: the worker reads them
        return InputItem(source=path or url or row_name, source_kind=ctx.kind, locator="cell", url=image.file, path=image.span)
    if isinstance(image, bytes | bytearray | memoryview) and len(image) > 0:
        return InputItem(
            source=path or url or row_name, source_kind=ctx.kind, locator="bytes", data=bytes(image)
        )
    for value in (url, path):
        if isinstance(value, str) and value.lower().startswith(("http://", "https://")):
            return InputItem(source=value, source_kind=ctx.kind, locator="url", url=value)
    for value in (url, path):
        if isinstance(value, str) and is_object_uri(value):
            return InputItem(source=value, source_kind=ctx.kind, locator="object", url=value)
    if isinstance(path, str) and path and ctx.object_root:
        return object_item(path, ctx.kind, ctx.object_root)
    if isinstance(path, str) and path:
        resolved = Path(path) if Path(path).is_absolute() else ctx.root / path
        if not ctx.options.allow_outside_root and not inside_root(resolved, ctx.root):
            return InputItem(
                source=path,
                source_kind=ctx.kind,
                locator="none",
                error=(
                    "outside_root",
                    f"the path leads outside {ctx.root} (--manifest-root or --allow-outside-root)",
                ),
            )
        return InputItem(source=path, source_kind=ctx.kind, locator="path", path=str(resolved))
    if isinstance(url, str) and url.strip():  # a URL of no kind above (ftp://, a typo): the fetch says why not
        return InputItem(source=url, source_kind=ctx.kind, locator="url", url=url)
    return InputItem(
        source=row_name,
        source_kind=ctx.kind,
        locator="none",
        error=("missing_location", "the row has no image bytes, URL or path"),
    )

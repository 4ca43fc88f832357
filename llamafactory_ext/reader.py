"""Read a registered Lance entry into the rows LLaMA-Factory's sharegpt converter expects.

Every row becomes ``{"messages": [{"role", "content"}, ...], "images": [<original bytes>]}``.
Only the id, image and message/label columns are read, at the pinned version, with the
entry's ``where`` filter pushed down to Lance.

- :func:`load_rows` materialises an in-memory ``datasets.Dataset`` (nothing is written to the
  Hugging Face cache: in-memory datasets map in memory).
- :func:`stream_rows` returns a ``datasets.IterableDataset`` with one shard per fragment;
  with ``accelerator_config.dispatch_batches: false`` each rank reads only its fragments.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from lance_io.labels import (
    LabelError,
    answer_columns,
    answer_columns_in,
    classify_task_from_labels,
    kind_of,
    messages_from_answers,
)
from lance_io.scan import (
    TableReadError,
    list_fragments,
    open_at,
    require_columns,
    rows_per_batch,
    scan_batches,
)
from lance_io.schema import MESSAGE_TYPE
from llamafactory_ext.samples_reader import (
    count_samples,
    iter_sample_tables,
    sample_features,
    sample_fragment_ids,
)
from llamafactory_ext.source import LanceEntryError, LanceSource

logger = logging.getLogger(__name__)

ROW_SCHEMA = pa.schema([("messages", pa.list_(MESSAGE_TYPE)), ("images", pa.list_(pa.binary()))])


def row_features() -> Any:
    """Return the ``datasets.Features`` of loaded rows (messages + images)."""
    from datasets import Features, Sequence, Value

    return Features(
        {
            "messages": [{"role": Value("string"), "content": Value("string")}],
            "images": Sequence(Value("binary")),
        }
    )


@dataclass
class ReadReport:
    """What a read kept and skipped, by reason code."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        """Return a one-line summary for logs."""
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return f"kept {self.kept} rows; skipped: {skipped}"


class RowBuilder:
    """Turns record batches of one entry into message/image rows (picklable: holds no table handle).

    A label column is a prefix (:mod:`lance_io.labels`): the task's answer columns under it
    (``truth``; ``attrs_category``, ``attrs_sleeve_length``, ...) become the chat's answers.
    """

    def __init__(self, source: LanceSource) -> None:
        self.source = source
        self.questions = None
        self.answers: dict[str, str] = {}
        if source.label_column is not None:
            task = source.load_task()
            self.questions = task.questions()
            self.answers = answer_columns(task, source.label_column)

    @property
    def text_columns(self) -> list[str]:
        """Return the columns the chats come from: the messages column, or the task's answer columns."""
        return [self.source.messages_column] if self.source.messages_column else list(self.answers.values())

    @property
    def columns(self) -> list[str]:
        """Return the table columns this entry reads."""
        return list(dict.fromkeys([self.source.id_column, self.source.image_column, *self.text_columns]))

    def require(self, ds: Any) -> None:
        """Refuse a table without these columns (``column_missing``), or whose messages column does not
        hold sharegpt turns (``bad_messages_column``: it would fail inside training)."""
        require_columns(ds, self.columns, uri=self.source.uri)
        name = self.source.messages_column
        kind = ds.schema.field(name).type if name else None
        turns = kind is None or ((pa.types.is_list(kind) or pa.types.is_large_list(kind)) and kind.value_type == MESSAGE_TYPE)
        if not turns:
            raise LanceEntryError(
                "bad_messages_column",
                f"{name} holds {kind}, not chat turns (a list of role/content): name the column ingest wrote "
                "(messages), or register a label column with --label-column",
            )

    def has_text(self) -> str:
        """Return the SQL predicate of rows with something to train on: messages, or at least one answer."""
        return " OR ".join(f"{name} IS NOT NULL" for name in self.text_columns)

    def build(self, batch: pa.RecordBatch, report: ReadReport) -> pa.Table:
        """Return the rows of ``batch`` in this entry's split, as a ``ROW_SCHEMA`` table."""
        src = self.source
        ids = batch.column(src.id_column).to_pylist()
        if self.questions is None:
            texts = batch.column(src.messages_column).to_pylist()
        else:
            answers = {key: batch.column(name).to_pylist() for key, name in self.answers.items()}
            texts = [{key: values[i] for key, values in answers.items()} for i in range(batch.num_rows)]
        keep, messages = [], []
        for i, (row_id, text) in enumerate(zip(ids, texts, strict=True)):
            if not src.keeps(str(row_id)):
                continue
            if self.questions is None:
                if text is None:
                    report.skipped["label_missing"] += 1
                    continue
                turns = text
            else:
                try:
                    turns = messages_from_answers(self.questions, text)
                except LabelError as err:
                    report.skipped[err.reason] += 1
                    continue
            keep.append(i)
            messages.append(turns)
        report.kept += len(keep)
        images = batch.column(src.image_column).take(pa.array(keep, pa.int64())).cast(pa.binary())
        offsets = pa.array(np.arange(len(keep) + 1, dtype=np.int32))
        return pa.table(
            {
                "messages": pa.array(messages, type=pa.list_(MESSAGE_TYPE)),
                "images": pa.ListArray.from_arrays(offsets, images),
            },
            schema=ROW_SCHEMA,
        )


def resolve(source: LanceSource) -> LanceSource:
    """Return ``source`` with a classify task derived from the label values when none is given."""
    if source.label_column is None or source.task is not None or source.task_config is not None:
        return source
    ds = open_at(source.uri, source.ref(), storage_options=source.storage_options())
    found = answer_columns_in(ds.schema.names, source.label_column)
    if found and source.label_column not in found.values():
        raise LabelError(
            "task_missing",
            f"{source.uri} holds {', '.join(found.values())} under {source.label_column!r}: "
            "give the task that wrote them (--task) so each becomes its question's answer",
        )
    require_columns(ds, [source.label_column], uri=source.uri)
    kind = kind_of(ds.schema, source.label_column)
    if kind not in (None, "classify"):  # a label set made of captions or scores teaches the wrong question
        raise LabelError(
            "task_missing",
            f"{source.label_column!r} of {source.uri} was written by a {kind} task: give that task (--task) "
            "so training asks its question",
        )
    values = ds.to_table(columns=[source.label_column], filter=source.where).column(0).drop_null().unique()
    labels = sorted(str(v) for v in values.to_pylist())
    if len(labels) < 2:
        rows = f"the rows matching {source.where!r}" if source.where else "the table"
        raise LabelError(
            "too_few_labels", f"{source.label_column!r} holds {len(labels)} distinct value(s) in {rows} of {source.uri} "
            f"at version {ds.version} ({', '.join(labels) or 'none'}): a classify task needs two; check --where, "
            "or give the task (--task)"
        )
    task = classify_task_from_labels(source.label_column, labels)
    return source.model_copy(update={"task_config": task.model_dump(mode="json")})


def count_rows(source: LanceSource) -> int:
    """Return how many rows the entry gives training: in its ``where`` and split, with messages or an answer.

    Reads no image bytes (only ``id`` when a split applies). Rows a label run skipped or failed
    (all answers null) do not count; a stored answer the task does not allow still does (it is
    skipped at load time as ``label_not_in_task``).
    """
    if source.samples_version is not None:
        return count_samples(source)
    builder = RowBuilder(source)
    ds = open_at(source.uri, source.ref(), storage_options=source.storage_options())
    builder.require(ds)
    where = f"({source.where}) AND ({builder.has_text()})" if source.where else builder.has_text()
    if source.split == "all":
        return ds.count_rows(filter=where)
    ids = (i for b in scan_batches(ds, [source.id_column], where=where) for i in b.column(0).to_pylist())
    return sum(source.keeps(str(i)) for i in ids)


def iter_tables(
    source: LanceSource, *, fragment_ids: list[int] | None = None, report: ReadReport | None = None
) -> Iterator[pa.Table]:
    """Yield row tables of ``source`` batch by batch (optionally of some fragments only)."""
    report = report if report is not None else ReadReport()
    if source.samples_version is not None:  # fragments of the samples table
        for table in iter_sample_tables(source, fragment_ids=fragment_ids, skipped=report.skipped):
            report.kept += table.num_rows
            yield table
        return
    builder = RowBuilder(source)
    ds = open_at(source.uri, source.ref(), storage_options=source.storage_options())
    builder.require(ds)
    batch_size = rows_per_batch(ds)  # photos: a few dozen a batch, not 256
    for batch in scan_batches(ds, builder.columns, where=source.where, fragment_ids=fragment_ids, batch_size=batch_size):
        table = builder.build(batch, report)
        if table.num_rows:
            yield table


def load_rows(
    source: LanceSource,
    *,
    num_samples: int | None = None,
    max_samples: int | None = None,
    fit: Callable[[bytes], bytes] | None = None,
) -> Any:
    """Return an in-memory ``datasets.Dataset`` of the entry's rows, honouring num_samples/max_samples.

    ``num_samples`` samples like LLaMA-Factory does (a permutation, then repeats if larger);
    ``max_samples`` stops reading as soon as enough rows are in. ``fit`` (``image_fit.training_fit``)
    turns each image into what the dataset holds, batch by batch as it is read.
    """
    from datasets import Dataset
    from datasets.table import InMemoryTable

    report = ReadReport()
    parts, rows = [], 0
    for table in iter_tables(source, report=report):
        parts.append(table if fit is None else _fitted(table, fit))
        rows += table.num_rows
        if num_samples is None and max_samples is not None and rows >= max_samples:
            break
    if not parts:
        raise TableReadError(
            "no_rows",
            f"{source.uri} (version {source.ref()}, where {source.where!r}, split {source.split}) "
            f"gives no training rows ({report.summary()})",
        )
    table = pa.concat_tables(parts).combine_chunks()
    logger.info("lance dataset %s: %s", source.uri, report.summary())
    if num_samples is not None:
        indexes = np.random.permutation(len(table))[:num_samples]
        if num_samples > len(indexes):
            extra = np.random.choice(len(table), num_samples - len(indexes))
            indexes = np.concatenate((indexes, extra), axis=0)
        table = table.take(pa.array(indexes))
    if max_samples is not None:
        table = table.slice(0, min(max_samples, len(table)))
    return Dataset(InMemoryTable(table))


def _fitted(table: pa.Table, fit: Callable[[bytes], bytes]) -> pa.Table:
    """Return ``table`` with each of its rows' images passed through ``fit`` (itself when ``fit`` changed none)."""
    rows = table.column("images").to_pylist()
    images = [[fit(image) for image in row] for row in rows]
    if all(new is old for row, fitted in zip(rows, images, strict=True) for old, new in zip(row, fitted, strict=True)):
        return table
    return table.set_column(table.schema.get_field_index("images"), "images", pa.array(images, pa.list_(pa.binary())))


def _stream_tables(source_json: str, fragment_ids: list[int], fit_json: str = "null") -> Iterator[tuple[str, pa.Table]]:
    """Yield ``(key, rows)`` tables of the given fragments (runs where the stream is consumed; opens the table there).

    ``fit_json``: ``[template, max_pixels, min_pixels]`` of :func:`~llamafactory_ext.image_fit.training_fit`, or null.
    """
    from llamafactory_ext.image_fit import training_fit

    source = LanceSource.model_validate_json(source_json)
    fit = training_fit(*spec) if (spec := json.loads(fit_json)) else None
    for i, table in enumerate(iter_tables(source, fragment_ids=fragment_ids)):
        yield f"{fragment_ids[0]}-{i}", table if fit is None else _fitted(table, fit)


def stream_rows(source: LanceSource, fit: tuple[str, int, int] | None = None) -> Any:
    """Return a ``datasets.IterableDataset`` of the entry's rows with one shard per fragment.

    Arrow tables go straight to ``datasets`` (no per-row Python dicts until a map needs them).
    ``fit`` (a template name and its pixel bounds) passes each image through
    :func:`~llamafactory_ext.image_fit.training_fit` as it streams, as in memory: a photo turned by
    its EXIF orientation is trained on upright, and one larger than its training size is resized here.
    """
    from datasets import DatasetInfo, IterableDataset
    from datasets.iterable_dataset import ArrowExamplesIterable

    if source.samples_version is not None:
        fragments, features = sample_fragment_ids(source), sample_features()
    else:
        ds = open_at(source.uri, source.ref(), storage_options=source.storage_options())
        fragments, features = [f.fragment_id for f in list_fragments(ds)], row_features()
    examples = ArrowExamplesIterable(  # a list in kwargs: one shard per fragment
        _stream_tables, {"source_json": source.model_dump_json(), "fragment_ids": fragments, "fit_json": json.dumps(fit)}
    )
    return IterableDataset(examples, info=DatasetInfo(features=features))

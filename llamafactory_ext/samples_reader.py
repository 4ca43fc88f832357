"""Read the samples of a registered table: each sample's turns with its images' bytes, joined by id.

The samples table (:mod:`lance_io.samples`) is scanned at the entry's ``samples_version``; for
each batch of samples, the image bytes of the ids it refers to are looked up in the image table
at the entry's ``version`` with one ``id IN (...)`` filter, which Lance answers from the scalar
index on ``id`` (no scan of the image bytes). A batch holds as many samples as the image table
has rows in about 64 MB (:func:`lance_io.scan.rows_per_batch`). A sample showing one image twice gets its bytes
twice, in placeholder order. Rows come out as LLaMA-Factory's sharegpt converter wants them:
``messages``, ``images`` (bytes), ``system``, ``tools``.

The entry's ``where`` filters samples (``source_kind = 'sharegpt'``, ``split = 'train'``); its
``split`` keeps the samples whose *first image* falls in it (by the salted id hash), so every
conversation about one image lands on the same side.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lance
import pyarrow as pa

from lance_io.samples import IMAGE_IDS, open_samples
from lance_io.scan import open_at, rows_per_batch, scan_batches
from lance_io.schema import ID, MESSAGE_TYPE
from lance_io.sql import sql_strings
from llamafactory_ext.source import LanceSource

SAMPLE_ROW_SCHEMA = pa.schema(
    [
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("images", pa.list_(pa.binary())),
        ("system", pa.string()),
        ("tools", pa.string()),
    ]
)
READ_COLUMNS = [ID, IMAGE_IDS, "messages", "system", "tools"]


def sample_features() -> Any:
    """Return the ``datasets.Features`` of loaded samples (messages, images, system, tools)."""
    from datasets import Features, Sequence, Value

    return Features(
        {
            "messages": [{"role": Value("string"), "content": Value("string")}],
            "images": Sequence(Value("binary")),
            "system": Value("string"),
            "tools": Value("string"),
        }
    )


def open_entry_samples(source: LanceSource) -> lance.LanceDataset:
    """Return the samples table of the entry at its pinned samples version."""
    return open_samples(source.uri, source.samples_version, storage_options=source.storage_options())


def _split_key(sample_id: str, image_ids: list[str]) -> str:
    return image_ids[0] if image_ids else sample_id


def image_bytes(images: lance.LanceDataset, ids: list[str], image_column: str = "image") -> dict[str, bytes]:
    """Return id -> original bytes for ``ids`` (distinct), read through the ``id`` index."""
    if not ids:
        return {}
    table = images.to_table(columns=[ID, image_column], filter=f"{ID} IN ({sql_strings(ids)})")
    return dict(zip(table.column(ID).to_pylist(), table.column(image_column).to_pylist(), strict=True))


def build_samples(
    batch: pa.RecordBatch, source: LanceSource, images: lance.LanceDataset, skipped: dict[str, int]
) -> pa.Table:
    """Return the batch's samples in the entry's split, with their image bytes, as ``SAMPLE_ROW_SCHEMA``."""
    rows = [
        row
        for row in batch.select(READ_COLUMNS).to_pylist()
        if source.keeps(_split_key(row[ID], row[IMAGE_IDS]))
    ]
    found = image_bytes(images, sorted({i for row in rows for i in row[IMAGE_IDS]}), source.image_column)
    out: dict[str, list] = {name: [] for name in SAMPLE_ROW_SCHEMA.names}
    for row in rows:
        if any(i not in found for i in row[IMAGE_IDS]):  # only if the image table was rewritten by hand
            skipped["image_missing"] = skipped.get("image_missing", 0) + 1
            continue
        out["messages"].append(row["messages"])
        out["images"].append([found[i] for i in row[IMAGE_IDS]])
        out["system"].append(row["system"] or "")  # as LLaMA-Factory's own loader: "" when absent
        out["tools"].append(row["tools"] or "")
    return pa.table(out, schema=SAMPLE_ROW_SCHEMA)


def iter_sample_tables(
    source: LanceSource, *, fragment_ids: list[int] | None = None, skipped: dict[str, int] | None = None
) -> Iterator[pa.Table]:
    """Yield sample row tables of ``source`` batch by batch (optionally of some samples fragments only)."""
    samples = open_entry_samples(source)
    images = open_at(source.uri, source.ref(), storage_options=source.storage_options())
    skipped = skipped if skipped is not None else {}
    batch_size = rows_per_batch(images)  # a sample shows one image or more: as many samples as images would fit
    for batch in scan_batches(samples, READ_COLUMNS, where=source.where, fragment_ids=fragment_ids, batch_size=batch_size):
        table = build_samples(batch, source, images, skipped)
        if table.num_rows:
            yield table


def count_samples(source: LanceSource) -> int:
    """Return how many samples the entry gives training (in its ``where`` and split); reads no image bytes."""
    samples = open_entry_samples(source)
    if source.split == "all":
        return samples.count_rows(filter=source.where)
    return sum(
        source.keeps(_split_key(sample_id, image_ids))
        for batch in scan_batches(samples, [ID, IMAGE_IDS], where=source.where)
        for sample_id, image_ids in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)
    )


def sample_fragment_ids(source: LanceSource) -> list[int]:
    """Return the fragment ids of the samples table at the entry's samples version (one stream shard each)."""
    return [f.fragment_id for f in open_entry_samples(source).get_fragments()]

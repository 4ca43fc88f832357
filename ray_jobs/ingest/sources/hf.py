"""Hugging Face datasets saved with ``save_to_disk``, and ModelScope datasets from a local folder.

Images come from an ``Image`` feature (read as stored bytes, never decoded by ``datasets``) or a
raw bytes column; a ``ClassLabel`` truth column becomes its class name.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from ray_jobs.ingest.items import InputItem
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources.base import ListedSource, SourceError
from ray_jobs.ingest.sources.cells import arrow_rows_with_cells
from ray_jobs.ingest.sources.tabular import RowContext, map_columns, rows_to_items

SPLIT_COLUMN = "split"


def hf_disk_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of a dataset (or every split of a DatasetDict) saved with ``save_to_disk``."""
    import datasets

    try:
        loaded = datasets.load_from_disk(location)
    except (FileNotFoundError, ValueError) as exc:
        raise SourceError(f"{location} is not a dataset saved with save_to_disk: {exc}") from exc
    return _dataset_source(location, "hf", loaded, options)


def modelscope_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of a ModelScope dataset downloaded to a local folder.

    ``MsDataset.load(local_dir)`` hands a local folder to Hugging Face's packaged builders
    (``modelscope/msdatasets/ms_dataset.py``: "Load from local disk"); we call them directly, so
    nothing touches the network and ModelScope's optional dependencies are not needed.
    """
    import datasets

    if not Path(location).is_dir():
        raise SourceError(f"{location} is not a folder")
    cache = tempfile.mkdtemp(prefix="lancetag-modelscope-")
    try:
        loaded = datasets.load_dataset(location, cache_dir=cache)
    except (FileNotFoundError, ValueError) as exc:
        raise SourceError(f"{location} is not a ModelScope/Hugging Face dataset folder: {exc}") from exc
    return _dataset_source(location, "modelscope", loaded, options)


def _dataset_source(location: str, kind: str, loaded: Any, options: IngestOptions) -> ListedSource:
    import datasets

    splits: dict[str | None, datasets.Dataset] = (
        dict(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else {None: loaded}
    )
    first = next(iter(splits.values()))
    explicit = dict(options.columns)
    if "image" not in explicit:
        image_columns = [n for n, f in first.features.items() if isinstance(f, datasets.Image)]
        if image_columns:
            explicit["image"] = image_columns[0]
    mapping = map_columns(first.data.schema, explicit, location)
    truth_column = mapping.roles.get("truth")
    truth_feature = first.features.get(truth_column) if truth_column else None
    label_names = list(truth_feature.names) if isinstance(truth_feature, datasets.ClassLabel) else None
    if len(splits) > 1:
        mapping.metadata_fields[SPLIT_COLUMN] = pa.string()

    def items() -> Iterator[InputItem]:
        for split, dataset in splits.items():
            name = f"{location}#{split}" if split else location
            context = RowContext(
                name=name, kind=kind, root=Path(location), options=options, label_names=label_names
            )
            batches = arrow_rows_with_cells(dataset, mapping.roles.get("image"), location)
            if batches is None:  # bytes the driver reads itself (no Arrow files of its own under the folder)
                table = dataset.flatten_indices().data if dataset._indices is not None else dataset.data
                batches = table.to_batches(1024)
            for item in rows_to_items(batches, mapping, context):
                if len(splits) > 1:
                    item.metadata[SPLIT_COLUMN] = split
                yield item

    return ListedSource(kind, items, mapping.metadata_fields)

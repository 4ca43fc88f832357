"""Hugging Face datasets saved with ``save_to_disk``, and ModelScope datasets from a local folder.

Images come from an ``Image`` feature (read as stored bytes, never decoded by ``datasets``) or a
raw bytes column; a ``ClassLabel`` truth column becomes its class name.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from ray_jobs.ingest.items import InputItem
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources.base import ListedSource, SourceError
from ray_jobs.ingest.sources.cells import arrow_rows_with_cells, parquet_dataset_rows
from ray_jobs.ingest.sources.tabular import RowContext, map_columns, rows_to_items

SPLIT_COLUMN = "split"


def hf_disk_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of a dataset (or every split of a DatasetDict) saved with ``save_to_disk``."""
    import datasets

    try:
        loaded = datasets.load_from_disk(location)
    except (FileNotFoundError, ValueError) as exc:
        raise SourceError(f"{location} is not a dataset saved with save_to_disk: {exc}") from exc
    return _arrow_source(location, "hf", loaded, options)


def modelscope_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of a ModelScope dataset downloaded to a local folder.

    ``MsDataset.load(local_dir)`` hands a local folder to Hugging Face's packaged builders
    (``modelscope/msdatasets/ms_dataset.py``: "Load from local disk"); we call them directly, so
    nothing touches the network and ModelScope's optional dependencies are not needed. A folder
    whose data files are all Parquet (the Hub's layout) is read in place, split by Hugging Face's
    own file patterns: the builders would first copy every image into an Arrow cache on the
    driver's disk.
    """
    import datasets

    if not Path(location).is_dir():
        raise SourceError(f"{location} is not a folder")
    parquet = parquet_splits(str(Path(location).resolve()))
    if parquet is not None:
        return _parquet_source(location, "modelscope", parquet, options)
    cache = tempfile.mkdtemp(prefix="lancetag-modelscope-")
    try:
        try:
            loaded = datasets.load_dataset(location, cache_dir=cache)
        except (FileNotFoundError, ValueError) as exc:
            raise SourceError(f"{location} is not a ModelScope/Hugging Face dataset folder: {exc}") from exc
        source = _arrow_source(location, "modelscope", loaded, options)
    except BaseException:
        shutil.rmtree(cache, ignore_errors=True)
        raise
    # The builders' Arrow cache is this run's alone: it goes when the source does (the job holds it).
    weakref.finalize(source, shutil.rmtree, cache, True)
    return source


def parquet_splits(location: str) -> dict[str, list[str]] | None:
    """Return ``{split: Parquet files}`` as ``load_dataset`` would find them; None unless every data file is Parquet.

    The files of the default configuration its README.md declares (``configs:``, as
    ``push_to_hub`` writes it), else Hugging Face's data-file patterns. None too when the card
    declares several configurations and none is the default: the builders then ask for a name.
    """
    from datasets.data_files import DataFilesDict, get_data_patterns
    from datasets.exceptions import DataFilesNotFoundError

    try:
        patterns = _declared_patterns(Path(location) / "README.md")
        if patterns is None:
            patterns = get_data_patterns(location)
        found = DataFilesDict.from_patterns(patterns, base_path=location) if patterns else {}
    except (FileNotFoundError, DataFilesNotFoundError, ValueError):
        return None
    splits = {str(split): [str(f) for f in files] for split, files in found.items()}
    files = [f for listed in splits.values() for f in listed]
    return splits if files and all(f.endswith(".parquet") for f in files) else None


def _declared_patterns(readme: Path) -> dict[str, Any] | None:
    """``{split: patterns}`` of the default configuration a dataset card declares; None without one
    ({} when there are several and none is the default)."""
    from datasets.data_files import sanitize_patterns
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    if not readme.is_file():
        return None
    configs = MetadataConfigs.from_dataset_card_data(DatasetCard.load(readme).data)
    if not configs:
        return None
    defaults = [name for name, config in configs.items() if config.get("default")]
    name = defaults[0] if defaults else "default" if "default" in configs or len(configs) == 1 else None
    if name is None:
        return {}
    files = configs.get(name, next(iter(configs.values()))).get("data_files")
    return sanitize_patterns(files) if files else None


def _arrow_source(location: str, kind: str, loaded: Any, options: IngestOptions) -> ListedSource:
    """A loaded Dataset or DatasetDict: images stay in its own Arrow files when they lie under ``location``."""
    import datasets

    splits: dict[str | None, datasets.Dataset] = (
        dict(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else {None: loaded}
    )

    def rows(dataset: datasets.Dataset, image: str | None) -> Iterable[Any]:
        batches = arrow_rows_with_cells(dataset, image, location)
        if batches is None:  # bytes the driver reads itself (no Arrow files of its own under the folder)
            table = dataset.flatten_indices().data if dataset._indices is not None else dataset.data
            batches = table.to_batches(1024)
        return batches

    listed = {split: (dataset.features, functools.partial(rows, dataset)) for split, dataset in splits.items()}
    return _split_source(location, kind, next(iter(splits.values())).data.schema, listed, options)


def _parquet_source(location: str, kind: str, splits: dict[str, list[str]], options: IngestOptions) -> ListedSource:
    """Parquet files by split: images stay in the files for the workers (``cells.parquet_rows_with_cells``)."""
    import datasets
    import pyarrow.dataset as pads
    from pyarrow.fs import LocalFileSystem

    try:
        opened = {split: pads.dataset(files, format="parquet") for split, files in splits.items()}
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"cannot read the Parquet files of {location}: {exc}") from exc

    listed = {
        split: (
            datasets.Features.from_arrow_schema(dataset.schema),
            functools.partial(parquet_dataset_rows, dataset, filesystem=LocalFileSystem(), uri_of=str),
        )
        for split, dataset in opened.items()
    }
    return _split_source(location, kind, next(iter(opened.values())).schema, listed, options)


def _split_source(
    location: str,
    kind: str,
    schema: pa.Schema,
    splits: dict[str | None, tuple[Any, Callable[[str | None], Iterable[Any]]]],
    options: IngestOptions,
) -> ListedSource:
    """Rows of every split (``splits[split]`` is its features and the lister of its rows by image
    column); an ``Image`` feature is the image, a ``ClassLabel`` truth its class name (by each split's
    own names), and the split a column when there are several. Columns are mapped from the first split's."""
    import datasets

    features = next(iter(splits.values()))[0]
    explicit = dict(options.columns)
    if "image" not in explicit:
        image_columns = [n for n, f in features.items() if isinstance(f, datasets.Image)]
        if image_columns:
            explicit["image"] = image_columns[0]
    mapping = map_columns(schema, explicit, location)
    truth_column = mapping.roles.get("truth")
    for split, (split_features, _) in splits.items():
        lacking = [c for c in mapping.roles.values() if c not in split_features]
        if lacking:
            raise SourceError(f"{location}: split {split!r} has no {', '.join(lacking)} column, which the first split has")
    if len(splits) > 1:
        mapping.metadata_fields[SPLIT_COLUMN] = pa.string()
    root = Path(options.manifest_root) if options.manifest_root else Path(location)  # for image paths in a column

    def items() -> Iterator[InputItem]:
        for split, (split_features, rows) in splits.items():
            name = f"{location}#{split}" if split else location
            truth_feature = split_features.get(truth_column) if truth_column else None
            label_names = list(truth_feature.names) if isinstance(truth_feature, datasets.ClassLabel) else None
            context = RowContext(name=name, kind=kind, root=root, options=options, label_names=label_names)
            for item in rows_to_items(rows(mapping.image_column), mapping, context):
                if len(splits) > 1:
                    item.metadata[SPLIT_COLUMN] = split
                yield item

    return ListedSource(kind, items, mapping.metadata_fields)

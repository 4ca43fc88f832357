"""Make Lance entries loadable by LLaMA-Factory's own pipeline, without forking it.

``activate()`` wraps ``llamafactory.data.loader._load_single_dataset`` (looked up at call time
by ``_get_merged_dataset``): a Lance entry is read by :mod:`llamafactory_ext.reader` and then
goes through LLaMA-Factory's ``align_dataset`` and preprocessing like any other dataset;
every other entry goes to the original function. It wraps ``_get_preprocessed_dataset`` too: a
supervised run that reads a Lance entry refuses examples longer than ``cutoff_len``
(:mod:`llamafactory_ext.cutoff`). It also teaches the web UI's preview
(``webui.components.data``) to show Lance entries. Idempotent.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)
_MARK = "__lancetag_wrapped__"


def _wrap_loader(original: Any) -> Any:
    """Return ``_load_single_dataset`` that reads Lance entries itself and defers the rest."""

    @functools.wraps(original)
    def load_single_dataset(dataset_attr: Any, model_args: Any, data_args: Any, training_args: Any) -> Any:
        from llamafactory.data.converter import align_dataset

        from llamafactory_ext.image_fit import training_fit
        from llamafactory_ext.reader import load_rows, resolve, stream_rows
        from llamafactory_ext.source import find_lance_entry

        found = None
        if dataset_attr.load_from == "file":
            found = find_lance_entry(data_args.dataset_dir, dataset_attr.dataset_name)
        if found is None:
            return original(dataset_attr, model_args, data_args, training_args)
        name, _entry, source = found
        source = resolve(source)
        logger.info("lancetag: loading %s from Lance %s @ %s", name, source.uri, source.ref())
        bounds = (data_args.template, model_args.image_max_pixels, model_args.image_min_pixels)
        if data_args.streaming:  # each image upright if its EXIF turns it (llamafactory_ext.image_fit)
            dataset = stream_rows(source, fit=bounds if training_fit(*bounds) else None)
        else:  # held in memory: each image at its training size when that is smaller, and upright
            fit = training_fit(*bounds)
            dataset = load_rows(
                source, num_samples=dataset_attr.num_samples, max_samples=data_args.max_samples, fit=fit
            )
        return align_dataset(dataset, dataset_attr, data_args, training_args)

    setattr(load_single_dataset, _MARK, True)
    return load_single_dataset


def _wrap_preprocessing(original: Any) -> Any:
    """Return ``_get_preprocessed_dataset`` that refuses cut examples in a supervised run reading Lance."""

    @functools.wraps(original)
    def get_preprocessed_dataset(dataset: Any, data_args: Any, training_args: Any, stage: str, *rest: Any, **kwargs: Any) -> Any:
        from llamafactory_ext.cutoff import preprocess_uncut

        if stage != "sft" or data_args.packing or not _reads_lance(data_args):
            return original(dataset, data_args, training_args, stage, *rest, **kwargs)
        return preprocess_uncut(original, dataset, data_args, training_args, stage, *rest, **kwargs)

    setattr(get_preprocessed_dataset, _MARK, True)
    return get_preprocessed_dataset


def _reads_lance(data_args: Any) -> bool:
    from llamafactory_ext.source import lance_entries

    if str(data_args.dataset_dir).startswith(("ONLINE", "REMOTE:")):
        return False
    entries = lance_entries(data_args.dataset_dir)  # the loader read this same file a moment ago
    return any(name in entries for name in [*(data_args.dataset or ()), *(data_args.eval_dataset or ())])


def activate() -> bool:
    """Install the Lance loader (and web UI preview) into LLaMA-Factory; return True if it was newly installed."""
    import llamafactory.data.loader as loader

    if getattr(loader._load_single_dataset, _MARK, False):
        return False
    loader._load_single_dataset = _wrap_loader(loader._load_single_dataset)
    loader._get_preprocessed_dataset = _wrap_preprocessing(loader._get_preprocessed_dataset)
    try:
        from llamafactory_ext.preview import patch_preview

        patch_preview()
    except ImportError:  # the web UI package is optional in some LLaMA-Factory builds
        pass
    return True

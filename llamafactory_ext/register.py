"""Register a Lance table as a LLaMA-Factory dataset: resolve and pin what training will read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lance_io.samples import open_samples, samples_exist, samples_version_at
from lance_io.scan import open_at
from llamafactory_ext.reader import count_rows, resolve
from llamafactory_ext.source import (
    LanceEntryError,
    LanceSource,
    Split,
    check_entry_name,
    entry_for,
    read_dataset_info,
    write_entry,
)


@dataclass(frozen=True)
class Registration:
    """What ``register_dataset`` wrote: entry name, file, pinned version and the rows training gets."""

    name: str
    dataset_info: Path
    uri: str
    version: int
    tag: str | None
    rows: int

    def as_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return {**self.__dict__, "dataset_info": str(self.dataset_info)}


def register_dataset(
    uri: str,
    name: str,
    dataset_dir: str | Path,
    *,
    version: int | str | None = None,
    task: str | None = None,
    where: str | None = None,
    label_column: str | None = None,
    messages_column: str | None = None,
    split: Split = "all",
    val_fraction: float = 0.1,
    num_samples: int | None = None,
    storage_options_env: dict[str, str] | None = None,
) -> Registration:
    """Write or update entry ``name`` of ``dataset_dir/dataset_info.json`` for the table at ``uri``.

    Without ``version`` the current latest version is pinned; a tag stays a tag (tags can be
    moved on purpose). Without ``label_column`` or ``messages_column``, the table's samples
    (:mod:`lance_io.samples`) are registered if it has any, pinned at the samples version that
    goes with the image version; else a ``messages`` column if the table has one, else
    ``truth``. Without ``task``, a label column gets the default classify task over the labels
    present at that version (snapshotted in the entry).
    """
    from lance_io.schema import MESSAGES, TRUTH

    if num_samples is not None and num_samples < 1:
        raise LanceEntryError("bad_option", f"num_samples must be at least 1, not {num_samples}")
    check_entry_name(read_dataset_info(dataset_dir), name, dataset_dir)  # before any work (write_entry checks at the write)
    probe = LanceSource(uri=uri, label_column="x", storage_options_env=storage_options_env or {})
    ds = open_at(uri, version, storage_options=probe.storage_options())
    samples_version = None
    if label_column is None and messages_column is None:
        if samples_exist(uri, storage_options=probe.storage_options()):
            samples_version = _samples_version(uri, version, ds.version, probe.storage_options())
        elif MESSAGES in ds.schema.names:
            messages_column = MESSAGES
        else:
            label_column = TRUTH
    tag = version if isinstance(version, str) and not version.isdigit() else None
    source = LanceSource(
        uri=uri,
        version=None if tag else ds.version,
        tag=tag,
        where=where,
        split=split,
        val_fraction=val_fraction,
        label_column=label_column,
        messages_column=messages_column,
        samples_version=samples_version,
        task=task,
        storage_options_env=storage_options_env or {},
    )
    if task is not None:
        source = source.model_copy(update={"task_config": source.load_task().model_dump(mode="json")})
    source = resolve(source)
    rows = count_rows(source)  # checks the columns too, before anything is written
    if rows == 0 and tag is None:  # pinned: it stays empty (a tag may move on to rows)
        chosen = " and ".join(x for x in (f"matches {where!r}" if where else "", f"falls in the {split} split" if split != "all" else "") if x)
        raise LanceEntryError(
            "no_rows", f"no row of {uri} at version {ds.version}{' that ' + chosen if chosen else ''} has anything to train on "
            "(an image and its label or conversation); check --where, --split and the label column"
        )
    path = write_entry(dataset_dir, name, entry_for(source, name, num_samples=num_samples))
    return Registration(name, path, uri, ds.version, tag, rows)


def _samples_version(
    uri: str, asked: int | str | None, images_version: int, storage_options: dict[str, str] | None
) -> int:
    """Return the samples version to pin: the latest, or the one written against an older image version asked for."""
    pinned = (
        open_samples(uri, storage_options=storage_options).version
        if asked is None
        else samples_version_at(uri, images_version, storage_options=storage_options)
    )
    if pinned is None:
        raise LanceEntryError(
            "no_samples", f"{uri} had no samples at version {asked}; register a later version or a label column"
        )
    return pinned

"""Lance tables as entries of LLaMA-Factory's ``dataset_info.json``.

An entry keeps LLaMA-Factory's own keys with their stock meaning (``formatting``,
``columns``, ``tags``, ``ranking``, ``num_samples``) describing the *loaded* dataset, which
always has a sharegpt ``messages`` column and an ``images`` column, and adds a ``lance``
block saying where the rows come from::

    "digits": {
      "file_name": "lance:digits (needs the lancetag LLaMA-Factory extension, see docs/training.md)",
      "formatting": "sharegpt",
      "columns": {"messages": "messages", "images": "images"},
      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
               "assistant_tag": "assistant", "system_tag": "system"},
      "lance": {"uri": "/data/digits.lance", "version": 3, "where": "truth IS NOT NULL",
                "split": "train", "label_column": "truth", "task": "digits", "task_config": {...}}
    }

``file_name`` names no file: stock LLaMA-Factory (extension inactive) fails with
"File .../lance:digits (needs the lancetag ...) not found." instead of loading anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lance_io.reasons import ReasonError
from lance_io.scan import Predicate
from lance_io.splits import split_of
from lance_io.tasks import Task, load_task, task_from_dict

DATA_CONFIG = "dataset_info.json"
FILE_NAME_PREFIX = "lance:"
SHAREGPT_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
}
Split = Literal["train", "validation", "all"]


class LanceSource(BaseModel):
    """The ``lance`` block of a dataset entry: which rows of which table version, and how to turn them into chats."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(description="Table URI (local path or s3://...)")
    version: int | None = Field(None, description="Pinned version number; set by `lancetag lf register`")
    tag: str | None = Field(None, description="Tag to read instead of a version number")
    where: Predicate = Field(None, description='SQL filter on table columns, e.g. "truth IS NOT NULL"')
    split: Split = Field("all", description="Rows kept after the id-hash split")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of ids in the validation split")
    id_column: str = Field("id", description="Column whose hash decides the split")
    image_column: str = Field("image", description="Column of original image bytes")
    messages_column: str | None = Field(
        None, description="Column of sharegpt turns (list<struct<role, content>>)"
    )
    label_column: str | None = Field(None, description="Label column to build messages from (with task)")
    samples_version: int | None = Field(
        None, description="Read the table's samples (lance_io.samples) at this samples-table version"
    )
    task: str | None = Field(
        None, description="Task name or YAML path the messages follow (lance_io.tasks)"
    )
    task_config: dict[str, Any] | None = Field(None, description="Snapshot of the task at registration")
    storage_options_env: dict[str, str] = Field(
        default_factory=dict, description="storage option -> environment variable holding its value"
    )

    @model_validator(mode="after")
    def _one_message_source(self) -> LanceSource:
        given = [self.messages_column, self.label_column, self.samples_version]
        if sum(value is not None for value in given) != 1:
            raise ValueError(
                "give exactly one of samples_version (the table's samples), messages_column (ready chats) "
                "or label_column (+ task)"
            )
        if self.version is not None and self.tag is not None:
            raise ValueError("give a version or a tag, not both")
        return self

    def keeps(self, row_id: str) -> bool:
        """Return whether ``row_id`` is in this entry's split (validation drawn by a salted id hash)."""
        if self.split == "all":
            return True
        return split_of(row_id, self.val_fraction, held_out="validation", salt="validation") == self.split

    def load_task(self) -> Task:
        """Return the task the messages follow: the snapshot taken at registration, else by name."""
        if self.task_config is not None:
            return task_from_dict(self.task_config, source=f"task snapshot {self.task or ''}".strip())
        if self.task is None:
            raise LanceEntryError("task_missing", "a label column needs a task (or labels to build a classify task)")
        return load_task(self.task)

    def ref(self) -> int | str | None:
        """Return the version number or tag to open (None: latest)."""
        return self.version if self.version is not None else self.tag

    def storage_options(self) -> dict[str, str] | None:
        """Return storage options read from the named environment variables (secrets stay out of JSON)."""
        if not self.storage_options_env:
            return None
        missing = [env for env in self.storage_options_env.values() if env not in os.environ]
        if missing:
            raise LanceEntryError(
                "storage_options_missing",
                f"storage options need environment variables {', '.join(missing)}; set them first"
            )
        return {key: os.environ[env] for key, env in self.storage_options_env.items()}


class LanceEntryError(ReasonError):
    """A dataset entry that cannot be used."""


def placeholder_file_name(name: str) -> str:
    """Return the ``file_name`` of a Lance entry: a name that tells stock LLaMA-Factory what is missing."""
    return f"{FILE_NAME_PREFIX}{name} (needs the lancetag LLaMA-Factory extension, see docs/training.md)"


def entry_for(source: LanceSource, name: str, *, num_samples: int | None = None) -> dict[str, Any]:
    """Return the full ``dataset_info.json`` entry for ``source`` registered as ``name``."""
    entry: dict[str, Any] = {
        "file_name": placeholder_file_name(name),
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": dict(SHAREGPT_TAGS),
        "lance": source.model_dump(mode="json", exclude_none=True, exclude_defaults=False),
    }
    if source.samples_version is not None:  # samples carry their own system prompt and tools
        entry["columns"].update(system="system", tools="tools")
    if num_samples is not None:
        entry["num_samples"] = num_samples
    return entry


def dataset_names(value: Any) -> list[str]:
    """Return the dataset names of a ``dataset``/``eval_dataset`` value (a comma-separated string or a list)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip()]
    return list(value)


def read_dataset_info(dataset_dir: str | Path) -> dict[str, Any]:
    """Return the parsed ``dataset_info.json`` of ``dataset_dir`` ({} when absent); ``bad_dataset_info``
    when it is not a JSON object (LLaMA-Factory could not read it either)."""
    path = Path(dataset_dir) / DATA_CONFIG
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LanceEntryError("bad_dataset_info", f"{path} is not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(info, dict):
        raise LanceEntryError("bad_dataset_info", f"{path} holds a JSON {type(info).__name__}, not an object of datasets by name")
    return info


def check_entry_name(info: dict[str, Any], name: str, dataset_dir: str | Path) -> None:
    """Refuse a name LLaMA-Factory cannot select, or one an entry of ``info`` (``dataset_dir``'s
    ``dataset_info.json``) that is not a Lance table holds."""
    if not name or name != name.strip() or "," in name:
        raise LanceEntryError(
            "bad_dataset_name",
            f"dataset name {name!r}: LLaMA-Factory selects datasets as a comma-separated list, so a name is not "
            "empty and holds no comma and no space at either end",
        )
    existing = info.get(name)
    if existing is not None and not (isinstance(existing, dict) and "lance" in existing):
        held = existing.get("file_name") or existing.get("hf_hub_url") or existing.get("script_url") if isinstance(existing, dict) else existing
        raise LanceEntryError(
            "dataset_exists",
            f"{Path(dataset_dir) / DATA_CONFIG} already defines {name!r} as a dataset that is not a Lance table ({held}); "
            "choose another --name (registering again replaces Lance entries only)",
        )


def write_entry(dataset_dir: str | Path, name: str, entry: dict[str, Any]) -> Path:
    """Add or replace the Lance entry ``name`` in ``dataset_dir/dataset_info.json``, keeping the others; return the path."""
    directory = Path(dataset_dir)
    info = read_dataset_info(directory)
    check_entry_name(info, name, directory)
    directory.mkdir(parents=True, exist_ok=True)
    info[name] = entry
    path = directory / DATA_CONFIG
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: the web UI re-reads this file on every focus
    return path


def lance_source_of(entry: dict[str, Any], *, name: str = "?") -> LanceSource | None:
    """Return the typed ``lance`` block of an entry, None for ordinary entries."""
    block = entry.get("lance") if isinstance(entry, dict) else None
    if block is None:
        return None
    try:
        return LanceSource.model_validate(block)
    except ValueError as err:
        raise LanceEntryError("bad_lance_entry", f"dataset {name!r}: {err}") from err


def find_lance_entry(dataset_dir: Any, file_name: str) -> tuple[str, dict[str, Any], LanceSource] | None:
    """Return ``(name, entry, source)`` of the Lance entry whose ``file_name`` is ``file_name``, else None.

    LLaMA-Factory passes only ``file_name`` down to the loader, so that is the key we match on.
    """
    if not isinstance(file_name, str) or not file_name.startswith(FILE_NAME_PREFIX):
        return None
    if isinstance(dataset_dir, dict):
        info = dataset_dir
    elif isinstance(dataset_dir, str | Path) and not str(dataset_dir).startswith(("ONLINE", "REMOTE:")):
        info = read_dataset_info(dataset_dir)
    else:
        return None
    for name, entry in info.items():
        if isinstance(entry, dict) and entry.get("file_name") == file_name and "lance" in entry:
            source = lance_source_of(entry, name=name)
            assert source is not None
            return name, entry, source
    return None


def lance_entries(dataset_dir: str | Path) -> dict[str, LanceSource]:
    """Return every Lance entry of ``dataset_dir/dataset_info.json`` by name."""
    out = {}
    for name, entry in read_dataset_info(dataset_dir).items():
        source = lance_source_of(entry, name=name)
        if source is not None:
            out[name] = source
    return out

"""LLaMA-Factory sharegpt JSON: samples of chat turns with ``<image>`` placeholders and an ``images`` list.

Each sample becomes one row of the samples table (:mod:`lance_io.samples`): its turns (both role
spellings, ``role``/``content`` and ``from``/``value``), optional ``system`` and ``tools``, and
its images in order, each an item of the image table (deduplicated by content there). The file
may be on object storage (``s3://bucket/data/train.json``): it is read on the driver, and its
relative image paths are keys under its prefix. A sample
whose ``<image>`` placeholders do not match its images, or whose turns are not sharegpt, is an
error record of its own; its images are still ingested. A sample without images is a text-only
sample: its item counts as skipped (no image), the sample is kept.
Every image row also records its first sample (``file.json#index``) and position in it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from lance_io.storage import is_object_uri, pyarrow_filesystem, resolve_storage_options
from ray_jobs.ingest.items import InputItem, SampleSpec
from ray_jobs.ingest.messages import InvalidMessages, normalize_turns, placeholder_problem
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources.base import ListedSource, SourceError, inside_root, object_item

KIND = "sharegpt"
SAMPLE, IMAGE_INDEX, CONVERSATION = "sharegpt_sample", "sharegpt_image_index", "sharegpt_conversation"
METADATA_FIELDS = {SAMPLE: pa.string(), IMAGE_INDEX: pa.int32(), CONVERSATION: pa.string()}


def looks_like_sharegpt(location: str | Path) -> bool:
    """True when a JSON/JSONL file's first sample has chat turns and an ``images`` list."""
    try:
        first = next(iter(_samples(str(location))), None)
    except (SourceError, OSError):
        return False
    return isinstance(first, dict) and "images" in first and ("messages" in first or "conversations" in first)


def sharegpt_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of a sharegpt JSON or JSONL file, local or on object storage; image paths are
    relative to its folder (its prefix)."""
    if is_object_uri(location):
        root: Path | str = location.rsplit("/", 1)[0]
    else:
        if not Path(location).is_file():
            raise SourceError(f"{location} is not a file")
        location = str(Path(location))
        root = Path(options.manifest_root) if options.manifest_root else Path(location).parent
    return ListedSource(KIND, lambda: _items(location, root, options), dict(METADATA_FIELDS))


def _read_text(location: str) -> str:
    if not is_object_uri(location):
        return Path(location).read_text(encoding="utf-8")
    filesystem, key = pyarrow_filesystem(location, resolve_storage_options(location))
    try:
        with filesystem.open_input_stream(key) as stream:
            return stream.read().decode("utf-8")
    except OSError as exc:
        raise SourceError(f"cannot read {location}: {exc}") from exc


def _samples(location: str) -> list[Any]:
    text = _read_text(location)
    try:
        if location.lower().endswith((".jsonl", ".ndjson")):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        samples = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{location} is not valid JSON: {exc}") from exc
    if not isinstance(samples, list):
        raise SourceError(f"{location} must hold a JSON list of samples")
    return samples


def _items(location: str, root: Path | str, options: IngestOptions) -> Iterator[InputItem]:
    for index, sample in enumerate(_samples(location)):
        name = f"{location}#{index}"
        spec = _spec(sample, location, index)
        images = sample.get("images") if isinstance(sample, dict) else None
        if isinstance(images, str):
            images = [images]
        if not images:
            yield InputItem(source=name, source_kind=KIND, locator="none", skip="text-only sample", sample=spec)
            continue
        turns = sample.get("messages", sample.get("conversations"))
        for position, image in enumerate(images):
            item = _image_item(image, root, options, f"{name}/images/{position}")
            item.sample, item.sample_position = spec, position
            item.metadata = {
                SAMPLE: name,
                IMAGE_INDEX: position,
                CONVERSATION: json.dumps(turns, ensure_ascii=False) if len(images) > 1 else None,
            }
            yield item


def _spec(sample: Any, source: str, index: int) -> SampleSpec:
    """Return the training sample of one sharegpt record (with its error when the turns are unusable)."""
    images = sample.get("images") if isinstance(sample, dict) else None
    count = 1 if isinstance(images, str) else len(images or [])
    spec = SampleSpec(source=source, source_kind=KIND, index=index, images=count, messages=None)
    if not isinstance(sample, dict):
        spec.error = ("invalid_sample", f"a sample must be a JSON object, got {type(sample).__name__}")
        return spec
    try:
        spec.messages = normalize_turns(sample.get("messages", sample.get("conversations")))
    except InvalidMessages as exc:
        spec.error = ("invalid_messages", f"{exc} (sample {index})")
        return spec
    problem = placeholder_problem(spec.messages, count)
    if problem is not None:
        spec.error = ("placeholder_mismatch", f"{problem} (sample {index})")
    spec.system = _text(sample.get("system"))
    spec.tools = _text(sample.get("tools"))
    extra = {k: v for k, v in sample.items() if k not in _SAMPLE_KEYS}
    spec.metadata = extra or None
    spec.split = sample.get("split") if isinstance(sample.get("split"), str) else None
    return spec


_SAMPLE_KEYS = {"messages", "conversations", "images", "system", "tools", "split"}


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _image_item(image: Any, root: Path | str, options: IngestOptions, name: str) -> InputItem:
    if isinstance(image, dict):
        image = image.get("path") or image.get("url")
    if not isinstance(image, str) or not image:
        return InputItem(
            source=name,
            source_kind=KIND,
            locator="none",
            error=("missing_location", "the image entry is not a path"),
        )
    if image.startswith(("http://", "https://")):
        return InputItem(source=image, source_kind=KIND, locator="url", url=image)
    if is_object_uri(image):
        return InputItem(source=image, source_kind=KIND, locator="object", url=image)
    if isinstance(root, str):  # the file is on object storage
        return object_item(image, KIND, root)
    resolved = Path(image) if Path(image).is_absolute() else root / image
    if not options.allow_outside_root and not inside_root(resolved, root):
        return InputItem(
            source=image,
            source_kind=KIND,
            locator="none",
            error=(
                "outside_root",
                f"the image path leads outside {root} (--manifest-root or --allow-outside-root)",
            ),
        )
    return InputItem(source=image, source_kind=KIND, locator="path", path=str(resolved))

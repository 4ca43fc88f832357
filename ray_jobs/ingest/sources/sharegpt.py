"""LLaMA-Factory sharegpt JSON: samples of chat turns with ``<image>`` placeholders and an ``images`` list.

Each sample becomes one row of the samples table (:mod:`lance_io.samples`): its turns (both role
spellings, ``role``/``content`` and ``from``/``value``), optional ``system`` and ``tools``, and
its images in order, each an item of the image table (deduplicated by content there). The file
may be on object storage (``s3://bucket/data/train.json``): it is read on the driver (a JSONL
file streamed a line at a time, so the driver's memory does not grow with it; detecting the kind
reads the first sample only), and its relative image paths are keys under its prefix. A sample
whose ``<image>`` placeholders do not match its images, or whose turns are not sharegpt, is an
error record of its own; its images are still ingested. A sample without images is a text-only
sample: its item counts as skipped (no image), the sample is kept.
Every image row also records its first sample (``file.json#index``) and position in it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from lance_io.errors import printable
from lance_io.storage import is_object_uri, pyarrow_filesystem, resolve_storage_options
from ray_jobs.ingest.items import InputItem, SampleSpec
from ray_jobs.ingest.messages import InvalidMessages, normalize_turns, placeholder_problem
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources.base import ListedSource, SourceError, inside_root, object_item
from ray_jobs.ingest.sources.tabular import DEFAULT_COLUMNS

KIND = "sharegpt"
SAMPLE, IMAGE_INDEX, CONVERSATION = "sharegpt_sample", "sharegpt_image_index", "sharegpt_conversation"
METADATA_FIELDS = {SAMPLE: pa.string(), IMAGE_INDEX: pa.int32(), CONVERSATION: pa.string()}


def looks_like_sharegpt(location: str | Path) -> bool:
    """True when a JSON/JSONL file's first sample has chat turns and an ``images`` list, or chat turns and
    no column a manifest locates an image by (a text-only sample first). Only that sample is read."""
    try:
        first = _first_sample(str(location))
    except (SourceError, OSError, ValueError):  # ValueError: a first line that is not JSON, or not UTF-8
        return False
    if not isinstance(first, dict) or not ("messages" in first or "conversations" in first):
        return False
    locating = {name for role in ("path", "url", "image") for name in DEFAULT_COLUMNS[role]}
    return "images" in first or not locating & set(first)


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


@dataclass(frozen=True)
class InvalidLine:
    """A JSONL line that is not JSON: an error record of its own, the other lines still ingest."""

    message: str


@contextmanager
def _text_stream(location: str) -> Iterator[io.TextIOBase]:
    """The file as text, streamed: local, or an object read as it comes."""
    if not is_object_uri(location):
        # bytes that are not UTF-8 are kept (as Python keeps a file name's): a path of them still finds
        # its file, and a sample whose text holds them is refused by _is_text
        with open(location, encoding="utf-8", errors="surrogateescape") as handle:
            yield handle
        return
    filesystem, key = pyarrow_filesystem(location, resolve_storage_options(location))
    try:
        with filesystem.open_input_stream(key) as stream:
            yield io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise SourceError(f"cannot read {location}: {exc}") from exc


def _is_jsonl(location: str) -> bool:
    return location.lower().endswith((".jsonl", ".ndjson"))


def _samples(location: str) -> Iterator[Any]:
    """Yield the file's samples. JSONL is streamed a line at a time (the driver holds one line); a
    line that is not JSON comes as an :class:`InvalidLine`. A JSON file is one document, read whole."""
    with _text_stream(location) as text:
        if _is_jsonl(location):
            for number, line in enumerate(text, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield InvalidLine(f"line {number} is not valid JSON: {exc}")
            return
        try:
            samples = json.loads(text.read())
        except json.JSONDecodeError as exc:
            raise SourceError(f"{location} is not valid JSON: {exc}") from exc
    if not isinstance(samples, list):
        raise SourceError(f"{location} must hold a JSON list of samples")
    yield from samples


def _first_sample(location: str, chunk: int = 1 << 16) -> Any:
    """The file's first sample, read from its start only (a JSON list is decoded up to its first element)."""
    with _text_stream(location) as text:
        if _is_jsonl(location):
            return next((json.loads(line) for line in text if line.strip()), None)
        prefix = ""
        while True:
            more = text.read(chunk)
            prefix += more
            body = prefix.lstrip()
            if body and not body.startswith("["):
                return None
            try:
                return json.JSONDecoder().raw_decode(body[1:].lstrip())[0] if body else None
            except json.JSONDecodeError:
                if not more:
                    return None
                chunk *= 4


def _items(location: str, root: Path | str, options: IngestOptions) -> Iterator[InputItem]:
    for index, sample in enumerate(_samples(location)):
        name = f"{location}#{index}"
        spec = _spec(sample, location, index)
        images = _image_list(sample)
        if not images:
            why = "text-only sample" if spec.error is None else "no image (the sample is invalid)"
            yield InputItem(source=name, source_kind=KIND, locator="none", skip=why, sample=spec)
            continue
        turns = sample.get("messages", sample.get("conversations"))
        for position, image in enumerate(images):
            item = _image_item(image, root, options, f"{name}/images/{position}")
            item.sample, item.sample_position = spec, position
            item.metadata = {
                SAMPLE: name,
                IMAGE_INDEX: position,
                CONVERSATION: printable(json.dumps(turns, ensure_ascii=False)) if len(images) > 1 else None,
            }
            yield item


def _spec(sample: Any, source: str, index: int) -> SampleSpec:
    """Return the training sample of one sharegpt record (with its error when the turns are unusable)."""
    images = _image_list(sample)
    spec = SampleSpec(source=source, source_kind=KIND, index=index, images=len(images or []), messages=None)
    if isinstance(sample, InvalidLine):
        spec.error = ("invalid_sample", sample.message)
        return spec
    if not isinstance(sample, dict):
        spec.error = ("invalid_sample", f"a sample must be a JSON object, got {type(sample).__name__}")
        return spec
    if images is None:
        kind = type(sample["images"]).__name__
        spec.error = ("invalid_sample", f"images must be a list of paths, got {kind} (sample {index})")
        return spec
    try:
        spec.messages = normalize_turns(sample.get("messages", sample.get("conversations")))
    except InvalidMessages as exc:
        spec.error = ("invalid_messages", f"{exc} (sample {index})")
        return spec
    problem = placeholder_problem(spec.messages, spec.images)
    if problem is not None:
        spec.error = ("placeholder_mismatch", f"{problem} (sample {index})")
    spec.system = _text(sample.get("system"))
    spec.tools = _text(sample.get("tools"))
    extra = {k: v for k, v in sample.items() if k not in _SAMPLE_KEYS}
    spec.metadata = extra or None
    spec.split = _text(sample.get("split"))  # a number (split: 5) as its text, not dropped
    if spec.error is None and not _is_text([spec.messages, spec.system, spec.tools, spec.metadata, spec.split]):
        spec.error = (  # bytes of another encoding, or JSON's \ud800 (half a character): no text to train on
            "invalid_sample",
            f"the sample holds text that is not UTF-8 (bytes of another encoding, or a \\ud800-style escape) (sample {index})",
        )
    return spec


def _image_list(sample: Any) -> list[Any] | None:
    """A sample's images as a list (a single path or ``{"path": ...}`` object is a list of one); None when
    ``images`` is something else (a number), [] when there is none."""
    images = sample.get("images") if isinstance(sample, dict) else None
    if images is None:
        return []
    if isinstance(images, str | dict):
        return [images]
    return images if isinstance(images, list) else None


def _is_text(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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

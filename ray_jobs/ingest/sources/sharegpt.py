"""LLaMA-Factory sharegpt JSON: samples of chat turns with ``<image>`` placeholders and an ``images`` list.

A table row is one image. A sample with one image becomes one row carrying the sample's
``messages`` (LLaMA-Factory trains from such rows again as they are). A sample with several
images cannot be one image row: each image becomes a row without ``messages``, and the sample's
turns are kept verbatim in the ``sharegpt_conversation`` metadata column, so nothing is lost.
Every row records its sample (``file.json#index``) and its position among the sample's images.
A sample without images is counted as skipped: it is text, not an image.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from ray_jobs.ingest.items import InputItem
from ray_jobs.ingest.messages import InvalidMessages, normalize_messages
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources.base import ListedSource, SourceError, inside_root

KIND = "sharegpt"
SAMPLE, IMAGE_INDEX, CONVERSATION = "sharegpt_sample", "sharegpt_image_index", "sharegpt_conversation"
METADATA_FIELDS = {SAMPLE: pa.string(), IMAGE_INDEX: pa.int32(), CONVERSATION: pa.string()}


def looks_like_sharegpt(path: Path) -> bool:
    """True when a JSON/JSONL file's first sample has chat turns and an ``images`` list."""
    try:
        first = next(iter(_samples(path)), None)
    except (SourceError, OSError):
        return False
    return isinstance(first, dict) and "images" in first and ("messages" in first or "conversations" in first)


def sharegpt_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of a sharegpt JSON or JSONL file; image paths are relative to its folder."""
    path = Path(location)
    if not path.is_file():
        raise SourceError(f"{location} is not a file")
    root = Path(options.manifest_root) if options.manifest_root else path.parent
    return ListedSource(KIND, lambda: _items(path, root, options), dict(METADATA_FIELDS))


def _samples(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        samples = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(samples, list):
        raise SourceError(f"{path} must hold a JSON list of samples")
    return samples


def _items(path: Path, root: Path, options: IngestOptions) -> Iterator[InputItem]:
    for index, sample in enumerate(_samples(path)):
        name = f"{path}#{index}"
        images = sample.get("images") if isinstance(sample, dict) else None
        if isinstance(images, str):
            images = [images]
        if not images:
            yield InputItem(source=name, source_kind=KIND, locator="none", skip="text-only sample")
            continue
        turns = sample.get("messages", sample.get("conversations"))
        messages, problem = None, None
        if len(images) == 1:
            try:
                messages = normalize_messages(turns)
            except InvalidMessages as exc:
                problem = ("invalid_messages", f"{exc} (sample {index})")
        for position, image in enumerate(images):
            item = _image_item(image, root, options, f"{name}/images/{position}")
            item.messages = messages
            item.metadata = {
                SAMPLE: name,
                IMAGE_INDEX: position,
                CONVERSATION: json.dumps(turns, ensure_ascii=False) if len(images) > 1 else None,
            }
            if problem and item.error is None:
                item.locator, item.error = "none", problem
            yield item


def _image_item(image: Any, root: Path, options: IngestOptions, name: str) -> InputItem:
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

"""Sources of images, one module per kind, behind one registry.

A SOURCE argument is ``[KIND:]LOCATION``; without a kind it is detected from the location
(see ``detect_kind``). Kinds: folder, file (one image file), url, urls, manifest, parquet, lance, hf, modelscope, sharegpt, objectstore
(s3://, gs://, az:// prefixes), webdataset (tar shards, local or on object storage).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from lance_io.storage import is_object_uri
from ray_jobs.ingest.decode import IMAGE_EXTENSIONS
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources.base import ListedSource, Source, SourceError
from ray_jobs.ingest.sources.folder import file_source, folder_source
from ray_jobs.ingest.sources.hf import hf_disk_source, modelscope_source
from ray_jobs.ingest.sources.manifest import lance_source, manifest_source, parquet_source
from ray_jobs.ingest.sources.objectstore import object_source
from ray_jobs.ingest.sources.sharegpt import looks_like_sharegpt, sharegpt_source
from ray_jobs.ingest.sources.urls import single_url_source, url_list_source
from ray_jobs.ingest.sources.webdataset import looks_like_webdataset, webdataset_source

SOURCE_KINDS: dict[str, Callable[[str, IngestOptions], ListedSource]] = {
    "folder": folder_source,
    "file": file_source,
    "url": single_url_source,
    "urls": url_list_source,
    "manifest": manifest_source,
    "parquet": parquet_source,
    "lance": lance_source,
    "hf": hf_disk_source,
    "modelscope": modelscope_source,
    "sharegpt": sharegpt_source,
    "objectstore": object_source,
    "webdataset": webdataset_source,
}
_PREFIX = re.compile(rf"^({'|'.join(SOURCE_KINDS)}):(?!//)(.+)$")
_UNKNOWN_KIND = re.compile(r"^([A-Za-z][A-Za-z0-9_-]+):(?!//)")

__all__ = ["SOURCE_KINDS", "Source", "SourceError", "detect_kind", "open_source"]


def open_source(spec: str, options: IngestOptions) -> Source:
    """Return the source named by ``[KIND:]LOCATION``; raise ``SourceError`` if it cannot be read."""
    if not spec.strip():  # "" would be the working directory: an unset shell variable, not a choice
        raise SourceError("a source is empty: name a folder, file, URL list, manifest or prefix")
    match = _PREFIX.match(spec)
    kind, location = (match.group(1), match.group(2)) if match else (detect_kind(spec), spec)
    return SOURCE_KINDS[kind](location, options)


def detect_kind(location: str) -> str:
    """Return the source kind a location looks like; raise ``SourceError`` when it is ambiguous."""
    if location.lower().startswith(("http://", "https://")):
        return "url"
    if looks_like_webdataset(location):
        return "webdataset"
    if is_object_uri(location):
        if location.lower().rstrip("/").endswith(".parquet"):
            return "parquet"
        if location.lower().endswith((".jsonl", ".ndjson", ".json")):
            return "sharegpt" if looks_like_sharegpt(location) else "manifest"
        return "manifest" if location.lower().endswith(".csv") else "objectstore"
    path = Path(location)
    if not path.exists():
        kind = _UNKNOWN_KIND.match(location)
        if kind:  # `bogus:/data/x`: more likely a misspelled kind than a file named so
            raise SourceError(f"{location}: no source kind {kind.group(1)!r} (kinds: {', '.join(SOURCE_KINDS)}), and no such file")
        raise SourceError(f"{location} does not exist")
    if path.is_dir():
        if path.suffix == ".lance" or (path / "_versions").is_dir():
            return "lance"
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf"
        files = [p for p in path.iterdir() if not p.name.startswith(".")]
        if files and all(p.suffix == ".parquet" for p in files):
            return "parquet"
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return "urls"
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".json", ".jsonl", ".ndjson"):
        return "sharegpt" if looks_like_sharegpt(path) else "manifest"
    if suffix == ".csv":
        return "manifest"
    if suffix in IMAGE_EXTENSIONS:
        return "file"
    raise SourceError(
        f"cannot tell what kind of source {location} is; prefix it with one of {', '.join(SOURCE_KINDS)}:"
    )

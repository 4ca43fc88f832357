"""Object-storage prefixes (s3://, gs://, az://) as a source, like a folder.

The driver only lists: S3 (and S3-compatible endpoints) page by page through boto3's paginator,
so a prefix of millions of keys is never held whole in memory; gs:// and az:// through pyarrow,
one "directory" (common prefix) at a time (pyarrow's Python API returns a listing whole, so the
driver holds the largest single directory, not the whole prefix). Each item carries the object's URI; a worker reads its bytes
(``worker.read_object``). Credentials come from ``$LANCETAG_STORAGE_OPTIONS`` or the standard
``AWS_*`` variables and are never put into items, errors or table metadata.
"""

from __future__ import annotations

from collections.abc import Iterator

from lance_io.storage import boto3_client_kwargs, pyarrow_filesystem, resolve_storage_options
from ray_jobs.ingest.items import InputItem
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources.base import ListedSource

KIND = "objectstore"
PAGE_SIZE = 1000


def object_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of every object under an object-storage prefix (listed lazily)."""
    prefix = location if location.endswith("/") else location + "/"
    return ListedSource(KIND, lambda: _listed(prefix, options))


def list_objects(prefix: str, storage_options: dict[str, str] | None) -> Iterator[tuple[str, int]]:
    """Yield ``(uri, size)`` of every object under ``prefix``, a page at a time; raise on a failed page."""
    scheme, _, rest = prefix.partition("://")
    if scheme == "s3":
        import boto3

        bucket, _, key_prefix = rest.partition("/")
        client = boto3.client("s3", **boto3_client_kwargs(storage_options))
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=key_prefix, PaginationConfig={"PageSize": PAGE_SIZE}
        )
        for page in pages:
            for entry in page.get("Contents", []):
                yield f"s3://{bucket}/{entry['Key']}", int(entry["Size"])
        return
    filesystem, path = pyarrow_filesystem(prefix, storage_options)
    for file_path, size in walk_files(filesystem, path.rstrip("/")):
        yield f"{scheme}://{file_path}", size


def walk_files(filesystem, root: str) -> Iterator[tuple[str, int]]:
    """Yield ``(path, size)`` of every file under ``root``, listing one directory at a time.

    Files of a directory come in name order, then its subdirectories, depth first. Memory holds one
    directory's listing and the directories still to visit, never the whole tree.
    """
    from pyarrow import fs

    pending = [root]
    while pending:
        directory = pending.pop()
        infos = sorted(filesystem.get_file_info(fs.FileSelector(directory, recursive=False)), key=lambda i: i.path)
        subdirectories = []
        for info in infos:
            if info.type == fs.FileType.File:
                yield info.path, int(info.size or 0)
            elif info.type == fs.FileType.Directory:
                subdirectories.append(info.path)
        del infos
        pending.extend(reversed(subdirectories))


def _listed(prefix: str, options: IngestOptions) -> Iterator[InputItem]:
    storage_options = resolve_storage_options(prefix)
    try:
        for uri, size in list_objects(prefix, storage_options):
            yield _item(uri, size, prefix, options)
    except Exception as exc:  # botocore and pyarrow raise many types; each ends as one error record
        reason, message = listing_failure(exc)
        yield InputItem(source=prefix, source_kind=KIND, locator="none", error=(reason, message))


def listing_failure(exc: Exception) -> tuple[str, str]:
    """Return ``(reason, message)`` for a listing or read that failed (no credentials in the message)."""
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if hasattr(exc, "response") else ""
    text = f"{code} {type(exc).__name__} {exc}"
    if any(word in text for word in ("AccessDenied", "ACCESS_DENIED", "Forbidden", "403", "InvalidAccessKeyId",
                                     "PermissionDenied", "Unauthenticated")):
        return "access_denied", f"access denied: check the credentials in $LANCETAG_STORAGE_OPTIONS or AWS_* ({code or type(exc).__name__})"
    if any(word in text for word in ("NoSuchBucket", "NoSuchKey", "NOT_FOUND", "404")):
        return "not_found", f"no such bucket or key ({code or type(exc).__name__})"
    return "unreadable", f"cannot list or read: {type(exc).__name__}: {str(exc)[:300]}"


def _item(uri: str, size: int, prefix: str, options: IngestOptions) -> InputItem:
    if uri.endswith("/"):
        return InputItem(
            source=uri, source_kind=KIND, locator="none",
            error=("not_a_file", "a folder marker (a key ending in '/'), not an object with an image"),
        )
    if size > options.max_bytes:
        return InputItem(
            source=uri, source_kind=KIND, locator="none",
            error=("too_large", f"{size} bytes is over the limit of {options.max_bytes} (raise --max-bytes)"),
        )
    relative = uri[len(prefix):]
    truth = relative.rsplit("/", 2)[-2] if options.label_from_dir and "/" in relative else None
    return InputItem(source=uri, source_kind=KIND, locator="object", url=uri, scan=True, truth=truth)

"""Read a source object, or a byte range of one, on object storage: one request each for s3://.

pyarrow's S3 filesystem asks for an object's size (a HEAD request) before it reads it: two
requests and two round trips per image. For ``s3://`` a worker reads through obstore (Rust's
object_store, the library Lance reads its tables with) instead: one GET per object, one ranged GET
per tar member. A store is built once per bucket and storage options in each worker process, so
its connections stay open from one object to the next. ``gs://`` and ``az://`` read through pyarrow, with
one filesystem per scheme and storage options in each process (``lance_io.storage.pyarrow_filesystem``).

Failures raise :class:`ObjectMissing` (no such object) or :class:`ObjectUnreadable` (the store's
own error, to be classified by ``listing_failure``); never a credential in a message.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

from lance_io.storage import boto3_client_kwargs, pyarrow_filesystem

STREAM_CHUNK = 64 * 1024
"""The first chunk of an object read while it is sniffed: enough for any image header."""


class ObjectMissing(Exception):
    """The object (or shard) is not there: deleted since it was listed, or never was."""


class ObjectUnreadable(Exception):
    """The store refused or failed the read; ``cause`` is its exception."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ObjectTooLarge(Exception):
    """The object is over the caller's byte limit; ``size`` is its size (through pyarrow: the bytes read, limit + 1)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


@contextlib.contextmanager
def _read_errors(*unreadable: type[Exception]) -> Iterator[None]:
    """Raise a read's failure as ObjectMissing (not found) or ObjectUnreadable (one of ``unreadable``)."""
    try:
        yield
    except FileNotFoundError as exc:  # pyarrow's and obstore's "not found"
        raise ObjectMissing(str(exc)) from None
    except unreadable as exc:
        raise ObjectUnreadable(exc) from None


@functools.lru_cache(maxsize=16)
def _s3_store(bucket: str, options: tuple[tuple[str, str], ...]):  # -> obstore.store.S3Store
    from obstore.store import S3Store

    given = dict(options)
    kwargs = boto3_client_kwargs(given)
    config = {
        "access_key_id": kwargs.get("aws_access_key_id"),
        "secret_access_key": kwargs.get("aws_secret_access_key"),
        "session_token": kwargs.get("aws_session_token"),
        "region": kwargs.get("region_name"),
        "endpoint": kwargs.get("endpoint_url"),
    }
    endpoint = kwargs.get("endpoint_url") or ""
    allow_http = endpoint.startswith("http://") or given.get("allow_http", "").lower() == "true"
    return S3Store(
        bucket,
        config={k: v for k, v in config.items() if v},  # the rest from AWS_* as Lance does
        client_options={"allow_http": True} if allow_http else None,
    )


def _s3(uri: str, options: dict[str, str] | None):  # -> (S3Store, key)
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return _s3_store(bucket, tuple(sorted((options or {}).items()))), key


def read_object(
    uri: str, options: dict[str, str] | None, max_bytes: int, keep: Callable[[bytes], bool] | None = None
) -> bytes | None:
    """Return the object's bytes, or None when ``keep`` (given the first bytes) says it is not wanted.

    Raises ObjectTooLarge over ``max_bytes`` (before its body is read), ObjectMissing, ObjectUnreadable.
    """
    if not uri.startswith("s3://"):
        return _read_with_pyarrow(uri, options, max_bytes, keep)
    import obstore
    from obstore.exceptions import BaseError

    store, key = _s3(uri, options)
    with _read_errors(BaseError, OSError):
        result = obstore.get(store, key)
        size = int(result.meta["size"])
        if size > max_bytes:
            raise ObjectTooLarge(size)
        if keep is None:
            return bytes(result.bytes())
        chunks = iter(result.stream(min_chunk_size=STREAM_CHUNK))
        first = bytes(next(chunks, b""))
        if not keep(first):
            return None  # the rest of the body is never read
        return first + b"".join(bytes(chunk) for chunk in chunks)


def read_range(uri: str, options: dict[str, str] | None, offset: int, size: int) -> bytes:
    """Return up to ``size`` bytes of the object from ``offset`` (fewer when it ends first).

    Raises ObjectMissing or ObjectUnreadable.
    """
    if not uri.startswith("s3://"):
        filesystem, path = pyarrow_filesystem(uri, options)
        with _read_errors(OSError), filesystem.open_input_file(path) as handle:
            return handle.read_at(size, offset) if offset < handle.size() else b""
    import obstore
    from obstore.exceptions import BaseError

    if size == 0:
        return b""
    store, key = _s3(uri, options)
    with _read_errors(BaseError, OSError):
        try:
            return bytes(obstore.get_range(store, key, start=offset, length=size))
        except (BaseError, OSError) as exc:
            text = str(exc)
            if "InvalidRange" in text or "416 Range Not Satisfiable" in text:  # the shard ends before the member starts
                return b""
            raise


def _read_with_pyarrow(
    uri: str, options: dict[str, str] | None, max_bytes: int, keep: Callable[[bytes], bool] | None
) -> bytes | None:
    filesystem, path = pyarrow_filesystem(uri, options)
    with _read_errors(OSError), filesystem.open_input_stream(path) as stream:
        first = stream.read(STREAM_CHUNK) if keep is not None else b""
        if keep is not None and not keep(first):
            return None
        data = first + stream.read(max_bytes + 1 - len(first))
    if len(data) > max_bytes:
        raise ObjectTooLarge(len(data))
    return data

"""Storage options for tables on object storage, from the caller or the environment.

Local paths need none. For ``s3://`` (and other object stores) options come from, in order:
the explicit dict, then the JSON object in ``LANCETAG_STORAGE_OPTIONS``. Lance also reads the
standard ``AWS_*`` variables itself. Secrets are never printed: use :func:`redact`.
"""

from __future__ import annotations

import functools
import json
import os

from lance_io.reasons import ReasonError

ENV_VAR = "LANCETAG_STORAGE_OPTIONS"
_SECRET_WORDS = ("secret", "key", "token", "password", "session")


def resolve_storage_options(uri: str, explicit: dict[str, str] | None = None) -> dict[str, str] | None:
    """Return the storage options for ``uri``: ``explicit`` over ``$LANCETAG_STORAGE_OPTIONS``."""
    if "://" not in uri or uri.startswith("file://"):
        return explicit or None
    options: dict[str, str] = {}
    raw = os.environ.get(ENV_VAR)
    if raw:
        try:
            options.update({k: str(v) for k, v in json.loads(raw).items()})
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ReasonError(
                "bad_storage_options", f"${ENV_VAR} must be a JSON object of strings ({exc.__class__.__name__})"
            ) from None
    options.update(explicit or {})
    return options or None


def redact(options: dict[str, str] | None) -> dict[str, str]:
    """Return ``options`` with secret-looking values replaced by ``***``, safe to log."""
    return {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in (options or {}).items()}


OBJECT_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://")
"""URI prefixes of object stores a source can be read from."""


def is_object_uri(location: str) -> bool:
    """True when ``location`` names an object on object storage (s3://, gs://, az://)."""
    return location.startswith(OBJECT_SCHEMES)


def _option(options: dict[str, str], *names: str) -> str | None:
    return next((options[n] for n in names if options.get(n)), None)


def boto3_client_kwargs(options: dict[str, str] | None) -> dict[str, str]:
    """Return ``boto3.client("s3", **kwargs)`` arguments for Lance-style storage options (AWS_* otherwise)."""
    options = options or {}
    pairs = {
        "endpoint_url": _option(options, "endpoint", "aws_endpoint", "endpoint_url", "aws_endpoint_url"),
        "aws_access_key_id": _option(options, "aws_access_key_id", "access_key_id"),
        "aws_secret_access_key": _option(options, "aws_secret_access_key", "secret_access_key"),
        "aws_session_token": _option(options, "aws_session_token", "session_token", "token"),
        "region_name": _option(options, "region", "aws_region", "aws_default_region"),
    }
    return {k: v for k, v in pairs.items() if v}


def pyarrow_filesystem(uri: str, options: dict[str, str] | None):  # -> (pyarrow.fs.FileSystem, str)
    """Return a pyarrow filesystem for the object ``uri`` (with ``options``) and the path within it.

    One filesystem per scheme and options in each process: its connections stay open from one
    object to the next (a new one per object would connect, and on TLS handshake, for every image).
    Credentials it reads from the environment are read when it is built.
    """
    scheme, _, path = uri.partition("://")
    if scheme not in ("s3", "gs", "gcs", "az", "abfs"):
        raise ReasonError("bad_source", f"{uri} is not an object-storage URI (s3://, gs://, az://)")
    if scheme in ("az", "abfs") and not _option(options or {}, "account_name", "azure_storage_account_name"):
        raise ReasonError("bad_storage_options", f"{uri}: set account_name in ${ENV_VAR} for az:// sources")
    return _filesystem(scheme, tuple(sorted((options or {}).items()))), path


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, pairs: tuple[tuple[str, str], ...]):  # -> pyarrow.fs.FileSystem
    from pyarrow import fs

    options = dict(pairs)
    if scheme == "s3":
        kwargs = boto3_client_kwargs(options)
        endpoint = kwargs.get("endpoint_url")
        scheme_of_endpoint = "https"
        if endpoint and "://" in endpoint:
            scheme_of_endpoint, _, endpoint = endpoint.partition("://")
        return fs.S3FileSystem(
            access_key=kwargs.get("aws_access_key_id"),
            secret_key=kwargs.get("aws_secret_access_key"),
            session_token=kwargs.get("aws_session_token"),
            region=kwargs.get("region_name"),
            endpoint_override=endpoint.rstrip("/") if endpoint else None,
            scheme=scheme_of_endpoint,
        )
    if scheme in ("gs", "gcs"):
        return fs.GcsFileSystem()
    account = _option(options, "account_name", "azure_storage_account_name")
    return fs.AzureFileSystem(account, account_key=_option(options, "account_key", "azure_storage_account_key"))


def table_filesystem(uri: str, options: dict[str, str] | None):  # -> (pyarrow.fs.FileSystem, str)
    """Return a pyarrow filesystem and the table's root path in it: a local path or an object-store URI."""
    from pyarrow import fs

    if not is_object_uri(uri):
        return fs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://")).rstrip("/")
    filesystem, path = pyarrow_filesystem(uri, options)
    return filesystem, path.rstrip("/")

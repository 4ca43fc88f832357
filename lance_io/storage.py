"""Storage options for tables on object storage, from the caller or the environment.

Local paths need none. For ``s3://`` (and other object stores) options come from, in order:
the explicit dict, then the JSON object in ``LANCETAG_STORAGE_OPTIONS``. Lance also reads the
standard ``AWS_*`` variables itself. Secrets are never printed: use :func:`redact`.
"""

from __future__ import annotations

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

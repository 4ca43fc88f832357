"""The image table schema: one row per distinct image content.

Columns every image table has (``IMAGE_SCHEMA``); ingest may add pass-through user metadata
columns and a ground-truth ``truth`` column; tagging adds label columns later, fragment by
fragment (see :mod:`lance_io.columns`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

ID = "id"
IMAGE = "image"
SHA256 = "sha256"
TRUTH = "truth"
MESSAGES = "messages"

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

# Image files are already compressed: Lance's general compression only costs time (measured
# in bench/RESULTS.md: about 2x slower writes, no smaller files). Plain, uncompressed
# large_binary beat blob encoding on random takes, and readers get the bytes directly.
IMAGE_FIELD_METADATA = {"description": "original bytes, unmodified", "lance-encoding:compression": "none"}

IMAGE_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False, metadata={"description": "first 32 hex digits of sha256(image)"}),
        pa.field(IMAGE, pa.large_binary(), nullable=False, metadata=IMAGE_FIELD_METADATA),
        pa.field(SHA256, pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False, metadata={"description": "PIL format: JPEG, PNG, ..."}),
        pa.field("mode", pa.string(), nullable=False, metadata={"description": "PIL mode: RGB, L, CMYK, ..."}),
        pa.field("exif_orientation", pa.int8(), metadata={"description": "EXIF orientation tag 1-8, null if absent"}),
        pa.field("frames", pa.int32(), nullable=False, metadata={"description": "1 unless animated"}),
        pa.field("source", pa.string(), nullable=False, metadata={"description": "path, URL or dataset row"}),
        pa.field("source_kind", pa.string(), nullable=False, metadata={"description": "folder, url, manifest, ..."}),
        pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("ingest_job", pa.string(), nullable=False),
    ]
)
"""Columns of every image table, in order. Optional columns follow them."""

OPTIONAL_FIELDS = {
    TRUTH: pa.field(TRUTH, pa.string(), metadata={"description": "ground-truth label, e.g. the ImageFolder class"}),
    MESSAGES: pa.field(MESSAGES, pa.list_(MESSAGE_TYPE), metadata={"description": "sharegpt chat turns"}),
}
"""Well-known optional columns: ground truth and sharegpt ``messages``."""


def image_id(data: bytes) -> str:
    """Return the stable id of an image: the first 32 hex digits of its sha256."""
    return hashlib.sha256(data).hexdigest()[:32]


def content_hashes(data: bytes) -> tuple[str, str]:
    """Return ``(id, sha256)`` of image bytes, hashing once."""
    digest = hashlib.sha256(data).hexdigest()
    return digest[:32], digest


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Return a 64-bit hash of each id, to bucket or count ids without holding them (Python's ``hash``:
    the same within one process only)."""
    return np.fromiter(map(hash, ids.to_pylist()), dtype=np.int64, count=len(ids))

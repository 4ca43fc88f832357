"""The image table schema: one row per distinct image content.

Columns every image table has (``IMAGE_SCHEMA``); ingest may add pass-through user metadata
columns and a ground-truth ``truth`` column; tagging adds label columns later, fragment by
fragment (see :mod:`lance_io.columns`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_HASH_BYTES = 1 << 22  # padded id bytes hashed at once: bounds the working set of a chunk
_BYTES_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary,
                pa.types.is_string_view, pa.types.is_binary_view)


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Return a 64-bit hash of each id, to bucket or count ids without holding them as Python objects.

    String and binary ids are hashed from Arrow's buffers (their length, then their bytes 8 at a
    time), integer ids from their values: an id gets the same hash in any chunk, process or run.
    Dictionary-encoded ids hash as their values, nulls like the empty value; ids of other types fall
    back to Python's ``hash`` (the same within one process only).
    """
    if isinstance(ids, pa.ChunkedArray):  # one array: a chunk costs a pass of numpy calls
        ids = ids.cast(ids.type.value_type) if pa.types.is_dictionary(ids.type) else ids
        is_bytes = any(test(ids.type) for test in _BYTES_TYPES)
        ids = (ids.cast(pa.large_binary()) if is_bytes else ids).combine_chunks()
    return _chunk_hashes(ids).view(np.int64)


def _mix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: every input bit moves about half the output bits."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _chunk_hashes(ids: pa.Array) -> np.ndarray:
    kind = ids.type
    if pa.types.is_dictionary(kind):
        return _chunk_hashes(ids.dictionary_decode())
    if pa.types.is_integer(kind):
        return _mix(ids.fill_null(0).to_numpy().astype(np.int64).view(np.uint64) + _GOLDEN)
    if not any(test(kind) for test in _BYTES_TYPES):
        return np.fromiter(map(hash, ids.to_pylist()), dtype=np.int64, count=len(ids)).view(np.uint64)
    ids = ids.cast(pa.large_binary())
    offsets = np.frombuffer(ids.buffers()[1], np.int64, count=len(ids) + 1, offset=ids.offset * 8)
    data = ids.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
    lengths = np.diff(offsets)
    if ids.null_count:
        lengths = np.where(ids.is_valid().to_numpy(zero_copy_only=False), lengths, 0)
    words = (lengths + 7) // 8
    hashes = (lengths.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    for width, rows in _rows_by_width(words):
        part = hashes[rows]
        for word in _padded(data, offsets[:-1][rows], lengths[rows], width).T:
            part = _mix(part ^ word)
        hashes[rows] = part
    return _mix(hashes)


def _rows_by_width(words: np.ndarray) -> Iterator[tuple[int, slice | np.ndarray]]:
    """Rows of one width (8-byte words), at most ``_HASH_BYTES`` padded bytes at a time: slices when
    every id has the width, as ids made by lancetag do."""
    if not len(words):
        return
    if words.min() == words.max():
        step = max(1, _HASH_BYTES // max(8 * int(words[0]), 8))
        yield from ((int(words[0]), slice(first, first + step)) for first in range(0, len(words), step))
        return
    order = np.argsort(words, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(words[order])) + 1):
        step = max(1, _HASH_BYTES // max(8 * int(words[group[0]]), 8))
        yield from ((int(words[group[0]]), group[first : first + step]) for first in range(0, len(group), step))


def _padded(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Each id's bytes as ``width`` little-endian words, zero past its end."""
    padded = np.zeros((len(starts), 8 * width), np.uint8)
    size = int(lengths[0]) if len(starts) else 0
    if len(starts) and (lengths == size).all() and starts[-1] - starts[0] == (len(starts) - 1) * size:
        padded[:, :size] = data[starts[0] : starts[0] + len(starts) * size].reshape(len(starts), size)
    elif len(starts):
        columns = np.arange(8 * width)
        inside = columns < lengths[:, None]
        padded[inside] = data[(starts[:, None] + columns)[inside]]
    return padded.view("<u8").astype(np.uint64)

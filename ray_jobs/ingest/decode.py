"""Validate one image by decoding it: bytes in, ``ImageInfo`` or ``IngestError`` out.

The declared size is checked before any pixel is decoded (decompression bombs); JPEGs decode
in draft mode (1/8 scale, grey: libjpeg still reads the whole entropy-coded stream of every
component, so truncation is caught, but skips the colour components' inverse DCT, upsampling and
colour conversion, at a fraction of the cost of a full decode).
"""

from __future__ import annotations

import io
import struct
import warnings

from PIL import Image, UnidentifiedImageError

import lance_io.image_size  # noqa: F401  (registers HEIC/HEIF with Pillow on import: every ingest process reads them)
from ray_jobs.ingest.items import ImageInfo, IngestError

EXIF_ORIENTATION = 0x0112

MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WEBP"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"ftypavif", 4, "AVIF"),
    (b"ftypavis", 4, "AVIF"),
    (b"ftypheic", 4, "HEIF"),
    (b"ftypheix", 4, "HEIF"),
    (b"ftypheim", 4, "HEIF"),
    (b"ftypheis", 4, "HEIF"),
    (b"ftyphevc", 4, "HEIF"),
    (b"ftyphevx", 4, "HEIF"),
    (b"ftyphevm", 4, "HEIF"),
    (b"ftyphevs", 4, "HEIF"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypmsf1", 4, "HEIF"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG2000"),
    (b"P1", 0, "PPM"),
    (b"P4", 0, "PPM"),
    (b"P2", 0, "PPM"),
    (b"P5", 0, "PPM"),
    (b"P3", 0, "PPM"),
    (b"P6", 0, "PPM"),
    (b"qoif", 0, "QOI"),
)
"""Magic bytes of the formats Pillow decodes: (signature, offset, format)."""

IMAGE_EXTENSIONS = frozenset(
    [
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".gif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".webp",
        ".ico",
        ".avif",
        ".jp2",
        ".j2k",
        ".jpx",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".qoi",
        ".heic",
        ".heif",
    ]
)
"""Extensions that announce an image: such a file that fails to decode is an error, not a skip."""

SNIFF_BYTES = 16


APPLE_DOUBLE = b"\x00\x05\x16\x07"
"""The magic of macOS's AppleDouble files (``._photo.jpg`` beside each file, ``__MACOSX/`` in a zip
made on a Mac): a file's metadata, named like the image it describes."""


def is_mac_metadata(head: bytes) -> bool:
    """Whether bytes are a macOS AppleDouble file: in a scanned folder or prefix, skipped as not an image."""
    return head[: len(APPLE_DOUBLE)] == APPLE_DOUBLE


def sniff_format(head: bytes) -> str | None:
    """Return the image format the magic bytes announce, or None if they announce no image."""
    for signature, offset, fmt in MAGIC:
        if head[offset : offset + len(signature)] == signature:
            if fmt == "WEBP" and head[:4] != b"RIFF":
                continue
            return fmt
    return None


def validate_image(data: bytes, *, max_pixels: int, max_bytes: int) -> ImageInfo | IngestError:
    """Decode-validate image bytes; return what they hold, or why they are not an acceptable image."""
    if not data:
        return IngestError("empty_file", "the file is empty (0 bytes)")
    if len(data) > max_bytes:
        return IngestError(
            "too_large", f"{len(data)} bytes is over the limit of {max_bytes} (raise --max-bytes)"
        )
    if sniff_format(data[:SNIFF_BYTES]) is None:
        return IngestError(
            "not_an_image", f"the bytes are not an image format Pillow reads (starts {data[:8]!r})"
        )
    saved_limit = Image.MAX_IMAGE_PIXELS
    try:
        # Our check (on the declared size, right after the header is parsed) replaces Pillow's.
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _decode(data, max_pixels)
    except Image.DecompressionBombError as exc:
        return IngestError("decompression_bomb", f"{exc} (raise --max-pixels to accept it)")
    except UnidentifiedImageError:
        return IngestError(
            "decode_failed", "Pillow cannot identify the image: corrupt header or unsupported variant"
        )
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        reason = "truncated" if "truncated" in str(exc) or isinstance(exc, EOFError) else "decode_failed"
        return IngestError(reason, f"{type(exc).__name__}: {exc}")
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit


def _decode(data: bytes, max_pixels: int) -> ImageInfo | IngestError:
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        if width <= 0 or height <= 0:
            return IngestError("decode_failed", f"declared size {width}x{height} is empty")
        if width * height > max_pixels:
            return IngestError(
                "decompression_bomb",
                f"declares {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                "(raise --max-pixels to accept it)",
            )
        fmt, mode = im.format or "unknown", im.mode
        orientation = im.getexif().get(EXIF_ORIENTATION)
        frames = int(getattr(im, "n_frames", 1) or 1)
        if fmt == "JPEG":  # "L": Pillow decodes a colour JPEG as grey, other modes as they are
            im.draft("L", (max(1, width // 8), max(1, height // 8)))
        im.load()
    return ImageInfo(
        width=width,
        height=height,
        format=fmt,
        mode=mode,
        exif_orientation=int(orientation) if isinstance(orientation, int) and 1 <= orientation <= 8 else None,
        frames=frames,
    )

"""Decode-validation of one image: exotic modes accepted, junk refused with a reason, bombs refused unread."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from ray_jobs.ingest.decode import sniff_format, validate_image
from ray_jobs.ingest.items import ImageInfo, IngestError
from tests.ingest_fixtures import (
    animated_gif,
    image_bytes,
    palette_png,
    png_declaring,
    rotated_jpeg,
    sixteen_bit_png,
)

LIMITS = {"max_pixels": 178_956_970, "max_bytes": 64 * 1024**2}


@pytest.mark.parametrize(
    ("data", "fmt", "mode", "frames"),
    [
        (image_bytes(1, "JPEG", "CMYK"), "JPEG", "CMYK", 1),
        (sixteen_bit_png(2), "PNG", "I;16", 1),
        (palette_png(3), "PNG", "P", 1),
        (image_bytes(4, "PNG", "RGBA"), "PNG", "RGBA", 1),
        (animated_gif(5), "GIF", "P", 3),
        (image_bytes(6, "WEBP"), "WEBP", "RGB", 1),
        (image_bytes(7, "BMP"), "BMP", "RGB", 1),
        (image_bytes(8, "TIFF"), "TIFF", "RGB", 1),
        (image_bytes(9, "HEIF"), "HEIF", "RGB", 1),  # a phone's photo: pillow-heif, registered by lance_io
    ],
    ids=["cmyk-jpeg", "16-bit-png", "palette-png", "rgba-png", "animated-gif", "webp", "bmp", "tiff", "heic"],
)
def test_exotic_modes_are_accepted_with_their_format_mode_and_frames(
    data: bytes, fmt: str, mode: str, frames: int
) -> None:
    info = validate_image(data, **LIMITS)
    assert isinstance(info, ImageInfo)
    assert (info.format, info.mode, info.frames) == (fmt, mode, frames)
    assert info.width > 0 and info.height > 0


def test_exifrotated_jpeg_reports_its_orientation_and_stored_size() -> None:
    info = validate_image(rotated_jpeg(1), **LIMITS)
    assert isinstance(info, ImageInfo)
    assert info.exif_orientation == 6
    assert (info.width, info.height) == (40, 30)  # the stored size: the bytes are kept unrotated


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("cut", [0.3, 0.9, 0.995])
def test_truncated_colour_jpeg_is_an_error_not_a_row(cut: float, progressive: bool) -> None:
    """The check decodes a colour JPEG as grey; a cut in the colour components' data (a progressive
    file's last scans refine them) is still found, since every scan is read."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(3, size=(300, 200)))).save(buffer, "JPEG", quality=90, progressive=progressive)
    data = buffer.getvalue()
    assert isinstance(validate_image(data, **LIMITS), ImageInfo)
    result = validate_image(data[: int(len(data) * cut)], **LIMITS)
    assert isinstance(result, IngestError) and result.reason == "truncated"


def test_truncated_png_is_a_truncated_error() -> None:
    data = image_bytes(3, "PNG", size=(300, 200))
    result = validate_image(data[: len(data) // 2], **LIMITS)
    assert isinstance(result, IngestError) and result.reason == "truncated", result


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (b"<!DOCTYPE html><html>404</html>", "not_an_image"),
        (b"%PDF-1.7 not an image at all", "not_an_image"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "decode_failed"),
    ],
    ids=["empty", "html-as-jpg", "pdf", "png-magic-garbage-body"],
)
def test_junk_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    result = validate_image(data, **LIMITS)
    assert isinstance(result, IngestError)
    assert result.reason == reason, result


def test_declared_billions_of_pixels_are_refused_before_decoding() -> None:
    started = time.perf_counter()
    result = validate_image(png_declaring(100_000, 100_000), **LIMITS)
    assert time.perf_counter() - started < 0.5
    assert isinstance(result, IngestError) and result.reason == "decompression_bomb"
    assert "100000x100000" in result.message and "--max-pixels" in result.message


def test_max_pixels_and_max_bytes_are_configurable() -> None:
    data = image_bytes(9, size=(64, 48))
    small_pixels = validate_image(data, max_pixels=1000, max_bytes=LIMITS["max_bytes"])
    small_bytes = validate_image(data, max_pixels=LIMITS["max_pixels"], max_bytes=100)
    assert isinstance(small_pixels, IngestError) and small_pixels.reason == "decompression_bomb"
    assert isinstance(small_bytes, IngestError) and small_bytes.reason == "too_large"
    assert isinstance(validate_image(data, max_pixels=64 * 48, max_bytes=len(data)), ImageInfo)


def test_pillow_global_limit_is_restored_after_validation() -> None:
    before = Image.MAX_IMAGE_PIXELS
    validate_image(png_declaring(100_000, 100_000), **LIMITS)
    assert before == Image.MAX_IMAGE_PIXELS


def test_sniff_format_reads_magic_bytes_not_extensions() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    assert sniff_format(buffer.getvalue()[:16]) == "PNG"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(image_bytes(1, "HEIF")[:16]) == "HEIF"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert sniff_format(b"hello world, no image") is None

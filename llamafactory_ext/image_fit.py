"""Hold a training image as the labeler sees it, at the size LLaMA-Factory trains on: decoded and resized once.

LLaMA-Factory keeps each image as its file and decodes and resizes it every time a batch needs
it (``image_max_pixels``; the tiny model's recipe trains at 56-112 pixels a side). A photo of
millions of pixels then costs a full decode per epoch, and a dataset held in memory holds every
file whole. :func:`fit_image` decodes and resizes once, and returns the result as a PNG (lossless)
that LLaMA-Factory's resize then leaves as it is. The vision warm-up
(:mod:`llamafactory_ext.vision_warmup`) and the rows LLaMA-Factory trains on, in memory
(:func:`llamafactory_ext.reader.load_rows`) or streamed (:func:`llamafactory_ext.reader.stream_rows`),
hold images this way.

The pixels are the labeler's (:func:`lance_io.image_size.model_image`), not what LLaMA-Factory
would make of the file alone: it would train on a photo turned by its EXIF orientation on its side,
on a palette image (a GIF, many PNGs) resized nearest-neighbour, on a transparent image over black
(or over whatever its transparent pixels store, when not resized) and on a large JPEG decoded whole,
where the labeler sees each upright, resized smoothly, over white and decoded at 1/2 to 1/8 of its
scale. A model is then labeled on the pixels it was trained on.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Mapping
from typing import Any

from lance_io.image_size import ImagePixels, has_alpha, upright_rgb
from llamafactory_ext.augment import paused

EXIF_MARKERS = (b"Exif", b"eXIf", b"EXIF")
"""How EXIF data starts in a JPEG (its APP1 segment), a PNG (an ``eXIf`` chunk) and a WebP (an ``EXIF`` chunk)."""
EXIF_ORIENTATION = 0x0112


def fit_image(plugin: Any, data: bytes, *, max_pixels: int, min_pixels: int) -> bytes:
    """Return the image ``data`` as the labeler sees it at its training size (a PNG), or ``data`` itself.

    ``data`` comes back as it is when LLaMA-Factory computes the labeler's pixels from it
    (:func:`_read_alike`: an RGB or grey image, upright, opaque, decoded whole by both) and its
    training size could not take fewer bytes (``max_pixels`` RGB pixels) or the PNG is no smaller.
    Where LLaMA-Factory would resize the resized image again (Qwen2-VL makes a 600x20 strip 465x28,
    downscaled, then stretched to a 28-pixel side, and would downscale 465x28 once more; an image
    enlarged to ``min_pixels`` falls a few pixels short of it), it gets the image before the resize
    instead (:func:`~lance_io.image_size.upright_rgb`, or ``data`` when it reads that alike), and
    its one resize gives the labeler's pixels. An image that does not decode comes back as it is,
    for LLaMA-Factory to report as it would have. The run's jitter is not applied here: it stays
    per epoch.
    """
    from llamafactory.data.mm_plugin import Qwen2VLPlugin
    from PIL import Image

    pixels = ImagePixels(max=max_pixels, min=min_pixels, qwen2_vl=isinstance(plugin, Qwen2VLPlugin))
    try:
        with Image.open(io.BytesIO(data)) as image, paused():
            alike = _read_alike(image, data, pixels)
            if alike and max_pixels * 3 >= len(data):  # its training size could not take fewer bytes
                return data
            upright = upright_rgb(image, pixels)
            held = pixels.fit(upright)
            again = plugin._preprocess_image(held, image_max_pixels=max_pixels, image_min_pixels=min_pixels)
            if again.size != held.size or again.mode != held.mode or again.tobytes() != held.tobytes():
                if alike:
                    return data
                held = upright
            out = io.BytesIO()
            held.save(out, format="PNG", compress_level=1)
    except (OSError, ValueError, Image.DecompressionBombError):  # LLaMA-Factory's own path reports it, as before
        return data
    return out.getvalue() if not alike or out.tell() < len(data) else data


def _read_alike(image: Any, data: bytes, pixels: ImagePixels) -> bool:
    """Whether LLaMA-Factory, opening ``data`` itself, trains on the pixels the labeler sees: an RGB
    or grey image without transparency (it would resize a palette nearest-neighbour, and a transparent
    image in its own colours), not turned by its EXIF orientation, and not a JPEG the labeler decodes
    at a smaller scale (:meth:`ImagePixels.draft`)."""
    if image.mode not in ("RGB", "L") or has_alpha(image):
        return False
    if pixels.drafts(image):
        return False
    marked = any(data.find(marker, 0, 65536) >= 0 for marker in EXIF_MARKERS)  # most images: no EXIF to parse
    return not (marked and image.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9))


def training_fit(template: str | None, max_pixels: int, min_pixels: int) -> Callable[[bytes], bytes] | None:
    """Return :func:`fit_image` for LLaMA-Factory's ``template`` (its name) and pixel bounds (None: no such template)."""
    from llamafactory.data.template import TEMPLATES

    if template not in TEMPLATES:
        return None
    return functools.partial(fit_image, TEMPLATES[template].mm_plugin, max_pixels=max_pixels, min_pixels=min_pixels)


def trained_pixels(args: Mapping[str, Any]) -> ImagePixels:
    """Return how the LLaMA-Factory run of ``args`` resizes its images, its template's Qwen2-VL rule included."""
    from llamafactory.data.mm_plugin import Qwen2VLPlugin
    from llamafactory.data.template import TEMPLATES

    template = TEMPLATES.get(str(args.get("template")))
    return ImagePixels.of_run(args, qwen2_vl=template is not None and isinstance(template.mm_plugin, Qwen2VLPlugin))

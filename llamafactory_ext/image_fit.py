"""Hold a training image at the size LLaMA-Factory trains on: decoded and resized once, not every epoch.

LLaMA-Factory keeps each image as its file and decodes and resizes it every time a batch needs
it (``image_max_pixels``; the tiny model's recipe trains at 56-112 pixels a side). A photo of
millions of pixels then costs a full decode per epoch, and a dataset held in memory holds every
file whole. :func:`fit_image` does that resize once, with the template's own plugin, and returns
the result as a PNG (lossless) when it is smaller than the file and the plugin's resize leaves it
as it is: LLaMA-Factory then computes from it exactly the tensors the file gives. The vision
warm-up (:mod:`llamafactory_ext.vision_warmup`) and the in-memory rows LLaMA-Factory trains on
(:func:`llamafactory_ext.reader.load_rows`) both hold images this way.

One image is changed on purpose: a photo turned by its EXIF orientation is held upright, as the
labeler sees it, in memory and in a stream (:func:`llamafactory_ext.reader.stream_rows`).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Mapping
from typing import Any

from lance_io.image_size import ImagePixels
from llamafactory_ext.augment import paused

EXIF_MARKERS = (b"Exif", b"eXIf", b"EXIF")
"""How EXIF data starts in a JPEG (its APP1 segment), a PNG (an ``eXIf`` chunk) and a WebP (an ``EXIF`` chunk)."""
EXIF_ORIENTATION = 0x0112


def fit_image(plugin: Any, data: bytes, *, max_pixels: int, min_pixels: int) -> bytes:
    """Return the image ``data`` as ``plugin`` resizes it for training (a PNG), or ``data`` itself.

    ``data`` comes back as it is when its training size could not take fewer bytes (``max_pixels``
    RGB pixels), when the PNG is no smaller, and when resizing the resized image would change it
    again: Qwen2-VL makes a 600x20 strip 465x28 (downscaled, then stretched to a 28-pixel side) and
    would downscale 465x28 once more. An image that does not decode comes back as it is too, for
    LLaMA-Factory to report as it would have. The run's jitter is not applied here: it stays per epoch.

    An image whose EXIF orientation turns it (a phone's portrait photo) is held upright, whatever
    its size: LLaMA-Factory would train on it as stored, on its side, while the labeler
    (``serve_apps.backends.base.decode_image``) and every viewer show it upright.
    """
    from PIL import Image, ImageOps

    small = max_pixels * 3 >= len(data)  # its training size could not take fewer bytes
    marked = any(data.find(marker, 0, 65536) >= 0 for marker in EXIF_MARKERS)  # most images: no need to open them
    if small and not marked:
        return data
    try:
        with Image.open(io.BytesIO(data)) as image, paused():
            turned = marked and image.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9)
            if small and not turned:
                return data
            upright = ImageOps.exif_transpose(image) if turned else image
            fitted = plugin._preprocess_image(upright, image_max_pixels=max_pixels, image_min_pixels=min_pixels)
            again = plugin._preprocess_image(fitted, image_max_pixels=max_pixels, image_min_pixels=min_pixels)
            if again.size != fitted.size or again.mode != fitted.mode or again.tobytes() != fitted.tobytes():
                return data
            out = io.BytesIO()
            fitted.save(out, format="PNG", compress_level=1)
    except (OSError, ValueError, Image.DecompressionBombError):  # LLaMA-Factory's own path reports it, as before
        return data
    return out.getvalue() if turned or out.tell() < len(data) else data


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

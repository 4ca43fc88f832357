"""The image size a model was trained at: training records it, the labeler resizes to it.

LLaMA-Factory resizes every training image to at most ``image_max_pixels`` pixels (768x768 unless
set; ``configs/train/qwen2_vl_2b_lora.yaml`` sets 512x512) and at least ``image_min_pixels``, before
the model's processor sees it. A hub model's processor keeps its own bounds: Qwen2-VL's go up to 12.8
million pixels, so a LoRA trained at 512x512 and then asked about a 12 MP photo would see some
15,000 visual tokens instead of about 330: inputs unlike the ones it learned from, at 45 times the
cost. ``llamafactory_ext.train.run_training`` writes the bounds into the lineage file beside the
weights (``image_pixels``); the labeler reads them from the adapter's folder, then the model's
(:func:`read_image_pixels`), and resizes each image as LLaMA-Factory did (:meth:`ImagePixels.fit`),
decoding a larger JPEG at 1/2, 1/4 or 1/8 of its scale first (:meth:`ImagePixels.draft`).

Every module that decodes an image imports this one, which lets Pillow open HEIC/HEIF photos
(:func:`register_heif`). What a model sees of an image is one function, :func:`model_image`, for the labeler and for
training alike (``llamafactory_ext.image_fit`` holds each training image as it returns it): the
EXIF orientation applied, the transparent parts over white (:data:`BACKGROUND`), then the resize.
LLaMA-Factory alone would train on a palette image resized nearest-neighbour and on a transparent
one over black, where the labeler saw it over whatever colour its transparent pixels store.
The pixel classifiers (``lancetag eval``'s baselines, the warm-up's teacher, the recipe's checks)
see the same image averaged down to a few pixels a side: :func:`thumbnails`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile


def register_heif() -> None:
    """Let Pillow open HEIC/HEIF, a phone camera's default format, where pillow-heif is installed (every
    environment but the web UI's, whose gradio pins a Pillow too old for it). Called on import."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()


register_heif()

LINEAGE_FILE = "lancetag_lineage.json"
"""Written beside trained weights by ``llamafactory_ext.train``; ``image_pixels`` holds the bounds."""
LLAMAFACTORY_PIXELS = (768 * 768, 32 * 32)
"""LLaMA-Factory's ``image_max_pixels`` and ``image_min_pixels`` when a run sets neither."""


QWEN2_VL_SIDE, QWEN2_VL_RATIO, QWEN2_VL_SQUEEZED = 28, 200, 180
"""LLaMA-Factory's Qwen2-VL rule: a side under 28 px is stretched to 28, an image over 200:1 squeezed to 180:1."""


@dataclass(frozen=True)
class ImagePixels:
    """How a run resized its training images: LLaMA-Factory's ``image_max_pixels``/``image_min_pixels``,
    and whether its template was Qwen2-VL's (``qwen2_vl``: LLaMA-Factory's ``Qwen2VLPlugin`` and its
    subclasses, which then also stretch a thin side and squeeze a long strip, as the processor refuses
    an image over 200:1)."""

    max: int
    min: int
    qwen2_vl: bool = False

    @classmethod
    def of_run(cls, args: Mapping[str, Any], *, qwen2_vl: bool = False) -> ImagePixels:
        """Return the bounds a LLaMA-Factory run's ``args`` train at (its defaults where they set none)."""
        return cls(max=int(args.get("image_max_pixels", LLAMAFACTORY_PIXELS[0])),
                   min=int(args.get("image_min_pixels", LLAMAFACTORY_PIXELS[1])), qwen2_vl=qwen2_vl)

    def drafts(self, image: Image.Image) -> bool:
        """Whether :meth:`draft` decodes ``image`` at a smaller scale: a JPEG (a camera's MPO too) whose
        half of each side still holds ``max`` pixels. Other formats have no smaller decode."""
        return isinstance(image, JpegImageFile) and image.width * image.height >= 4 * self.max

    def draft(self, image: Image.Image) -> None:
        """Let a JPEG decode at the smallest of 1/2, 1/4 or 1/8 of its scale that still holds ``max`` pixels."""
        if self.drafts(image):
            shrink = math.sqrt(self.max / (image.width * image.height))
            image.draft(None, (math.ceil(image.width * shrink), math.ceil(image.height * shrink)))

    def fit(self, image: Image.Image) -> Image.Image:
        """Return ``image`` resized as LLaMA-Factory resizes a training image (``MMPluginMixin._preprocess_image``,
        then with ``qwen2_vl`` ``Qwen2VLPlugin._preprocess_image``'s sides)."""
        if image.width * image.height > self.max:
            image = _scaled(image, self.max)
        if image.width * image.height < self.min:
            image = _scaled(image, self.min)
        if not self.qwen2_vl:
            return image
        if min(image.size) < QWEN2_VL_SIDE:
            image = image.resize((max(image.width, QWEN2_VL_SIDE), max(image.height, QWEN2_VL_SIDE)))
        if image.width / image.height > QWEN2_VL_RATIO:
            image = image.resize((image.height * QWEN2_VL_SQUEEZED, image.height))
        if image.height / image.width > QWEN2_VL_RATIO:
            image = image.resize((image.width, image.width * QWEN2_VL_SQUEEZED))
        return image


BACKGROUND = (255, 255, 255)
"""What a transparent pixel shows once an image is flattened to RGB: white, as vLLM's server and a
web page show it. (Its stored colour is arbitrary: in Tux Paint's stamps black, white or other.)"""


def has_alpha(image: Image.Image) -> bool:
    """Return whether ``image`` can hold transparent pixels: an alpha band, or a transparent colour (PNG ``tRNS``)."""
    return not {"A", "a"}.isdisjoint(image.getbands()) or "transparency" in image.info


WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
"""Pillow's single-band modes of more than 8 bits (a 16-bit grey PNG or TIFF opens as ``I;16``).
Pillow turns them into RGB by clipping at 255, so a 16-bit image comes out white wherever it is
brighter than 255 of 65,535: nearly all of it."""


def eight_bit_grey(image: Image.Image) -> Image.Image:
    """Return a grey image of more than 8 bits (:data:`WIDE_GREY_MODES`) scaled to 8 bits ("L"); others as they are.

    Integers are read as 16-bit (0-65,535 to 0-255, as scikit-image's ``img_as_ubyte`` and
    torchvision's ``convert_image_dtype`` do; a value above 65,535 is white). Floats are read as
    0-1 when the whole image lies there, and otherwise as 0-255, as Pillow reads them. A pixel
    marked transparent (a 16-bit PNG's ``tRNS`` grey) comes back transparent ("LA").
    """
    if image.mode not in WIDE_GREY_MODES:
        return image
    import numpy as np

    values = np.asarray(image, dtype=np.float32)  # exact for every 16-bit integer
    if image.mode != "F":
        scaled = np.clip(values, 0, 65535) / 257
    elif values.size and np.nanmin(values) >= 0 and np.nanmax(values) <= 1:
        scaled = values * 255
    else:
        scaled = np.clip(values, 0, 255)
    grey = Image.fromarray(np.rint(np.nan_to_num(scaled)).astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int | float):
        grey.putalpha(Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8)))
    grey.info.update({k: v for k, v in image.info.items() if k != "transparency"})
    return grey


def flatten(image: Image.Image) -> Image.Image:
    """Return ``image`` in RGB, its transparent parts over :data:`BACKGROUND`; a grey image of more
    than 8 bits scaled to 8 (:func:`eight_bit_grey`), not clipped."""
    image = eight_bit_grey(image)
    if not has_alpha(image):
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")


def model_image(image: Image.Image, fit: ImagePixels | None = None) -> Image.Image:
    """Return an opened, not yet loaded image as a model sees it, in RGB: upright (its EXIF orientation
    applied), its transparent parts over white (:func:`flatten`), and with ``fit`` (the size the model
    was trained at) resized as LLaMA-Factory resizes a training image, a larger JPEG decoded at 1/2 to
    1/8 of its scale first. Raises what Pillow raises for an undecodable image."""
    upright = upright_rgb(image, fit)
    return fit.fit(upright) if fit is not None else upright


def upright_rgb(image: Image.Image, fit: ImagePixels | None = None) -> Image.Image:
    """Return :func:`model_image` before its resize: what the resize to ``fit`` starts from."""
    if fit is not None:
        fit.draft(image)
    return flatten(ImageOps.exif_transpose(image))


def decode_upright(data: bytes, side: int) -> tuple[Image.Image, tuple[int, int]]:
    """Return ``data``'s image as a model sees it (:func:`model_image`, not resized) and its size as stored.

    A JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 of its scale that keeps ``side`` pixels a
    side, for a caller that looks at nothing finer. Raises what Pillow raises for an undecodable image.
    """
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        image.draft("RGB", (side, side))
        return model_image(image), size


DRAFT_PER_PIXEL = 8
""":func:`thumbnails` decodes a JPEG at the smallest scale (1, 1/2, 1/4 or 1/8) that keeps this many
pixels a side behind each thumbnail pixel: for 16x16, a 12 MP photo in about 9 ms instead of 72."""


def thumbnail(image: Image.Image, side: int) -> np.ndarray:
    """Return an RGB ``image`` averaged down to ``side`` x ``side`` pixels (BOX), in [0, 1], as one flat row.

    What the pixel classifiers see: ``lancetag eval``'s baselines, the warm-up's teacher, the recipe's checks.
    """
    return np.asarray(image.resize((side, side), Image.Resampling.BOX), dtype=np.float32).reshape(-1) / 255


def thumbnails(images: Sequence[bytes | None], side: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (each image's :func:`thumbnail` as a model sees it, upright and flattened, a row each; which decoded).

    An image that is empty or does not decode gets a row of zeros and False in the mask.
    """
    rows = np.zeros((len(images), side * side * 3), dtype=np.float32)
    decoded = np.zeros(len(images), dtype=bool)
    for i, data in enumerate(images):
        if not data:
            continue
        try:
            rows[i] = thumbnail(decode_upright(data, DRAFT_PER_PIXEL * side)[0], side)
        except Exception:  # an undecodable image: the caller counts it as it must
            continue
        decoded[i] = True
    return rows, decoded


def _scaled(image: Image.Image, pixels: int) -> Image.Image:
    scale = math.sqrt(pixels / (image.width * image.height))
    return image.resize((int(image.width * scale), int(image.height * scale)))


def read_image_pixels(*folders: str | None) -> ImagePixels | None:
    """Return the bounds the first of ``folders`` with a lineage file records (None: none does, or a hub id)."""
    for folder in folders:
        path = Path(folder) / LINEAGE_FILE if folder else None
        try:
            recorded = json.loads(path.read_text()).get("image_pixels") if path and path.is_file() else None
        except (OSError, ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, dict) and all(isinstance(recorded.get(k), int) for k in ("max", "min")):
            return ImagePixels(max=recorded["max"], min=recorded["min"], qwen2_vl=recorded.get("qwen2_vl") is True)
    return None

"""Image jitter shared by training and labeling: a random affine transform, and fixed views of an image.

Training jitters every image it loads (``llamafactory_ext.augment.install``: a model trained from
scratch memorises pixels without it). The labeler may answer a closed-set question from several
**views** of each image, the image itself and ``count - 1`` jittered copies, and average the
answers' probabilities (test-time augmentation): a model whose errors are mostly variance (the
tiny Qwen2-VL on digits) errs less. A training run that validates decides whether its model is
asked that way (``llamafactory_ext.validation``) and writes :data:`VIEWS_FILE` beside the weights;
the labeler reads it (``serve_apps.backends.base``).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

VIEWS_FILE = "lancetag_views.json"
"""How a model folder's model is asked: the views averaged for its closed-set answers."""


class ImageAugment(BaseModel):
    """Random affine jitter per image: rotation, scale and shift, each uniform in +-the value; a mirror flip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rotate_degrees: float = Field(0.0, ge=0, le=180, description="rotate by up to +-this many degrees")
    scale: float = Field(0.0, ge=0, lt=1, description="zoom by a factor in [1 - scale, 1 + scale]")
    shift: float = Field(0.0, ge=0, lt=1, description="shift by up to +-this fraction of width and height")
    fill: int = Field(0, ge=0, le=255, description="gray level of the area uncovered by the transform")
    flip: bool = Field(False, description="mirror left-right with probability 1/2 (wrong for digits and text)")

    def scaled(self, factor: float) -> ImageAugment:
        """Return this jitter with rotation, zoom and shift ranges multiplied by ``factor``."""
        return self.model_copy(
            update={
                "rotate_degrees": self.rotate_degrees * factor,
                "scale": self.scale * factor,
                "shift": self.shift * factor,
            }
        )


def augment_image(image: Image.Image, augment: ImageAugment, rng: random.Random | Any = random) -> Image.Image:
    """Return ``image`` rotated, scaled, shifted (and mirrored) at random within ``augment`` (same size, RGB)."""
    if augment.flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    width, height = image.size
    angle = math.radians(rng.uniform(-augment.rotate_degrees, augment.rotate_degrees))
    zoom = rng.uniform(1 - augment.scale, 1 + augment.scale)
    dx = rng.uniform(-augment.shift, augment.shift) * width
    dy = rng.uniform(-augment.shift, augment.shift) * height
    # PIL maps each output pixel back to the input: the inverse of "rotate and zoom about the
    # centre, then shift by (dx, dy)".
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    cx, cy = width / 2, height / 2
    inverse = (
        cos, sin, cx - cos * (cx + dx) - sin * (cy + dy),
        -sin, cos, cy + sin * (cx + dx) - cos * (cy + dy),
    )  # fmt: skip
    return image.convert("RGB").transform(
        (width, height),
        Image.Transform.AFFINE,
        inverse,
        Image.Resampling.BILINEAR,
        fillcolor=(augment.fill,) * 3,
    )


DEFAULT_VIEW_JITTER = ImageAugment(rotate_degrees=5, scale=0.05, shift=0.04)
"""Views of a model no training run described: half the demo's training jitter, no mirror."""


class ImageViews(BaseModel):
    """The views of each image a closed-set answer averages: the image, then ``count - 1`` fixed jitters.

    View ``k`` of every image is drawn with the same random numbers (``seed``, ``k``), so an image
    gets the same answer whichever batch it comes in. Without ``augment`` the views use
    :data:`DEFAULT_VIEW_JITTER`, filled with each image's own border grey.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(1, ge=1, le=32, description="views per image, the image itself included")
    augment: ImageAugment | None = Field(None, description="the jitter of the extra views")
    seed: int = 0
    unsure_at: float | None = Field(
        None, ge=0, le=1,
        description="ask the extra views only of an image whose least confident answer from the image alone "
        "has at most this probability (None: of every image)",
    )

    def unsure(self, confidences: Sequence[float | None]) -> bool:
        """Return whether an image whose answers from the image alone have ``confidences`` gets the extra views."""
        return self.unsure_at is None or any(c is None or c <= self.unsure_at for c in confidences)

    def of(self, image: Image.Image) -> list[Image.Image]:
        """Return ``count`` views of ``image``, the image itself first."""
        jitter = self.augment or DEFAULT_VIEW_JITTER.model_copy(update={"fill": border_grey([image])})
        return [image] + [augment_image(image, jitter, random.Random(f"{self.seed}:{k}")) for k in range(1, self.count)]


def border_grey(images: Sequence[Image.Image]) -> int:
    """Return the median grey level of the images' one-pixel borders (a jitter's fill: no new edges)."""
    values: list[np.ndarray] = []
    for image in images:
        grey = np.asarray(image.convert("L"))
        values += [grey[0], grey[-1], grey[:, 0], grey[:, -1]]
    return int(np.median(np.concatenate(values)))


def read_views(folder: str | Path) -> ImageViews | None:
    """Return the views a model folder's :data:`VIEWS_FILE` names, or None (none, or not a local folder)."""
    path = Path(folder) / VIEWS_FILE
    try:
        return ImageViews.model_validate_json(path.read_text()) if path.is_file() else None
    except OSError:
        return None


def write_views(folder: str | Path, views: ImageViews) -> Path:
    """Write ``views`` as ``folder``'s :data:`VIEWS_FILE`; return its path."""
    path = Path(folder) / VIEWS_FILE
    path.write_text(json.dumps(views.model_dump(), indent=2) + "\n")
    return path

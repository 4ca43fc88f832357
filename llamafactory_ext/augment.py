"""Random image augmentation for training: a small affine jitter of every image LLaMA-Factory loads.

A model trained from scratch on a small labeled set (the demo's tiny Qwen2-VL on 1,423 digits)
memorises its training images; a random rotation, scale and shift per image and epoch makes it
learn the shapes instead (docs/training.md, "A recipe that learns"). Configured in the
``lancetag:`` block of a training YAML::

    lancetag:
      augment: {rotate_degrees: 10, scale: 0.1, shift: 0.08}

``install(augment)`` wraps LLaMA-Factory's ``MMPluginMixin._preprocess_image`` (every plugin's
image path goes through it; the jitter follows its resizing) in the training process and in each
Ray Train worker. The image keeps its size, so the number of visual tokens does not change. It
applies to every image the run loads, an ``eval_dataset``'s included. Randomness comes from Python's
``random``, which the trainer seeds (``seed`` in the config), so a run is reproducible.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

_ORIGINAL = "__lancetag_original__"


class ImageAugment(BaseModel):
    """Random affine jitter per image: rotation, scale and shift, each uniform in +-the value; a mirror flip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rotate_degrees: float = Field(0.0, ge=0, le=180, description="rotate by up to +-this many degrees")
    scale: float = Field(0.0, ge=0, lt=1, description="zoom by a factor in [1 - scale, 1 + scale]")
    shift: float = Field(0.0, ge=0, lt=1, description="shift by up to +-this fraction of width and height")
    fill: int = Field(0, ge=0, le=255, description="gray level of the area uncovered by the transform")
    flip: bool = Field(False, description="mirror left-right with probability 1/2 (wrong for digits and text)")


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


def install(augment: ImageAugment | None) -> None:
    """Augment every image LLaMA-Factory preprocesses in this process (``None``: stop augmenting)."""
    from llamafactory.data.mm_plugin import MMPluginMixin

    original = getattr(MMPluginMixin._preprocess_image, _ORIGINAL, MMPluginMixin._preprocess_image)
    if augment is None:
        MMPluginMixin._preprocess_image = original
        return

    @functools.wraps(original)
    def preprocess_image(self: Any, image: Image.Image, **kwargs: Any) -> Image.Image:
        return augment_image(original(self, image, **kwargs), augment)  # after resizing: cheaper

    setattr(preprocess_image, _ORIGINAL, original)
    MMPluginMixin._preprocess_image = preprocess_image

"""Random image augmentation in training: a small affine jitter of every image LLaMA-Factory loads.

A model trained from scratch on a small labeled set (the demo's tiny Qwen2-VL on 1,423 digits)
memorises its training images; a random rotation, scale and shift per image and epoch makes it
learn the shapes instead (docs/training.md, "A recipe that learns"). Configured in the
``lancetag:`` block of a training YAML::

    lancetag:
      augment: {rotate_degrees: 10, scale: 0.1, shift: 0.08}

The jitter itself (:class:`~lance_io.augment.ImageAugment`) lives in ``lance_io``: the labeler
draws its test-time views with it too. ``install(augment)`` wraps LLaMA-Factory's
``MMPluginMixin._preprocess_image`` (every plugin's image path goes through it; the jitter follows
its resizing) in the training process and in each Ray Train worker. The image keeps its size, so
the number of visual tokens does not change. It applies to every image the run loads, an
``eval_dataset``'s included. Randomness comes from Python's ``random``, which the trainer seeds
(``seed`` in the config), so a run is reproducible.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from PIL import Image

from lance_io.augment import ImageAugment, augment_image

__all__ = ["ImageAugment", "augment_image", "install", "paused"]

_ORIGINAL = "__lancetag_original__"


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


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Within the block, LLaMA-Factory's image path resizes without the installed jitter (restored after)."""
    from llamafactory.data.mm_plugin import MMPluginMixin

    current = MMPluginMixin._preprocess_image
    MMPluginMixin._preprocess_image = getattr(current, _ORIGINAL, current)
    try:
        yield
    finally:
        MMPluginMixin._preprocess_image = current

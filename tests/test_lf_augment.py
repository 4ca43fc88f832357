"""Training-image augmentation: the affine jitter itself, and its installation into LLaMA-Factory."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from llamafactory_ext.augment import ImageAugment, augment_image, install


class Extremes:
    """An rng whose every draw is the top of its range (a deterministic worst case)."""

    def uniform(self, low: float, high: float) -> float:
        return high


def _square(size: int = 40, box: tuple[int, int, int, int] = (10, 10, 14, 14)) -> Image.Image:
    image = Image.new("L", (size, size), 0)
    image.paste(255, box)
    return image


def _centroid(image: Image.Image) -> tuple[float, float]:
    pixels = np.asarray(image.convert("L"), dtype=float)
    ys, xs = np.indices(pixels.shape)
    return float((xs * pixels).sum() / pixels.sum()), float((ys * pixels).sum() / pixels.sum())


def test_no_jitter_is_the_identity_and_keeps_size_as_rgb() -> None:
    image = _square()
    out = augment_image(image, ImageAugment(), Extremes())
    assert out.size == image.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(out.convert("L")), np.asarray(image))


def test_shift_moves_the_content_by_the_fraction_of_the_size() -> None:
    image = _square()
    out = augment_image(image, ImageAugment(shift=0.25), Extremes())
    (x0, y0), (x1, y1) = _centroid(image), _centroid(out)
    assert (x1 - x0, y1 - y0) == (pytest.approx(10, abs=0.1), pytest.approx(10, abs=0.1))


def test_scale_zooms_about_the_centre_and_rotation_keeps_the_centre() -> None:
    centred = _square(box=(16, 16, 24, 24))
    zoomed = augment_image(centred, ImageAugment(scale=0.5), Extremes())
    assert (np.asarray(zoomed.convert("L")) > 127).sum() == pytest.approx(1.5**2 * 64, rel=0.15)
    turned = augment_image(_square(box=(16, 10, 24, 30)), ImageAugment(rotate_degrees=90), Extremes())
    bright = np.argwhere(np.asarray(turned.convert("L")) > 127)
    height, width = np.ptp(bright, axis=0) + 1
    assert (height, width) == (8, 20)  # the tall bar lies flat, around the same centre
    assert _centroid(turned) == (pytest.approx(19.5, abs=0.2), pytest.approx(19.5, abs=0.2))


def test_draws_follow_the_seeded_random_module() -> None:
    import random

    image, augment = _square(), ImageAugment(rotate_degrees=10, scale=0.1, shift=0.1)
    random.seed(7)
    first = np.asarray(augment_image(image, augment))
    random.seed(7)
    assert np.array_equal(first, np.asarray(augment_image(image, augment)))
    assert not np.array_equal(first, np.asarray(augment_image(image, augment)))


def test_install_augments_the_images_llamafactory_loads_and_none_restores_them() -> None:
    from llamafactory.data.mm_plugin import get_mm_plugin

    plugin = get_mm_plugin("qwen2_vl", image_token="<|image_pad|>")
    buffer = io.BytesIO()
    _square(56, (20, 12, 36, 44)).save(buffer, "PNG")
    png = buffer.getvalue()

    def loaded() -> np.ndarray:
        (image,) = plugin._regularize_images([png], image_max_pixels=768 * 768, image_min_pixels=32 * 32)["images"]
        return np.asarray(image)

    plain = loaded()
    try:
        install(ImageAugment(shift=0.2, rotate_degrees=20))
        jittered = [loaded() for _ in range(3)]
    finally:
        install(None)
    assert all(j.shape == plain.shape for j in jittered)  # same size: same number of visual tokens
    assert not any(np.array_equal(j, plain) for j in jittered)
    install(ImageAugment(shift=0.2))
    install(ImageAugment(shift=0.2))  # installing twice wraps the original once
    install(None)
    assert np.array_equal(loaded(), plain)

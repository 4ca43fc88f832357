"""The warm-up's classical teacher: an RBF SVM's probabilities for each training image, out of fold."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

import llamafactory_ext.pixel_teacher as pixel_teacher
from llamafactory_ext.pixel_teacher import teacher_probabilities


def _noise(rng: random.Random, low: int = 0, high: int = 255, side: int = 24) -> bytes:
    image = Image.frombytes("L", (side, side), bytes(rng.randint(low, high) for _ in range(side * side)))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_a_label_the_pixels_do_not_show_is_not_learnt_from_the_image_itself() -> None:
    """Labels drawn at random: an SVM fitted on all rows answers each training image with its own
    label; out of fold, the teacher is right about half the time, as chance is."""
    rng = random.Random(0)
    images = [_noise(rng) for _ in range(160)]
    labels = [rng.randrange(2) for _ in images]
    probabilities, record = teacher_probabilities(images, labels, 2, seed=0)
    assert probabilities.shape == (160, 2) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert 0.3 <= record["accuracy"] <= 0.7, record
    assert record["accuracy"] == round(float(np.mean(probabilities.argmax(1) == np.asarray(labels))), 4)


def test_a_label_the_pixels_show_is_taught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dark against bright images, three classes' columns for two seen: the teacher is sure and right,
    each fold fitted on no more than MAX_FIT_ROWS rows."""
    monkeypatch.setattr(pixel_teacher, "MAX_FIT_ROWS", 30)
    rng = random.Random(1)
    labels = [n % 2 * 2 for n in range(100)]  # classes 0 and 2 of 3: class 1 has no row
    images = [_noise(rng, 170, 255) if label else _noise(rng, 0, 85) for label in labels]
    probabilities, record = teacher_probabilities(images, labels, 3, seed=0)
    assert record["accuracy"] == 1.0 and record["fit_rows"] == 30, record
    assert np.all(probabilities[:, 1] == 0), "a class no row holds gets no probability"
    assert np.all(probabilities[np.arange(100), labels] > 0.5)


def test_a_class_of_one_image_leaves_the_teacher_teaching_the_others() -> None:
    """17 categories, some of a handful of images: the SVMs that never saw a class still score the rest."""
    rng = random.Random(2)
    labels = [0] * 40 + [1] * 40 + [2]  # class 2: one image, in one fold's SVM's rows at most
    images = [_noise(rng, 170, 255) if label == 1 else _noise(rng, 0, 85) for label in labels]
    probabilities, record = teacher_probabilities(images, labels, 3, seed=0)
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert np.mean(probabilities[:80].argmax(1) == np.asarray(labels[:80])) == 1.0, record


def test_a_single_class_leaves_the_warmup_without_a_teacher() -> None:
    rng = random.Random(3)
    assert teacher_probabilities([_noise(rng) for _ in range(10)], [0] * 10, 2, seed=0) is None

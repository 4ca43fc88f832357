"""A classical teacher for the vision warm-up: each training image's class probabilities from an RBF SVM on its pixels.

A vision tower trained from scratch on a few thousand images and an RBF SVM on 16x16 thumbnails
of the same images get different images wrong: the SVM matches near neighbours pixel by pixel,
the tower learns patterns. The warm-up learns from both, the labels and these probabilities
(knowledge distillation, with a teacher of another kind than the student). Each image's
probabilities come from an SVM fitted on the other folds: an SVM fitted on an image answers it
with its own label, which teaches nothing the label does not.

The fits grow with the square of their rows, so each fold's SVM is fitted on at most
``MAX_FIT_ROWS`` of the others (the first in the rows' order, a hash of their ids): past a few
thousand training rows only decoding and scoring the thumbnails grow with the rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from lance_io.image_size import thumbnails

THUMBNAIL = 16
"""Side of the thumbnails the SVM sees, as the pixel baselines of ``lancetag eval``."""
FOLDS = 5
MAX_FIT_ROWS = 4_000
"""At most this many rows fit each fold's SVM."""


def teacher_probabilities(
    images: Sequence[bytes], labels: Sequence[int], classes: int, *, seed: int
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """Return (out-of-fold class probabilities, one row per image; the record for the lineage).

    Each fold's images are scored by an SVM fitted on the other folds; one logistic regression then
    maps those scores to probabilities (a multi-class Platt scaling). None when a fold's other rows
    hold a single class.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    started = time.perf_counter()
    features, truth = thumbnails(images, THUMBNAIL)[0], np.asarray(labels)
    folds = np.random.default_rng(seed).permutation(len(truth)) % FOLDS  # a fold: a random fifth of the rows
    scores = np.zeros((len(truth), classes), dtype=np.float64)
    fitted = 0
    for k in range(FOLDS):
        fit, held = np.flatnonzero(folds != k)[:MAX_FIT_ROWS], folds == k
        if len(np.unique(truth[fit])) < 2:
            return None
        svm = make_pipeline(StandardScaler(), SVC(kernel="rbf")).fit(features[fit], truth[fit])
        scores[held] = _scores(svm, features[held], classes)
        fitted = max(fitted, len(fit))
    calibrator = LogisticRegression(max_iter=1000).fit(scores, truth)
    probabilities = np.zeros((len(truth), classes), dtype=np.float32)
    probabilities[:, calibrator.classes_] = calibrator.predict_proba(scores)  # a class no row holds: 0
    record = {
        "model": f"RBF SVM on {THUMBNAIL}x{THUMBNAIL} pixels, out of {FOLDS} folds",
        "accuracy": round(float(np.mean(probabilities.argmax(1) == truth)), 4),
        "fit_rows": fitted,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return probabilities, record


def _scores(svm: Any, features: np.ndarray, classes: int) -> np.ndarray:
    """Return ``svm``'s score of each class for each row; a class it was not fitted on scores below every other."""
    raw = svm.decision_function(features)
    if raw.ndim == 1:  # two classes: one score, for the second
        raw = np.stack([-raw, raw], axis=1)
    scores = np.full((len(features), classes), raw.min() - 1.0)
    scores[:, svm.classes_] = raw
    return scores

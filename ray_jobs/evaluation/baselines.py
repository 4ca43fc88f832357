"""Classical baselines next to a model's accuracy: what raw pixels alone get on the same rows.

A fine-tuned model that does no better than logistic regression on downsampled pixels has not
learned anything a VLM is needed for. ``lancetag eval --baseline-train "split = 'train'"`` fits
each baseline on the rows of that filter and scores it on exactly the rows it evaluates:

- logistic regression and an RBF SVM (scikit-learn), each on the image resized to 16x16 RGB
  (area averaging), standardized per feature; a greyscale image gives three equal channels.

Training rows are capped at :data:`MAX_TRAIN_ROWS`, chosen by id hash (deterministic), so a big
table does not make the report slow; the count used is reported.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lance_io.reasons import ReasonError
from lance_io.splits import id_bucket

PIXELS = 16
MAX_TRAIN_ROWS = 5000
SALT = "baseline"


class BaselineError(ReasonError):
    """Baselines that cannot be fitted; ``reason`` is a stable code."""


@dataclass
class Baseline:
    """One classical model's accuracy on the evaluated rows, and what it was trained on."""

    name: str
    accuracy: float
    rows: int
    train_rows: int
    train_filter: str
    overlap: int
    seconds: float


def pixel_features(images: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Return (16x16 RGB pixels in [0, 1], one row per image; mask of the images that decoded)."""
    from PIL import Image

    features = np.zeros((len(images), PIXELS * PIXELS * 3), dtype=np.float32)
    ok = np.zeros(len(images), dtype=bool)
    for i, data in enumerate(images):
        if not data:
            continue
        try:
            with Image.open(io.BytesIO(data)) as image:
                small = image.convert("RGB").resize((PIXELS, PIXELS), Image.Resampling.BOX)
        except Exception:  # an undecodable image: the baseline cannot answer it (counted wrong)
            continue
        features[i] = np.asarray(small, dtype=np.float32).reshape(-1) / 255.0
        ok[i] = True
    return features, ok


def _models() -> dict[str, object]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return {
        f"logistic regression ({PIXELS}x{PIXELS} pixels)": make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000)
        ),
        f"RBF SVM ({PIXELS}x{PIXELS} pixels)": make_pipeline(StandardScaler(), SVC(kernel="rbf")),
    }


def fit_baselines(
    train_images: Sequence[bytes | None],
    train_truth: Sequence[str],
    images: Sequence[bytes | None],
    truth: Sequence[str],
    *,
    train_filter: str = "",
    overlap: int = 0,
) -> list[Baseline]:
    """Fit every baseline on the training images and return its accuracy on ``images`` against ``truth``.

    An evaluated image that does not decode counts as wrong, as a row without a label does.
    """
    x_train, ok_train = pixel_features(train_images)
    y_train = np.asarray([str(t) for t in train_truth])[ok_train]
    if len(set(y_train.tolist())) < 2:
        raise BaselineError(
            "baseline_needs_two_classes",
            f"the baseline training rows ({train_filter or 'all'}) hold {len(y_train)} decodable images of "
            f"{len(set(y_train.tolist()))} class(es); give a --baseline-train filter with at least two classes",
        )
    x, ok = pixel_features(images)
    y = np.asarray([str(t) for t in truth])
    out = []
    for name, model in _models().items():
        started = time.perf_counter()
        model.fit(x_train[ok_train], y_train)  # type: ignore[attr-defined]
        predicted = np.full(len(y), None, dtype=object)
        if ok.any():
            predicted[ok] = model.predict(x[ok])  # type: ignore[attr-defined]
        accuracy = float(np.mean(predicted == y)) if len(y) else 0.0
        out.append(
            Baseline(name, accuracy, len(y), int(ok_train.sum()), train_filter, overlap,
                     round(time.perf_counter() - started, 2))
        )
    return out


def table_baselines(
    ds: object, truth: str, train_filter: str, where: str | None, *, image_column: str = "image"
) -> list[Baseline]:
    """Fit the baselines on ``ds`` rows matching ``train_filter``, score them on rows matching ``where``.

    Rows without a ``truth`` value are left out of both, as ``lancetag eval`` leaves them out.
    """
    train_where = f"({train_filter}) AND {truth} IS NOT NULL"
    total = ds.count_rows(filter=train_where)  # type: ignore[attr-defined]
    keep = 1.0 if total <= MAX_TRAIN_ROWS else MAX_TRAIN_ROWS / total
    train_ids, train_images, train_truth = [], [], []
    for batch in ds.to_batches(columns=["id", image_column, truth], filter=train_where):  # type: ignore[attr-defined]
        ids, images, labels = (batch.column(c).to_pylist() for c in ("id", image_column, truth))
        for row_id, image, label in zip(ids, images, labels, strict=True):
            if keep == 1.0 or id_bucket(str(row_id), SALT) < keep:
                train_ids.append(row_id)
                train_images.append(image)
                train_truth.append(label)
    evaluated_where = f"({where}) AND {truth} IS NOT NULL" if where else f"{truth} IS NOT NULL"
    data = ds.to_table(columns=["id", image_column, truth], filter=evaluated_where).to_pydict()  # type: ignore[attr-defined]
    overlap = len(set(train_ids) & set(data["id"]))
    return fit_baselines(
        train_images, train_truth, data[image_column], data[truth], train_filter=train_filter, overlap=overlap
    )

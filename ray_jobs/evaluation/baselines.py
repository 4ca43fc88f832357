"""Classical baselines next to a model's accuracy: what raw pixels alone get on the same rows.

A fine-tuned model that does no better than logistic regression on downsampled pixels has not
learned anything a VLM is needed for. ``lancetag eval --baseline-train "split = 'train'"`` fits
each baseline on the rows of that filter and scores it on exactly the rows it evaluates:

- logistic regression and an RBF SVM (scikit-learn), each on the image resized to 16x16 RGB
  (area averaging; ``lance_io.image_size.thumbnails``, upright as the model sees it), standardized
  per feature; a greyscale image gives three equal channels. A JPEG is decoded at the smallest
  scale that keeps 8 pixels behind each of the 16 a side, so a photo costs a fraction of its whole
  decode.
- Each is fitted on its training rows in the order of their ids, so the same rows give the same
  baseline whatever order the table stores them in, and the logistic regression is solved to
  :data:`LOGISTIC_TOLERANCE`: scikit-learn's default stops L-BFGS on these correlated pixels
  while a different row order still moves a few answers.

Training rows are capped at :data:`MAX_TRAIN_ROWS` and scored rows at :data:`MAX_SCORED_ROWS`,
each chosen by id hash (deterministic), and images are read for the chosen rows only, so a big
table does not make the report slow; the counts used are reported (``train_rows``, ``rows``).

Two accuracies a point apart on a few hundred rows may be noise. Each baseline is also compared
with the model row by row (McNemar's exact test: of the rows exactly one of the two gets right,
how many the model gets), and the verdict, ``above``, ``level`` or ``below``, is what that test
says at :data:`SIGNIFICANCE`, not what the two percentages look like.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from lance_io.image_size import thumbnails
from lance_io.reasons import ReasonError
from lance_io.splits import id_bucket

PIXELS = 16
"""Side of the thumbnails the baselines see (``lance_io.image_size.thumbnails``)."""
MAX_TRAIN_ROWS = 5000
MAX_SCORED_ROWS = 20_000
SALT = "baseline"
LOGISTIC_TOLERANCE = 1e-6
"""L-BFGS stops when no gradient component exceeds this. At scikit-learn's 1e-4 a logistic regression on 1,000
digits stopped after about 50 iterations, 0.5-1.3 points below the solved model and changing with the rows' order."""
SIGNIFICANCE = 0.05


class BaselineError(ReasonError):
    """Baselines that cannot be fitted; ``reason`` is a stable code."""


@dataclass
class Baseline:
    """One classical model's accuracy on the evaluated rows, what it was trained on, and the model against it.

    ``rows``: the evaluated rows it was scored on (all of them, or :data:`MAX_SCORED_ROWS` chosen by id hash);
    ``model_accuracy``: the model's accuracy on those same rows;
    ``model_only``/``baseline_only``: of those rows, the ones only the model (only this baseline) got right;
    ``p_value``: McNemar's exact two-sided test of those counts; ``verdict``: the model is ``above``
    the baseline, ``below`` it, or ``level`` with it (the rows cannot tell them apart).
    """

    name: str
    accuracy: float
    rows: int
    train_rows: int
    train_filter: str
    overlap: int
    seconds: float
    model_accuracy: float
    model_only: int
    baseline_only: int
    p_value: float
    verdict: str


def paired_verdict(model_only: int, baseline_only: int) -> tuple[float, str]:
    """Return McNemar's exact p-value for these discordant counts and the verdict it gives at SIGNIFICANCE."""
    from scipy.stats import binomtest

    discordant = model_only + baseline_only
    p_value = float(binomtest(model_only, discordant, 0.5).pvalue) if discordant else 1.0
    if p_value >= SIGNIFICANCE:
        return p_value, "level"
    return p_value, "above" if model_only > baseline_only else "below"


def describe_verdict(baseline: Baseline) -> str:
    """One phrase for people: where the model stands against ``baseline`` on the same rows, and why."""
    where = {"above": "above it", "below": "below it", "level": "level with it"}[baseline.verdict]
    rows = "row" if baseline.model_only == 1 else "rows"
    counts = (f"the model alone right on {baseline.model_only} {rows}, it alone on {baseline.baseline_only}; "
              f"McNemar p = {baseline.p_value:.3g}")
    if baseline.verdict == "level":
        counts += f", so these {baseline.rows} rows cannot tell the two apart"
    return f"{where} ({counts})"


def _models() -> dict[str, object]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return {
        f"logistic regression ({PIXELS}x{PIXELS} pixels)": make_pipeline(
            StandardScaler(), LogisticRegression(tol=LOGISTIC_TOLERANCE, max_iter=5000)
        ),
        f"RBF SVM ({PIXELS}x{PIXELS} pixels)": make_pipeline(StandardScaler(), SVC(kernel="rbf")),
    }


@dataclass
class PixelRows:
    """Rows as the baselines see them: ids, 16x16 pixels, whether each image decoded, truth, the model's answers."""

    ids: list[str]
    features: np.ndarray
    decoded: np.ndarray
    truth: np.ndarray
    answers: list[str | None]


def pixel_rows(chunks: Iterable[dict[str, list]], image_column: str, truth: str, answer: str | None = None) -> PixelRows:
    """Decode each chunk's images to pixels as it comes, so no more than one chunk of image bytes is held."""
    ids: list[str] = []
    features, decoded, truths, answers = [], [], [], []
    for chunk in chunks:
        x, ok = thumbnails(chunk[image_column], PIXELS)
        ids += [str(i) for i in chunk["id"]]
        features.append(x)
        decoded.append(ok)
        truths += [str(t) for t in chunk[truth]]
        answers += chunk[answer] if answer else [None] * len(ok)
    empty = np.zeros((0, PIXELS * PIXELS * 3), dtype=np.float32)
    return PixelRows(ids, np.concatenate([empty, *features]), np.concatenate([np.zeros(0, bool), *decoded]),
                     np.asarray(truths, dtype=object), answers)


def fit_baselines(train: PixelRows, scored: PixelRows, *, train_filter: str = "", overlap: int = 0) -> list[Baseline]:
    """Fit every baseline on ``train``; return its accuracy on ``scored`` and the model's answers against it.

    An evaluated image that does not decode counts as wrong, as a row without a label (or answer) does.
    """
    by_id = np.lexsort((train.truth.astype(str), np.asarray(train.ids, dtype=str)))
    by_id = by_id[train.decoded[by_id]]  # the fit depends on the rows, not on the order the table holds them in
    x_train, y_train = train.features[by_id], train.truth[by_id]
    classes = set(y_train.tolist())
    if len(classes) < 2:
        raise BaselineError(
            "baseline_needs_two_classes",
            f"the baseline training rows ({train_filter or 'all'}) hold {len(y_train)} decodable images of "
            f"{len(classes)} class(es); give a --baseline-train filter with at least two classes",
        )
    y, ok = scored.truth, scored.decoded
    model_right = np.asarray([a is not None and str(a) == t for a, t in zip(scored.answers, y, strict=True)], dtype=bool)
    out = []
    for name, model in _models().items():
        started = time.perf_counter()
        model.fit(x_train, y_train)  # type: ignore[attr-defined]
        predicted = np.full(len(y), None, dtype=object)
        if ok.any():
            predicted[ok] = model.predict(scored.features[ok])  # type: ignore[attr-defined]
        right = predicted == y
        accuracy = float(np.mean(right)) if len(y) else 0.0
        model_only, baseline_only = int(np.sum(model_right & ~right)), int(np.sum(right & ~model_right))
        p_value, verdict = paired_verdict(model_only, baseline_only)
        out.append(
            Baseline(name, accuracy, len(y), int(train.decoded.sum()), train_filter, overlap,
                     round(time.perf_counter() - started, 2), float(np.mean(model_right)) if len(y) else 0.0,
                     model_only, baseline_only, p_value, verdict)
        )
    return out


def table_baselines(
    ds: object, truth: str, answer: str, train_filter: str, where: str | None, *, image_column: str = "image"
) -> list[Baseline]:
    """Fit the baselines on ``ds`` rows matching ``train_filter``, score them and the ``answer`` column on rows matching ``where``.

    Rows without a ``truth`` value are left out of both, as ``lancetag eval`` leaves them out. Each side
    is capped (:data:`MAX_TRAIN_ROWS`, :data:`MAX_SCORED_ROWS`) by id hash, and images are read for
    the chosen rows only: the cost stays flat as the table grows, but for scanning its ids.
    """
    train_where = f"({train_filter}) AND {truth} IS NOT NULL"
    scored_where = f"({where}) AND {truth} IS NOT NULL" if where else f"{truth} IS NOT NULL"
    train = pixel_rows(_chosen_rows(ds, train_where, MAX_TRAIN_ROWS, ["id", image_column, truth]), image_column, truth)
    scored = pixel_rows(_chosen_rows(ds, scored_where, MAX_SCORED_ROWS, ["id", image_column, truth, answer]),
                        image_column, truth, answer)
    overlap = len(set(train.ids) & set(scored.ids))
    return fit_baselines(train, scored, train_filter=train_filter, overlap=overlap)


def _chosen_rows(ds: object, where: str, cap: int, columns: list[str]) -> Iterator[dict[str, list]]:
    """Yield ``columns`` of the rows matching ``where``, in chunks: all of them, or about ``cap`` chosen by id hash.

    Choosing reads the ``id`` column alone; the other columns (the images) are read for the chosen
    rows only (:func:`lance_io.scan.rows_with_ids`). Either way ``TAKE_ROWS`` images are held at a time.
    """
    from lance_io.scan import TAKE_ROWS, rows_with_ids, scan_batches

    total = ds.count_rows(filter=where)  # type: ignore[attr-defined]
    if total <= cap:
        for batch in scan_batches(ds, columns, where=where, batch_size=TAKE_ROWS):  # type: ignore[arg-type]
            yield batch.to_pydict()
        return
    keep = cap / total
    ids = [
        row_id
        for batch in ds.to_batches(columns=["id"], filter=where)  # type: ignore[attr-defined]
        for row_id in batch.column("id").to_pylist()
        if id_bucket(str(row_id), SALT) < keep
    ]
    for rows in rows_with_ids(ds, ids, columns, where=where):  # type: ignore[arg-type]
        yield rows.to_pydict()

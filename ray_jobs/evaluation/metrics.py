"""Label quality against ground truth: accuracy, per-class P/R/F1, confusion, coverage, calibration."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ClassMetrics:
    """Precision, recall and F1 of one class, with its support (rows whose truth is that class)."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Evaluation:
    """How predictions compare with truth on the rows that have a truth value."""

    rows: int
    labeled: int
    invalid: int
    accuracy: float
    coverage: float
    classes: list[str]
    per_class: dict[str, ClassMetrics]
    confusion: list[list[int]]
    mean_confidence: float | None
    calibration_error: float | None
    macro_f1: float
    notes: list[str] = field(default_factory=list)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Return the ECE: the gap between confidence and accuracy, averaged over equal-width bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            error += mask.mean() * abs(confidence[mask].mean() - correct[mask].mean())
    return float(error)


def evaluate(
    truth: list[str | None],
    predicted: list[str | None],
    confidence: list[float | None] | None = None,
    errors: list[str | None] | None = None,
) -> Evaluation:
    """Compare ``predicted`` with ``truth`` row by row (rows without truth are left out).

    A row with no prediction counts as wrong for accuracy and is reported as invalid when
    ``errors`` says why. Classes are the union of truth and predicted values, sorted.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    keep = [i for i, t in enumerate(truth) if t is not None]
    t = [str(truth[i]) for i in keep]
    p = [None if predicted[i] is None else str(predicted[i]) for i in keep]
    labeled = sum(x is not None for x in p)
    invalid = sum(1 for i in keep if errors is not None and errors[i] is not None)
    classes = sorted(set(t) | {x for x in p if x is not None}, key=_natural)
    missing = "<none>"
    p_filled = [x if x is not None else missing for x in p]
    accuracy = float(np.mean([a == b for a, b in zip(t, p_filled, strict=True)])) if t else 0.0
    precision, recall, f1, support = precision_recall_fscore_support(
        t, p_filled, labels=classes, zero_division=0
    )
    per_class = {
        c: ClassMetrics(float(precision[k]), float(recall[k]), float(f1[k]), int(support[k])) for k, c in enumerate(classes)
    }
    confusion = confusion_matrix(t, p_filled, labels=classes).tolist() if t else []
    mean_conf = ece = None
    if confidence is not None:
        pairs = [(confidence[i], p_filled[n] == t[n]) for n, i in enumerate(keep) if confidence[i] is not None]
        if pairs:
            conf = np.array([c for c, _ in pairs], dtype=float)
            correct = np.array([ok for _, ok in pairs], dtype=float)
            mean_conf = float(conf.mean())
            ece = expected_calibration_error(conf, correct)
    return Evaluation(
        rows=len(t),
        labeled=labeled,
        invalid=invalid,
        accuracy=accuracy,
        coverage=labeled / len(t) if t else 0.0,
        classes=classes,
        per_class=per_class,
        confusion=confusion,
        mean_confidence=mean_conf,
        calibration_error=ece,
        macro_f1=float(np.mean([m.f1 for m in per_class.values() if m.support])) if per_class else 0.0,
    )


def _natural(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)

"""Label quality against ground truth: accuracy, per-class P/R/F1, confusion, coverage, calibration.

:class:`Tally` counts one answer/truth pair a record batch at a time: how often each (truth,
answer) pair occurs, and ten calibration bins. What it holds grows with the distinct pairs (at
most the classes squared), not with the rows, so ``lancetag eval`` reads a table of any size in
the memory of its classes (a truth column that is nearly a key makes the pairs the rows).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MATRIX_CLASSES = 100
"""Most classes a confusion matrix is kept (and drawn) for; beyond, :attr:`Evaluation.most_confused` alone."""
MOST_CONFUSED = 20
"""Off-diagonal (truth, answer) pairs listed in :attr:`Evaluation.most_confused`."""
CALIBRATION_BINS = 10


@dataclass
class ClassMetrics:
    """Precision, recall and F1 of one class, with its support (rows whose truth is that class)."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Evaluation:
    """How predictions compare with truth on the rows that have a truth value.

    ``confusion`` is empty past :data:`MATRIX_CLASSES` classes (``notes`` says so);
    ``most_confused`` lists the commonest wrong answers as (truth, answer, rows).
    """

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
    most_confused: list[tuple[str, str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Return the ECE: the gap between confidence and accuracy, averaged over equal-width bins."""
    tally = _Calibration(bins)
    tally.add(np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float))
    return tally.error()


class _Calibration:
    """Per-bin row counts, confidence sums and correct counts, added to batch by batch."""

    def __init__(self, bins: int = CALIBRATION_BINS) -> None:
        self.edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
        self.rows, self.confidence, self.correct = np.zeros(bins), np.zeros(bins), np.zeros(bins)

    def add(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        which = np.clip(np.digitize(confidence, self.edges), 0, len(self.rows) - 1)
        self.rows += np.bincount(which, minlength=len(self.rows))
        self.confidence += np.bincount(which, weights=confidence, minlength=len(self.rows))
        self.correct += np.bincount(which, weights=correct, minlength=len(self.rows))

    def mean(self) -> float | None:
        return float(self.confidence.sum() / self.rows.sum()) if self.rows.sum() else None

    def error(self) -> float:
        filled = self.rows > 0
        gaps = np.abs(self.confidence[filled] - self.correct[filled]) / self.rows[filled]
        return float(np.sum(self.rows[filled] / self.rows.sum() * gaps)) if filled.any() else 0.0


def _as_text(values: pa.Array) -> pa.Array:
    """Return ``values`` as strings, each as Python's ``str`` writes it (nulls stay null)."""
    if pa.types.is_null(values.type) or pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values.cast(pa.string())
    try:
        encoded = pc.dictionary_encode(values)
    except pa.ArrowNotImplementedError:  # lists, structs: each value written out
        return pa.array([None if v is None else str(v) for v in values.to_pylist()], pa.string())
    words = pa.array([None if v is None else str(v) for v in encoded.dictionary.to_pylist()], pa.string())
    return pc.take(words, encoded.indices)


class Tally:
    """The counts an :class:`Evaluation` is made of, for one answer/truth pair, added a batch at a time."""

    def __init__(self) -> None:
        self.pairs: Counter[tuple[str, str | None]] = Counter()
        self.invalid = 0
        self.calibration = _Calibration()
        self.not_confidence = 0  # NaN or outside [0, 1]: left out of the calibration

    def add(self, truth: pa.Array, answer: pa.Array, confidence: pa.Array | None = None, errors: pa.Array | None = None) -> None:
        """Count one batch: rows without truth are left out; a row without an answer is wrong."""
        kept = pc.is_valid(truth)
        truth, answer = _as_text(truth.filter(kept)), _as_text(answer.filter(kept))
        if errors is not None:
            self.invalid += pc.sum(pc.is_valid(errors.filter(kept))).as_py() or 0
        counts = pa.table({"truth": truth, "answer": answer}).group_by(["truth", "answer"]).aggregate([([], "count_all")])
        for t, a, rows in zip(*(counts[c].to_pylist() for c in ("truth", "answer", "count_all")), strict=True):
            self.pairs[t, a] += rows
        if confidence is not None:
            confidence = confidence.filter(kept)
            values = confidence.cast(pa.float64()).to_numpy(zero_copy_only=False)  # null: NaN
            given = pc.is_valid(confidence).to_numpy(zero_copy_only=False)
            scored = (values >= 0.0) & (values <= 1.0)  # NaN is neither
            self.not_confidence += int(np.sum(given & ~scored))
            correct = pc.fill_null(pc.equal(truth, answer), False).to_numpy(zero_copy_only=False)
            self.calibration.add(values[scored], correct[scored].astype(float))

    def evaluation(self) -> Evaluation:
        """Return the figures of the rows counted so far."""
        rows = sum(self.pairs.values())
        classes = sorted({t for t, _ in self.pairs} | {a for _, a in self.pairs if a is not None}, key=_natural)
        support, answered, right = Counter(), Counter(), Counter()
        for (t, a), n in self.pairs.items():
            support[t] += n
            answered[a] += n
            right[t] += n if t == a else 0
        per_class = {c: _class_metrics(right[c], answered[c], support[c]) for c in classes}
        notes = []
        confusion: list[list[int]] = []
        if len(classes) <= MATRIX_CLASSES:
            index = {c: k for k, c in enumerate(classes)}
            confusion = [[0] * len(classes) for _ in classes]
            for (t, a), n in self.pairs.items():
                if a is not None:
                    confusion[index[t]][index[a]] = n
        else:
            notes.append(f"{len(classes)} classes: no confusion matrix past {MATRIX_CLASSES}; see most_confused")
        wrong = sorted(((t, a, n) for (t, a), n in self.pairs.items() if a is not None and a != t),
                       key=lambda pair: (-pair[2], _natural(pair[0]), _natural(pair[1])))
        labeled = rows - answered[None]
        if self.not_confidence:
            notes.append(f"{self.not_confidence} confidence value(s) NaN or outside [0, 1]: left out of the calibration")
        return Evaluation(
            rows=rows,
            labeled=labeled,
            invalid=self.invalid,
            accuracy=sum(right.values()) / rows if rows else 0.0,
            coverage=labeled / rows if rows else 0.0,
            classes=classes,
            per_class=per_class,
            confusion=confusion,
            mean_confidence=self.calibration.mean(),
            calibration_error=self.calibration.error() if self.calibration.mean() is not None else None,
            macro_f1=float(np.mean([m.f1 for m in per_class.values() if m.support])) if per_class else 0.0,
            most_confused=wrong[:MOST_CONFUSED],
            notes=notes,
        )


def evaluate(
    truth: Sequence[str | None],
    predicted: Sequence[str | None],
    confidence: Sequence[float | None] | None = None,
    errors: Sequence[str | None] | None = None,
) -> Evaluation:
    """Compare ``predicted`` with ``truth`` row by row (rows without truth are left out).

    A row with no prediction counts as wrong for accuracy and is reported as invalid when
    ``errors`` says why. Classes are the union of truth and predicted values, sorted.
    """
    tally = Tally()
    tally.add(pa.array(truth), pa.array(predicted),
              None if confidence is None else pa.array(confidence, pa.float64()),
              None if errors is None else pa.array(errors, pa.string()))
    return tally.evaluation()


def _class_metrics(right: int, answered: int, support: int) -> ClassMetrics:
    """Precision, recall and F1 from counts; 0 where a count is 0 (scikit-learn's ``zero_division=0``)."""
    precision = right / answered if answered else 0.0
    recall = right / support if support else 0.0
    f1 = 2 * right / (answered + support) if answered + support else 0.0
    return ClassMetrics(precision, recall, f1, support)


def _natural(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)

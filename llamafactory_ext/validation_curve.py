"""The validation record of a run: its settings, its curve, and which evaluation's weights are kept."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ValidationOptions(BaseModel):
    """The ``validation:`` entry of the ``lancetag:`` block: how much to hold back, when to score, when to stop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fraction: float = Field(0.1, gt=0, lt=1, description="share of each Lance dataset's ids held back")
    max_rows: int = Field(
        5000, ge=1,
        description="hold back about this many rows at most: on a larger table the fraction becomes max_rows / rows",
    )
    every_epochs: int | None = Field(None, ge=1, description="score after every this many epochs (default 1)")
    every_steps: int | None = Field(None, ge=1, description="score every this many optimizer steps instead")
    patience: int | None = Field(
        None, ge=1, description="stop after this many evaluations in a row not kept: none better, nor within tolerance (None: never)"
    )
    batch_size: int = Field(16, ge=1, description="validation images per forward")
    tolerance: float = Field(
        0.0, ge=0,
        description="keep a later evaluation at most this many standard errors of the best accuracy below it "
        "(the noise of the validation rows, Curve.standard_error)",
    )
    views: int = Field(
        1, ge=1, le=32,
        description="at the end, also score the kept weights on this many views of each image (the run's "
        "jitter at half strength) and have the labeler ask the model that way if they score higher",
    )

    @model_validator(mode="after")
    def _one_interval(self) -> ValidationOptions:
        if self.every_epochs is not None and self.every_steps is not None:
            raise ValueError("give every_epochs or every_steps, not both")
        if self.every_epochs is None and self.every_steps is None:
            object.__setattr__(self, "every_epochs", 1)
        return self


@dataclass
class CurvePoint:
    """One evaluation: where training was, the validation accuracy then, and the train loss logged."""

    step: int
    epoch: float
    validation_accuracy: float
    train_loss: float | None
    seconds: float


@dataclass
class Curve:
    """The validation record of a run, as written to ``lancetag_validation.json`` and the lineage."""

    fraction: float
    rows: int
    points: list[CurvePoint] = field(default_factory=list)
    best: CurvePoint | None = None
    stopped_early: bool = False
    views: dict[str, Any] | None = None
    """The kept weights on views of each image: count, accuracy, single-view accuracy, chosen."""

    def add(self, point: CurvePoint, tolerance: float = 0.0) -> bool:
        """Append ``point``; return whether its weights are kept as the best.

        A point better than every earlier one is kept. With ``tolerance``, so is a later point at most
        that many standard errors below the best accuracy so far (:meth:`standard_error`): the
        validation rows cannot tell the two apart, and the later weights trained longer. Ties
        otherwise keep the earlier point. Early stopping counts the points not kept.
        """
        top = max((p.validation_accuracy for p in self.points), default=None)
        self.points.append(point)
        kept = top is None or point.validation_accuracy > top or (
            tolerance > 0 and point.validation_accuracy >= top - tolerance * self.standard_error(top) - 1e-9
        )
        if kept:
            self.best = point
        return kept

    def since_kept(self) -> int:
        """Return how many evaluations came after the kept one: what ``patience`` counts."""
        return next((k for k, p in enumerate(reversed(self.points)) if p is self.best), len(self.points))

    def standard_error(self, accuracy: float) -> float:
        """Return the standard error of ``accuracy`` measured on this curve's validation rows.

        Agresti-Coull's: ``sqrt(p(1-p)/n)`` with two right and two wrong answers added to the rows,
        so a perfect score still has the noise of its sample size (more than one row's worth on
        100 rows) rather than none.
        """
        if not self.rows:
            return 0.0
        n = self.rows + 4
        p = (accuracy * self.rows + 2) / n
        return math.sqrt(p * (1 - p) / n)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)

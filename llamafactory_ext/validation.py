"""Validation inside training: score the task on held-back rows, keep the best weights, stop on a plateau.

Configured in the ``lancetag:`` block of a training YAML (off when absent)::

    lancetag:
      validation: {fraction: 0.1, every_epochs: 1, patience: 3}

Each Lance dataset of the run is split again by id hash (:func:`lance_io.splits.split_of` with
salt ``validation``, as :meth:`LanceSource.keeps` does): its ``train`` rows are trained on and its
``validation`` rows never are. The share is ``fraction``, or ``max_rows`` (default 5,000) over the
rows when that is less (:func:`held_back_fraction`); the validation rows' ids are found once
before training (:func:`validation_rows`), and each evaluation reads those rows alone, by id.
At every evaluation point (``every_epochs`` or ``every_steps``) the
model being trained answers the validation rows exactly as the labeler would: the run's
:data:`InTrainingLabeler` (``ray_jobs.evaluation.in_training.transformers_labeler``: the
transformers backend's closed-set scoring, summed log-likelihood of each candidate answer) wraps
the in-training model. This package does not import the labeler's code (``serve_apps``): the
caller hands it in. The share of answers that match the truth is the validation accuracy.

The trainable weights of the best evaluation (LoRA adapters, or every weight of a full
fine-tune) are copied to CPU memory and put back when training ends, so what LLaMA-Factory saves
into ``output_dir`` is the best checkpoint, not the last. ``patience`` evaluations in a row not
kept (none better, nor within ``tolerance`` of the best) stop the run. Rank 0 evaluates and decides; under Ray Train every rank receives
the decision (a broadcast at the same point of every rank's loop), so all stop together. The
curve (step, epoch, validation accuracy, train loss) goes to ``<output_dir>/lancetag_validation.json``
after each evaluation and into the run's lineage.

With ``views`` above 1, the kept weights are scored once more at the end on that many views of
each validation image (the image and fixed jitters at half the run's training jitter,
:class:`~lance_io.augment.ImageViews`). If averaging the views answers more validation rows
correctly than the image alone, the labeler should ask this model that way: the views go to
``<output_dir>/lancetag_views.json``, which the labeler reads; otherwise it asks with the image
alone, at a ``views``-th of the cost. Both accuracies are in the record. Kept views carry
``unsure_at``: the labeler asks them only of images whose answer alone is that unsure
(:meth:`Validator.choose_views`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lance_io.augment import ImageAugment, ImageViews, write_views
from lance_io.image_size import ImagePixels
from lance_io.labels import LabelRecord, answer_columns, results_to_batch
from lance_io.reasons import ReasonError
from lance_io.tasks import Task
from llamafactory_ext.image_fit import trained_pixels
from llamafactory_ext.source import (
    DATA_CONFIG,
    LanceSource,
    dataset_names,
    lance_source_of,
    read_dataset_info,
)
from llamafactory_ext.validation_curve import Curve, CurvePoint, ValidationOptions

logger = logging.getLogger(__name__)

CURVE_FILE = "lancetag_validation.json"
VIEW_JITTER = 0.5
"""The views' jitter, as a share of the training jitter: a view should look like the image, not a new one."""

LabelImages = Callable[[list[bytes], Task], Sequence[LabelRecord]]
"""Labels images for a task, one record per image, in order (a backend's ``label``)."""

InTrainingLabeler = Callable[[Any, str, int, ImageViews | None, ImagePixels | None], LabelImages]
"""(model being trained, its base model's folder or hub id, images per forward, views, the run's image size)
-> its ``label``.

Must be picklable (a module-level function): it travels to Ray Train workers."""


class ValidationError(ReasonError):
    """A validation setting the run cannot honour; ``reason`` is a stable code."""


@dataclass(frozen=True)
class ValidationRows:
    """The validation rows of one Lance entry, found once before training: each evaluation reads only them."""

    source: LanceSource
    """The entry's ``validation`` split."""
    ids: list[str]
    """Its rows in that split with a truth in the task's set, in table order."""


@dataclass(frozen=True)
class ValidationPlan:
    """What the training process needs to validate (picklable: goes to Ray Train workers)."""

    options: ValidationOptions
    fraction: float
    """The share held back: ``options.fraction``, or less on a table past ``options.max_rows``."""
    rows: list[ValidationRows]
    datasets: list[str]
    model: str
    output_dir: str
    labeler: InTrainingLabeler
    views: ImageViews | None = None
    image_pixels: ImagePixels | None = None
    """The run's ``image_max_pixels``/``image_min_pixels``: validation images are resized as training's."""


# ------------------------------------------------------------------ planning (driver side)


def plan_validation(
    args: dict[str, Any],
    options: ValidationOptions,
    labeler: InTrainingLabeler | None,
    augment: ImageAugment | None = None,
) -> tuple[ValidationPlan, dict[str, Any]]:
    """Split each Lance training dataset of the pinned ``args`` into train and validation rows.

    Rewrites the pinned ``dataset_info.json`` (entries read ``split: train`` at
    ``val_fraction: fraction``) and returns the plan with the matching validation rows, plus what
    changed per dataset (for the lineage). ``fraction`` is ``options.fraction``, or
    ``options.max_rows`` over the datasets' rows when that is less, so an evaluation's cost stops
    growing with the table and the rest of it is trained on. ``augment`` is the run's training jitter: the
    views tried at the end jitter at half its strength.
    """
    if labeler is None:
        raise ValidationError(
            "validation_needs_labeler",
            "validation scores with the labeler's model code: train with `lancetag train`, or pass "
            "labeler=ray_jobs.evaluation.in_training.transformers_labeler to run_training",
        )
    _refuse_zero3(args.get("deepspeed"))
    dataset_dir = Path(args.get("dataset_dir", "data"))
    info = read_dataset_info(dataset_dir)
    names = dataset_names(args.get("dataset"))
    entries = {name: source for name in names if (source := lance_source_of(info.get(name, {}), name=name))}
    if not entries:
        raise ValidationError(
            "validation_needs_lance",
            f"validation splits Lance datasets by id, and none of {names} is one; "
            "register a table with `lancetag lf register` or drop the validation block",
        )
    for name, source in entries.items():
        _require_closed(source, name)
    fraction = held_back_fraction(list(entries.values()), options)
    sources, changed = [], {}
    for name, source in entries.items():
        if source.split == "validation" or (
            source.split == "train" and abs(source.val_fraction - fraction) > 1e-12
        ):
            raise ValidationError(
                "validation_split_conflict",
                f"dataset {name!r} is registered as split {source.split!r} with val_fraction "
                f"{source.val_fraction}: validation holds back fraction {fraction} of it; "
                "register it with --split all, or set validation.fraction to its val_fraction",
            )
        training = source.model_copy(update={"split": "train", "val_fraction": fraction})
        info[name]["lance"] = training.model_dump(mode="json", exclude_none=True)
        sources.append(training.model_copy(update={"split": "validation"}))
        changed[name] = {"split": "train", "val_fraction": fraction}
    rows = validation_rows(sources)
    if not any(held.ids for held in rows):  # refused from the ids, before the first step
        raise _no_validation_rows(sources)
    (dataset_dir / DATA_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    plan = ValidationPlan(
        options=options,
        fraction=fraction,
        rows=rows,
        datasets=list(changed),
        model=str(args["model_name_or_path"]),
        output_dir=str(args["output_dir"]),
        labeler=labeler,
        views=ImageViews(count=options.views, augment=augment and augment.scaled(VIEW_JITTER)) if options.views > 1 else None,
        image_pixels=trained_pixels(args),
    )
    return plan, changed


def _require_closed(source: LanceSource, name: str) -> None:
    if source.label_column is None:
        raise ValidationError(
            "validation_needs_labels",
            f"dataset {name!r} has no label column; validation scores a task's answers against it: "
            "register the table with --label-column (and --task)",
        )
    open_questions = [q.key for q in source.load_task().questions() if not q.closed]
    if open_questions:
        raise ValidationError(
            "validation_needs_closed_task",
            f"dataset {name!r}: validation accuracy needs closed-set questions, and "
            f"{', '.join(open_questions)} is free text; drop the validation block for captions",
        )


def require_validation_rows(sources: list[LanceSource]) -> None:
    """Refuse before training when no validation row has a truth in its task's set.

    Reads ids and truth columns, no images, and stops at the first such row: about
    1 / fraction rows on a table of any size.
    """
    if not any(next(_scored_ids(source, 1024), None) is not None for source in sources):
        raise _no_validation_rows(sources)


def _no_validation_rows(sources: list[LanceSource]) -> ValidationError:
    return ValidationError(
        "validation_no_rows",
        f"none of the {sum(map(_rows_kept, sources))} training rows falls in the validation share "
        f"({sources[0].val_fraction}) with a truth in the task's set, so no accuracy could be measured: "
        "add rows or raise validation.fraction",
    )


def _rows_kept(source: LanceSource) -> int:
    """Return the rows ``source``'s ``where`` keeps (counted; no column read)."""
    from lance_io.scan import count_rows, open_at

    return count_rows(open_at(source.uri, source.ref(), storage_options=source.storage_options()), source.where)


def held_back_fraction(sources: list[LanceSource], options: ValidationOptions) -> float:
    """Return the share of ids validation holds back: ``options.fraction``, at most ``max_rows`` of the sources' rows.

    Counts the rows each source's ``where`` keeps: on a table of ten million rows, 10% would be a
    million rows scored at every evaluation and never trained on.
    """
    rows = sum(map(_rows_kept, sources))
    return min(options.fraction, options.max_rows / rows) if rows else options.fraction


def validation_rows(sources: list[LanceSource]) -> list[ValidationRows]:
    """Return the ids of each validation source's rows that have a truth in its task's set.

    Reads the id and truth columns of every row once (no image); each evaluation then reads the
    images of these rows only (:func:`scored_rows`).
    """
    return [ValidationRows(source, list(_scored_ids(source, 4096))) for source in sources]


def _scored_ids(source: LanceSource, batch_size: int) -> Iterator[str]:
    """Yield the ids of ``source``'s split rows with a truth in its task's set, in table order, lazily."""
    task = source.load_task()
    truths = answer_columns(task, source.label_column or "")
    allowed = {q.key: _truth_set(q.values) for q in task.questions()}
    for batch, keep in split_batches(source, list(truths.values()), batch_size):
        columns = {key: batch.column(col).to_pylist() for key, col in truths.items()}
        row_ids = batch.column(source.id_column).to_pylist()
        yield from (str(row_ids[i]) for i in keep if any(_scored(columns[k][i], allowed[k]) for k in truths))


def _truth_set(values: Any) -> set[str]:
    return {str(v) for v in values or ()}


def _scored(truth: Any, allowed: set[str]) -> bool:
    """Return whether a row's truth for a question counts in the accuracy (rows training skips do not)."""
    return truth is not None and str(truth) in allowed


def _refuse_zero3(deepspeed: Any) -> None:
    """Validation copies the trainable weights on rank 0, which ZeRO-3 has partitioned across ranks."""
    if not isinstance(deepspeed, str) or not Path(deepspeed).is_file():
        return
    stage = json.loads(Path(deepspeed).read_text()).get("zero_optimization", {}).get("stage")
    if stage == 3:
        raise ValidationError(
            "validation_with_zero3",
            f"{deepspeed} partitions weights (ZeRO stage 3), which validation cannot copy on rank 0; "
            "use ZeRO stage 2 or drop the validation block",
        )


def validation_sources(dataset_dir: str | Path, names: list[str], fraction: float) -> list[LanceSource]:
    """Return the ``validation`` sources of the named Lance entries (e.g. of a run's pinned copy)."""
    info = read_dataset_info(dataset_dir)
    out = []
    for name in names:
        source = lance_source_of(info[name], name=name)
        if source is not None:
            out.append(source.model_copy(update={"split": "validation", "val_fraction": fraction}))
    return out


# ------------------------------------------------------------------ scoring


def split_batches(source: LanceSource, columns: list[str], batch_size: int) -> Iterator[tuple[Any, Iterator[int]]]:
    """Yield (record batch of the id and ``columns``, indices of its rows in ``source``'s split).

    The indices come lazily (each id hashed as it is reached), so a caller may stop at the first.
    """
    from lance_io.scan import open_at, require_columns, scan_batches

    ds = open_at(source.uri, source.ref(), storage_options=source.storage_options())
    columns = [source.id_column, *columns]
    require_columns(ds, columns, uri=source.uri)
    for batch in scan_batches(ds, columns, where=source.where, batch_size=batch_size):
        ids = batch.column(source.id_column).to_pylist()
        yield batch, (i for i, row_id in enumerate(ids) if source.keeps(str(row_id)))


def rows_by_id(source: LanceSource, ids: Sequence[str], columns: list[str], *, with_row_address: bool = False) -> Iterator[Any]:
    """Yield ``columns`` of ``source``'s rows whose id is in ``ids`` (its version and ``where``), a lookup at a time."""
    from lance_io.scan import open_at, require_columns, rows_with_ids

    ds = open_at(source.uri, source.ref(), storage_options=source.storage_options())
    require_columns(ds, columns, uri=source.uri)
    yield from rows_with_ids(ds, ids, columns, where=source.where, with_row_address=with_row_address,
                             id_column=source.id_column)


@dataclass(frozen=True)
class ScoredRow:
    """One validation row as a labeler answered it."""

    right: int
    counted: int
    """Its questions with a truth in the task's set (the ones scored)."""
    values: tuple[Any, ...]
    """The answers, one per question (None where the image got no answer)."""
    confidence: float | None
    """The probability of its least confident answer (None: unknown, or no answer)."""


def scored_rows(label: LabelImages, rows: list[ValidationRows], *, batch_size: int = 16) -> Iterator[ScoredRow]:
    """Yield each validation row as ``label`` answers it, in the order of ``rows``' ids.

    Only these rows' images are read (looked up by id). Every closed question of a row with a
    truth value in the task's set counts once; an image the backend could not answer counts as
    wrong, as in ``lancetag eval``.
    """
    for held in rows:
        source, task = held.source, held.source.load_task()
        allowed = {q.key: _truth_set(q.values) for q in task.questions()}
        truth_columns = answer_columns(task, source.label_column or "")
        predicted_columns = answer_columns(task, "predicted")
        for part in rows_by_id(source, held.ids, [source.image_column, *truth_columns.values()]):
            for start in range(0, part.num_rows, batch_size):
                chunk = part.slice(start, batch_size)
                truths = {key: chunk.column(col).to_pylist() for key, col in truth_columns.items()}
                records = label(chunk.column(source.image_column).to_pylist(), task)
                batch = results_to_batch(records, task, "predicted")
                predicted = {key: batch.column(predicted_columns[key]).to_pylist() for key in truths}
                for n, record in enumerate(records):
                    right = counted = 0
                    for key, truth in truths.items():
                        want, got = truth[n], predicted[key][n]
                        if not _scored(want, allowed[key]):
                            continue  # rows training skips too (label_missing, label_not_in_task)
                        counted += 1
                        right += got is not None and str(got) == str(want)
                    yield ScoredRow(right, counted, tuple(predicted[key][n] for key in truths), _least_confidence(record))


def _least_confidence(record: LabelRecord) -> float | None:
    each = getattr(record, "attribute_confidence", None)  # per attribute, where a record has them
    if record.confidence is None:
        return None
    return min(each.values()) if each else record.confidence


def validation_accuracy(label: LabelImages, sources: list[LanceSource], *, batch_size: int = 16) -> tuple[float, int]:
    """Return (share of validation answers matching the truth, validation rows) as ``label`` answers them."""
    held = validation_rows(sources)
    return _accuracy(list(scored_rows(label, held, batch_size=batch_size)), held)


def _accuracy(scored: list[ScoredRow], rows: list[ValidationRows]) -> tuple[float, int]:
    total = sum(r.counted for r in scored)
    if total == 0:
        names = ", ".join(r.source.uri for r in rows)
        raise ValidationError(
            "validation_no_rows",
            f"no validation rows with a truth in the task's set in {names}; raise validation.fraction",
        )
    return sum(r.right for r in scored) / total, len(scored)


# ------------------------------------------------------------------ during training


class Validator:
    """Decides when to evaluate, keeps the best weights and the curve, and says when to stop.

    One per training process; only the world's rank 0 (``is_main``) loads a processor, scores and
    copies weights. Every rank calls :meth:`agree` at the same points, so a stop reaches all.
    """

    def __init__(self, plan: ValidationPlan, *, is_main: bool) -> None:
        self.plan = plan
        self.is_main = is_main
        self.curve = Curve(fraction=plan.fraction, rows=0)
        self.best_weights: dict[str, Any] | None = None
        self.best_rows: list[ScoredRow] = []  # the kept evaluation's answers, the image alone
        self.pending = False
        self.last_log: tuple[int, float] | None = None  # (step, loss) of the latest training log
        self._label: LabelImages | None = None

    def due_after_step(self, step: int) -> bool:
        """Return whether an evaluation falls on optimizer step ``step``."""
        every = self.plan.options.every_steps
        return every is not None and step % every == 0

    def due_after_epoch(self, epoch: float) -> bool:
        """Return whether an evaluation falls at the end of the epoch that ends at ``epoch``."""
        every = self.plan.options.every_epochs
        return every is not None and round(epoch) % every == 0

    def evaluate(self, model: Any, step: int, epoch: float, train_loss: float | None, *, final: bool = False) -> bool:
        """Score ``model`` (rank 0), record the point, keep its weights if best; return whether to stop.

        ``final``: the end of training, where no other rank waits for a decision.
        """
        stop = False
        if self.is_main:
            started = time.perf_counter()
            scored = self._score(model)
            accuracy, rows = _accuracy(scored, self.plan.rows)
            point = CurvePoint(step, round(epoch, 4), accuracy, train_loss, round(time.perf_counter() - started, 2))
            self.curve.rows = rows
            if self.curve.add(point, self.plan.options.tolerance):
                self.best_rows = scored
                self.best_weights = {
                    name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad
                }
            patience = self.plan.options.patience
            stop = not final and patience is not None and self.curve.since_kept() >= patience
            self.curve.stopped_early = stop
            self.write()
            logger.info("validation at step %d (epoch %.2f): accuracy %.4f%s", step, epoch, accuracy,
                        " -> stopping" if stop else "")
        return stop if final else self.agree(stop, model)

    def agree(self, stop: bool, model: Any) -> bool:
        """Return rank 0's ``stop`` on every rank (a broadcast when a process group is running)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return stop
        flag = torch.tensor([int(stop)], device=next(model.parameters()).device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def restore_best(self, model: Any) -> None:
        """Put the best evaluation's trainable weights back into ``model`` (rank 0, which saves)."""
        import torch

        if not self.is_main or self.best_weights is None:
            return
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.best_weights:
                    p.copy_(self.best_weights[name].to(p.device))
        logger.info("validation: kept the weights of step %d (accuracy %.4f)",
                    self.curve.best.step, self.curve.best.validation_accuracy)  # type: ignore[union-attr]

    def choose_views(self, model: Any) -> None:
        """Score the kept weights (in ``model``) on the plan's views; keep the views if they score higher (rank 0).

        Kept views are asked only of the images they help: those whose least confident answer from
        the image alone is at most the highest such confidence among the validation rows whose
        answers the views changed (``unsure_at``). On the validation rows that is the views'
        accuracy exactly, at a fraction of the cost.
        """
        views, best = self.plan.views, self.curve.best
        if not self.is_main or views is None or best is None:
            return
        batch_size, rows = self.plan.options.batch_size, self.plan.rows
        rows_alone = self.best_rows  # the kept weights' answers from the image alone, scored when kept
        viewed = self.plan.labeler(model, self.plan.model, batch_size, views, self.plan.image_pixels)
        was_training = model.training
        model.eval()
        try:
            rows_viewed = list(scored_rows(viewed, rows, batch_size=batch_size))
        finally:
            model.train(was_training)
        accuracy, single = _accuracy(rows_viewed, rows)[0], best.validation_accuracy
        changed = [a.confidence for a, v in zip(rows_alone, rows_viewed, strict=True) if a.values != v.values]
        unsure_at = None if not changed or None in changed else max(changed)  # type: ignore[type-var]
        kept = views.model_copy(update={"unsure_at": unsure_at})
        unsure = sum(kept.unsure([a.confidence]) for a in rows_alone) / max(len(rows_alone), 1)
        chosen = accuracy > single
        self.curve.views = {"count": views.count, "accuracy": accuracy, "single_accuracy": single,
                            "chosen": chosen, "unsure_at": unsure_at, "unsure_share": round(unsure, 4)}
        if chosen:
            write_views(self.plan.output_dir, kept)
        self.write()
        logger.info("validation: %d views of each image score %.4f against %.4f for the image alone%s",
                    views.count, accuracy, single, " -> the labeler uses them" if chosen else "")

    def write(self) -> Path:
        """Write the curve so far to ``<output_dir>/lancetag_validation.json``; return its path."""
        path = Path(self.plan.output_dir) / CURVE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.curve.as_dict(), indent=2) + "\n")
        return path

    def _score(self, model: Any) -> list[ScoredRow]:
        batch_size = self.plan.options.batch_size
        if self._label is None:  # the trainer keeps one model object for the whole run
            self._label = self.plan.labeler(model, self.plan.model, batch_size, None, self.plan.image_pixels)
        was_training = model.training
        model.eval()
        try:
            return list(scored_rows(self._label, self.plan.rows, batch_size=batch_size))
        finally:
            model.train(was_training)


def validation_callback(plan: ValidationPlan) -> Any:
    """Return the ``TrainerCallback`` that validates ``plan`` in this training process."""
    from transformers import TrainerCallback

    class ValidationCallback(TrainerCallback):
        """Evaluates at the plan's points, with the train loss HF logs there, and stops on a plateau.

        An evaluation point asks the trainer to log (``should_log``), and the evaluation runs in
        the ``on_log`` that follows, so the curve's train loss is the mean since the previous log.
        """

        validator: Validator | None = None

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.validator = Validator(plan, is_main=state.is_world_process_zero)

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if self.validator.due_after_step(state.global_step):
                self._at_point(state, control, kwargs["model"])

        def on_epoch_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if self.validator.due_after_epoch(state.epoch):
                self._at_point(state, control, kwargs["model"])

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if logs and "loss" in logs:
                self.validator.last_log = (state.global_step, float(logs["loss"]))
                if self.validator.pending:
                    self.validator.pending = False
                    self._evaluate(state, control, kwargs["model"], float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            validator, model = self.validator, kwargs["model"]
            points = validator.curve.points
            if validator.is_main and not validator.curve.stopped_early and (
                not points or points[-1].step != state.global_step
            ):  # steps after the last evaluation point count too
                last = validator.last_log
                loss = last[1] if last is not None and last[0] == state.global_step else None
                validator.evaluate(model, state.global_step, state.epoch or 0.0, loss, final=True)
            validator.restore_best(model)
            validator.choose_views(model)

        def _at_point(self, state, control, model):  # type: ignore[no-untyped-def]
            last = self.validator.last_log
            if last is not None and last[0] == state.global_step:  # already logged at this step
                self._evaluate(state, control, model, last[1])
            else:
                self.validator.pending = True
                control.should_log = True

        def _evaluate(self, state, control, model, loss):  # type: ignore[no-untyped-def]
            end = state.global_step >= state.max_steps  # the last step: a plateau here stops nothing early
            if self.validator.evaluate(model, state.global_step, state.epoch or 0.0, loss, final=end):
                control.should_training_stop = True

    return ValidationCallback()


def read_curve(output_dir: str | Path) -> dict[str, Any] | None:
    """Return the validation record a run wrote into ``output_dir``, or None."""
    path = Path(output_dir) / CURVE_FILE
    return json.loads(path.read_text()) if path.is_file() else None

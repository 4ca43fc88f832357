"""Warm a vision tower trained from scratch: classify the training images with it before the model learns to answer.

A randomly initialised vision tower learns slowly inside a vision-language model: its only
gradient comes back through the language model's attention, which is learning too. Trained first
as a plain classifier (its image features, mean-pooled, into one linear layer; cross-entropy on the
task's labels), on the same training rows, the same augmentation and the same image size, it
reaches in seconds what the whole model reaches in many epochs; LLaMA-Factory then fine-tunes the
whole model from the warmed tower (docs/training.md, "Warming a vision tower trained from scratch").
Configured in the ``lancetag:`` block of a training YAML::

    lancetag:
      vision_warmup: {epochs: 15}

Only for a full fine-tune (``finetuning_type: full``): the output folder then holds the whole
model, warmed tower included. A LoRA adapter would need the warmed base beside it, and a
pretrained tower needs no warming. The training rows are the run's Lance datasets (the ``train``
side of validation's split: validation rows are never seen), read with the label column of a
one-question closed task (classify). The warmed model goes to ``<output_dir>/lancetag_warm_start``
and the run trains from it; the lineage records the warm-up.

The loss also follows a classical teacher (``teacher_weight``, 0.3 by default): each training
image's class probabilities from an RBF SVM on its pixels fitted on the other folds
(``llamafactory_ext.pixel_teacher``), which gets other images wrong than the tower does.
"""

from __future__ import annotations

import heapq
import io
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lance_io.augment import ImageAugment
from lance_io.labels import answer_columns
from lance_io.reasons import ReasonError
from lance_io.splits import id_bucket
from llamafactory_ext.image_fit import trained_pixels, training_fit
from llamafactory_ext.pixel_teacher import teacher_probabilities
from llamafactory_ext.source import LanceSource, dataset_names, lance_source_of, read_dataset_info
from llamafactory_ext.validation import rows_by_id, split_batches

WARM_START_DIR = "lancetag_warm_start"
MAX_ROWS = 20_000
"""At most this many training rows warm the tower (the lowest by id hash): it is for a tower learning from
scratch. Their images are held in memory for the warm-up's epochs."""


class VisionWarmupError(ReasonError):
    """A warm-up the run cannot do; ``reason`` is a stable code."""


class VisionWarmup(BaseModel):
    """The ``vision_warmup:`` entry of the ``lancetag:`` block."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(ge=1, description="Passes over the training rows")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW, on a cosine to 0")
    batch_size: int = Field(32, ge=1)
    teacher_weight: float = Field(
        0.3, ge=0, lt=1, description="Share of the loss that follows a pixel SVM's probabilities (0: the labels alone)"
    )


def warm_vision_tower(
    args: dict[str, Any], warmup: VisionWarmup, augment: ImageAugment | None
) -> tuple[str, dict[str, Any]]:
    """Train ``args``' model's vision tower as a classifier of the run's training rows; save the model.

    Returns the folder of the warmed model (train from it) and the record for the lineage.
    """
    import torch
    from llamafactory.data.template import TEMPLATES
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llamafactory_ext.augment import install

    if args.get("finetuning_type", "lora") != "full":
        raise VisionWarmupError(
            "vision_warmup_needs_full_finetune",
            "vision_warmup warms a tower trained from scratch and needs finetuning_type: full "
            "(a LoRA adapter would need the warmed base beside it); drop the vision_warmup entry",
        )
    started = time.perf_counter()
    plugin = TEMPLATES[args["template"]].mm_plugin
    pixels = trained_pixels(args)  # the run's image_max_pixels/image_min_pixels, LLaMA-Factory's defaults where unset
    # each image held at its training size (decoded once), or as its file when that is smaller
    images, labels, classes, total = _training_rows(args, fit=training_fit(args["template"], pixels.max, pixels.min))
    seed = int(args.get("seed", 42))
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model_path = str(args["model_name_or_path"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).to(device)
    processor = AutoProcessor.from_pretrained(model_path)
    processor.image_max_pixels, processor.image_min_pixels = pixels.max, pixels.min  # as LLaMA-Factory sets them
    hidden = model.config.get_text_config().hidden_size
    head = torch.nn.Linear(hidden, len(classes)).to(device)
    # every weight is offered; only those the image features depend on get a gradient, and AdamW
    # leaves a weight without one as it is (the language model)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=warmup.learning_rate, weight_decay=0.0)
    steps = warmup.epochs * math.ceil(len(images) / warmup.batch_size)
    target = torch.tensor(labels, device=device)
    taught = teacher_probabilities(images, labels, len(classes), seed=seed) if warmup.teacher_weight else None
    teacher = torch.tensor(taught[0], device=device) if taught else None
    accuracy, step = 0.0, 0
    model.train()
    install(augment)  # the run's jitter, through LLaMA-Factory's own image path
    try:
        for _ in range(warmup.epochs):
            order = list(range(len(images)))
            rng.shuffle(order)
            right = 0
            for start in range(0, len(order), warmup.batch_size):
                batch = order[start : start + warmup.batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = warmup.learning_rate * 0.5 * (1 + math.cos(math.pi * step / steps))
                pil = [Image.open(io.BytesIO(images[i])) for i in batch]  # the plugin converts, as in training
                inputs = plugin._get_mm_inputs(pil, [], [], processor)
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                features = model.get_image_features(**inputs).pooler_output
                logits = head(torch.stack([f.mean(0) for f in features]))
                loss = torch.nn.functional.cross_entropy(logits, target[batch])
                if teacher is not None:  # the labels and the teacher's probabilities, by its weight
                    follow = torch.nn.functional.kl_div(logits.log_softmax(1), teacher[batch], reduction="batchmean")
                    loss = (1 - warmup.teacher_weight) * loss + warmup.teacher_weight * follow
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                right += int((logits.argmax(1) == target[batch]).sum())
            accuracy = right / len(images)
    finally:
        install(None)
    out = Path(args["output_dir"]) / WARM_START_DIR
    model.to("cpu").save_pretrained(out)
    processor.save_pretrained(out)
    record = {
        **warmup.model_dump(),
        "from": model_path,
        "to": str(out),
        "rows": len(images),
        "training_rows": total,
        "classes": classes,
        "last_epoch_train_accuracy": round(accuracy, 4),
        "teacher": taught[1] if taught else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return str(out), record


def _training_rows(
    args: dict[str, Any], fit: Callable[[bytes], bytes] = bytes
) -> tuple[list[bytes], list[int], list[str], int]:
    """Return (image bytes, class index, classes, training rows) of the run's Lance datasets.

    At most ``MAX_ROWS`` rows, the lowest by id hash: they are chosen from the ids and labels alone
    (at most ``MAX_ROWS`` held at a time), then only their images are read, each passed through
    ``fit`` as it is read, so neither memory nor image reads grow with the table.
    """
    info = read_dataset_info(args.get("dataset_dir", "data"))
    names = dataset_names(args.get("dataset"))
    sources = [s for name in names if (s := lance_source_of(info.get(name, {}), name=name)) is not None]
    if not sources:
        raise VisionWarmupError(
            "vision_warmup_needs_lance", f"vision_warmup reads labeled Lance datasets, and none of {names} is one"
        )
    classes = _classes(sources)
    seen: Counter[str] = Counter()
    truth_columns = [_truth_column(source) for source in sources]
    chosen = heapq.nsmallest(MAX_ROWS, _ranked_ids(sources, truth_columns, classes, seen))
    if seen.total() == 0 or len(seen) < 2:
        raise VisionWarmupError(
            "vision_warmup_needs_labels", "vision_warmup needs training rows of at least two classes"
        )
    rows: list[tuple[float, int, int, bytes, int]] = []
    for n, (source, column) in enumerate(zip(sources, truth_columns, strict=True)):
        ids = [row_id for _, m, row_id in chosen if m == n]
        rows.extend((*key, fit(image), label) for *key, image, label in _rows_of(source, column, n, ids, classes))
    rows = sorted(rows, key=lambda r: r[:3])[:MAX_ROWS]  # hash, then table order: as the rows were scanned
    return [r[3] for r in rows], [r[4] for r in rows], classes, seen.total()


def _ranked_ids(
    sources: Sequence[LanceSource], truth_columns: list[str], classes: list[str], seen: Counter[str]
) -> Iterator[tuple[float, int, str]]:
    """Yield (id hash, source index, id) of each labeled training row, counting its class in ``seen``."""
    for n, (source, column) in enumerate(zip(sources, truth_columns, strict=True)):
        for batch, kept in split_batches(source, [column], 4096):
            ids, truths = batch.column(source.id_column).to_pylist(), batch.column(column).to_pylist()
            for i in kept:
                if truths[i] is not None and str(truths[i]) in classes:
                    seen[str(truths[i])] += 1
                    yield id_bucket(str(ids[i]), "vision_warmup"), n, str(ids[i])


def _rows_of(
    source: LanceSource, truth_column: str, n: int, ids: list[str], classes: list[str]
) -> Iterator[tuple[float, int, int, bytes, int]]:
    """Yield (id hash, ``n``, row address, image bytes, class index) of ``source``'s rows with ``ids``."""
    columns = [source.id_column, source.image_column, truth_column]
    for part in rows_by_id(source, ids, columns, with_row_address=True):
        for row_id, image, t, address in zip(*(part.column(c).to_pylist() for c in [*columns, "_rowaddr"]), strict=True):
            if image and t is not None and str(t) in classes and source.keeps(str(row_id)):
                yield id_bucket(str(row_id), "vision_warmup"), n, address, image, classes.index(str(t))


def _truth_column(source: LanceSource) -> str:
    """Return the column holding the truth of ``source``'s one question."""
    task = source.load_task()
    return answer_columns(task, source.label_column or "")[task.questions()[0].key]


def _classes(sources: Sequence[LanceSource]) -> list[str]:
    """Return the classes of the sources' one closed question (all must ask the same)."""
    found: list[str] | None = None
    for source in sources:
        if source.label_column is None:
            raise VisionWarmupError(
                "vision_warmup_needs_labels", f"{source.uri} has no label column: register it with --label-column"
            )
        questions = source.load_task().questions()
        if len(questions) != 1 or not questions[0].closed:
            raise VisionWarmupError(
                "vision_warmup_needs_classify",
                f"vision_warmup trains a classifier: {source.uri}'s task must ask one closed question (classify)",
            )
        values = [str(v) for v in questions[0].values or ()]
        if found is not None and values != found:
            raise VisionWarmupError("vision_warmup_needs_classify", "the run's datasets ask different label sets")
        found = values
    return found or []

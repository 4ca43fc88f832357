"""The training recipe chosen from the data: image side (visual tokens), augmentation, epochs, validation.

A recipe tuned by hand on one image set (the demo's digits) is wrong for another: digits need 4
visual tokens and must never be mirrored, photos of objects may be mirrored, a 300x300 photo loses
its detail at 56x56. ``choose_recipe`` looks at the training rows (never the held-out ones) and
decides each setting by a rule written here and in docs/training.md ("The recipe chosen from the
data"):

- **Image side** (``SIDES``: 56, 84, 112 pixels = 4, 9, 16 visual tokens for Qwen2-VL's 28-pixel
  merged patches): the smallest side at which the median training image keeps ``DETAIL_KEPT`` of
  its grey-level variance (area-downsample to the side and back, at up to 224 pixels); never more
  than the images' own median size (upscaling adds no detail).
- **Augmentation**: the small affine jitter (rotation, zoom, shift), filling the uncovered area with
  the median grey of the images' borders (black for digits, white for clip art) so it draws no new
  edges, only if it helps a learner of these pixels: an RBF SVM on 16x16 thumbnails, cross-validated
  over ``FOLDS`` folds of the training rows, is fitted on the images as they are and again
  with a jittered copy of each beside them; if the copies lower its accuracy, no jitter. A model
  trained from scratch memorises the pixels of a small set without the jitter (digits, clip art:
  the copies raise the SVM's accuracy); where the images are already aligned, the jitter only adds
  variance a small model must absorb (solar cells: the copies lower it). A mirror flip only if it
  keeps the classes: a logistic regression on 8x8 thumbnails, cross-validated over the same folds,
  scores each image as it is and mirrored. A mirror keeps every pixel statistic but orientation,
  so if it costs that classifier more than ``SKILL_LOST`` of its accuracy above chance (1 /
  classes), and more than chance would (a sign test on the images the mirror changes, below
  ``SIGNIFICANCE``), orientation carries meaning (a mirrored 2 is not a 2) and there is no flip. A
  classifier of a hundred photos that memorised where things sit loses some accuracy mirrored
  too, by chance: the test keeps the mirror for them.
- **Epochs**: about ``STEP_BUDGET`` optimizer steps (batch ``BATCH``), within ``EPOCHS``; a small
  set gets more passes over it. The validation curve then decides: ``validation`` holds back up to
  ``VALIDATION_ROWS`` rows, scores about ``EVALUATIONS`` times, keeps the best weights (a later
  evaluation within ``TOLERANCE`` standard error of the best accuracy replaces it: about 100 rows
  cannot tell such points apart, and with a cosine schedule the later weights have trained
  longer) and stops after ``PATIENCE`` evaluations in a row that fall below that: on a curve
  flat within its noise the run trains to the end of its schedule.
- **Vision warm-up** (a model whose vision tower starts from random weights, the demo's tiny
  model): before the fine-tune, the tower is trained as a plain classifier of the same training
  rows, for as many epochs as the fine-tune (``llamafactory_ext.vision_warmup``), and the fine-tune
  then keeps it as warmed (``freeze_vision_tower``; the projector into the language model still
  trains): accuracy within the runs' spread on every set measured, and the fine-tune no longer
  pays for the tower's backward pass (docs/training.md, "Warming a vision tower trained from scratch").
- **Views at labeling time**: at the end the kept weights are scored on ``VIEWS`` views of each
  validation image (the image and fixed jitters at half the training jitter, or mirrors where there
  is no jitter, averaged; one view where there is neither); the labeler
  asks the model that way only if the views answer more validation rows correctly than the image
  alone, and then only of the images whose answer alone is as unsure as one the views changed on
  validation (``llamafactory_ext.validation``).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import random
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from lance_io.augment import ImageAugment, augment_image, border_grey
from lance_io.image_size import decode_upright, thumbnail
from lance_io.reasons import ReasonError

SIDES = (56, 84, 112)
DETAIL_KEPT = 0.975
DETAIL_REFERENCE = 224
THUMBNAIL = 8
SKILL_LOST = 0.25
SIGNIFICANCE = 0.05
JITTER_THUMBNAIL = 16
FOLDS = 4
JITTER = ImageAugment(rotate_degrees=10, scale=0.1, shift=0.08)
STEP_BUDGET = 670  # the digits recipe's steps (15 epochs of 1,423 rows at batch 32), docs/training.md §7
BATCH = 32
EPOCHS = (5, 40)
VALIDATION_ROWS = 100
EVALUATIONS = 5
PATIENCE = 2
TOLERANCE = 1.0  # standard errors of the validation accuracy
VIEWS = 8
MAX_PROFILE_ROWS = 2000
SALT = "recipe"


class RecipeError(ReasonError):
    """Training rows no recipe can be chosen from; ``reason`` is a stable code."""


@dataclass
class Recipe:
    """The settings chosen for one training set, and the measurements behind each."""

    side: int
    visual_tokens: int
    flip: bool
    jitter: bool
    fill: int
    epochs: int
    validation: dict[str, Any]
    evidence: dict[str, Any] = field(default_factory=dict)

    def augment(self) -> ImageAugment:
        """Return the augmentation the recipe uses."""
        return (JITTER if self.jitter else ImageAugment()).model_copy(
            update={"flip": self.flip, "fill": self.fill}
        )

    def overrides(self) -> dict[str, Any]:
        """Return the LLaMA-Factory keys and the ``lancetag:`` block this recipe sets.

        ``num_train_epochs``, ``vision_warmup`` and ``freeze_vision_tower`` are rules for a model
        trained from scratch.
        """
        augment = self.augment()
        lancetag: dict[str, Any] = {"validation": dict(self.validation)}
        lancetag["augment"] = augment.model_dump()
        lancetag["vision_warmup"] = {"epochs": self.epochs}
        pixels = self.side * self.side
        return {
            "num_train_epochs": self.epochs,
            "freeze_vision_tower": True,
            "image_max_pixels": pixels,
            "image_min_pixels": pixels,
            "lancetag": lancetag,
        }

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


def _bucket(row_id: str) -> float:
    return int(hashlib.sha256(f"{SALT}:{row_id}".encode()).hexdigest()[:12], 16) / 16**12


def _profile_rank(row_id: str) -> float:
    """A row's place in the order rows enter the profile: a hash of its own, not the folds' (``_bucket``).

    With the folds' own hash, the rows kept from a big table would all have the lowest buckets, so
    all one fold: nothing left to score the mirror and the jitter on.
    """
    return _bucket(f"profile:{row_id}")


def _decode(data: bytes) -> tuple[Image.Image, tuple[int, int]] | None:
    """Return the image in RGB, upright (its EXIF orientation applied, as in training), at a shorter side of
    DETAIL_REFERENCE to twice that, and its size as stored.

    The rules look at nothing finer than DETAIL_REFERENCE pixels, so a bigger image is decoded
    smaller (a JPEG at 1/2, 1/4 or 1/8 of its scale) and reduced by a whole factor (an area
    average): 2,000 photos of 12 MP would hold 72 GB decoded whole.
    """
    try:
        rgb, size = decode_upright(data, DETAIL_REFERENCE)
    except Exception:  # an undecodable image tells nothing about the set
        return None
    factor = min(rgb.size) // DETAIL_REFERENCE
    return (rgb.reduce(factor) if factor > 1 else rgb), size


def detail_kept(image: Image.Image, side: int) -> float:
    """Return the share of ``image``'s grey-level variance an area-downsample to ``side`` keeps."""
    grey = image.convert("L")
    reference_side = max(side, min(DETAIL_REFERENCE, max(image.size)))
    if reference_side <= side:
        return 1.0
    reference = np.asarray(grey.resize((reference_side,) * 2, Image.Resampling.BOX), dtype=np.float32)
    small = grey.resize((side, side), Image.Resampling.BOX).resize(
        (reference_side,) * 2, Image.Resampling.BILINEAR
    )
    variance = float(((reference - reference.mean()) ** 2).sum())
    if variance == 0:
        return 1.0
    return 1.0 - float(((reference - np.asarray(small, dtype=np.float32)) ** 2).sum()) / variance


def choose_side(images: Sequence[Image.Image], sizes: Sequence[tuple[int, int]]) -> tuple[int, dict[str, Any]]:
    """Return (image side, evidence): the smallest of SIDES keeping DETAIL_KEPT of the median image.

    ``sizes``: the images' sizes as stored (``images`` may be decoded smaller); no side exceeds the median.
    """
    median_size = statistics.median(max(size) for size in sizes)
    kept = {side: round(statistics.median(detail_kept(image, side) for image in images), 4) for side in SIDES}
    cap = max([s for s in SIDES if s <= max(median_size, SIDES[0])] or [SIDES[0]])
    side = next((s for s in SIDES if kept[s] >= DETAIL_KEPT), SIDES[-1])
    side = min(side, cap)
    return side, {"median_size": median_size, "detail_kept": kept, "side_cap": cap}


def _thumbnails(images: Sequence[Image.Image], side: int = THUMBNAIL) -> np.ndarray:
    return np.stack([thumbnail(image, side) for image in images])


def flip_check(images: Sequence[Image.Image], labels: Sequence[str], folds: Sequence[int]) -> dict[str, float]:
    """Return a pixel classifier's cross-validated accuracy on ``images`` as they are and mirrored.

    Each fold (``folds[i]`` is image ``i``'s) is scored by a logistic regression fitted on the other
    folds. Also returned: the share of its skill above chance the mirror loses, and ``p_value``, the
    chance of the mirror losing at least that many of the images it changes if it changed nothing
    (a one-sided sign test).
    """
    from scipy.stats import binomtest
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    plain, mirrored = _thumbnails(images), _thumbnails([ImageOps.mirror(i) for i in images])
    truth, fold = np.asarray(labels), np.asarray(folds)
    right = np.zeros(len(truth), dtype=bool)
    right_mirrored = np.zeros(len(truth), dtype=bool)
    scored = np.zeros(len(truth), dtype=bool)
    for k in np.unique(fold):
        fit, held = fold != k, fold == k
        if len(np.unique(truth[fit])) < 2:  # a class only this fold holds: nothing to fit
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(plain[fit], truth[fit])
        right[held] = model.predict(plain[held]) == truth[held]
        right_mirrored[held] = model.predict(mirrored[held]) == truth[held]
        scored |= held
    count = max(int(scored.sum()), 1)
    accuracy, accuracy_mirrored = right.sum() / count, right_mirrored.sum() / count
    skill = accuracy - 1.0 / len(set(labels))
    lost = (accuracy - accuracy_mirrored) / skill if skill > 0 else 0.0
    only_plain, only_mirrored = int((right & ~right_mirrored).sum()), int((right_mirrored & ~right).sum())
    changed = only_plain + only_mirrored
    p_value = binomtest(only_plain, changed, 0.5, alternative="greater").pvalue if changed else 1.0
    return {"accuracy": round(float(accuracy), 4), "mirrored": round(float(accuracy_mirrored), 4),
            "skill_lost": round(float(lost), 4), "p_value": float(f"{p_value:.3g}")}


def jitter_check(
    images: Sequence[Image.Image], labels: Sequence[str], folds: Sequence[int], fill: int
) -> dict[str, float]:
    """Return an RBF SVM's cross-validated accuracy fitted on ``images``, and with a jittered copy of each beside them.

    Each fold (``folds[i]`` is image ``i``'s) is scored once, by the SVM fitted on the other folds;
    the accuracies are over every image.
    """
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    rng = random.Random(SALT)
    jitter = JITTER.model_copy(update={"fill": fill})
    plain = _thumbnails(images, JITTER_THUMBNAIL)
    copies = _thumbnails([augment_image(image, jitter, rng) for image in images], JITTER_THUMBNAIL)
    truth, fold = np.asarray(labels), np.asarray(folds)
    right, scored, used = {"accuracy": 0, "with_jittered_copies": 0}, 0, 0
    for k in np.unique(fold):
        fit, held = fold != k, fold == k
        if len(np.unique(truth[fit])) < 2:  # a class only this fold holds: nothing to fit
            continue
        for name, features, targets in (
            ("accuracy", plain[fit], truth[fit]),
            ("with_jittered_copies", np.vstack([plain[fit], copies[fit]]), np.concatenate([truth[fit]] * 2)),
        ):
            model = make_pipeline(StandardScaler(), SVC(kernel="rbf")).fit(features, targets)
            right[name] += int(np.sum(model.predict(plain[held]) == truth[held]))
        scored, used = scored + int(held.sum()), used + 1
    return {name: round(count / max(scored, 1), 4) for name, count in right.items()} | {"folds": used}


def choose_epochs(rows: int) -> tuple[int, dict[str, Any]]:
    """Return (maximum epochs, validation block) for ``rows`` training rows."""
    steps_per_epoch = math.ceil(rows / BATCH)
    epochs = min(max(round(STEP_BUDGET / steps_per_epoch), EPOCHS[0]), EPOCHS[1])
    validation = {
        "fraction": round(min(0.1, VALIDATION_ROWS / rows), 4),
        "every_epochs": max(1, round(epochs / EVALUATIONS)),
        "patience": PATIENCE,
        "tolerance": TOLERANCE,
        "views": VIEWS,
    }
    return epochs, validation


def profiled_ids(ids: Iterable[str]) -> list[str]:
    """Return the training ids :func:`choose_recipe` profiles, in its order: all of them, or MAX_PROFILE_ROWS chosen by id hash.

    ``ids`` may be a stream (a table's id column, batch by batch): no more than MAX_PROFILE_ROWS are
    held. A caller holding a big table reads the images of these ids alone, passes them in this order
    with ``rows=`` the number of training rows: the recipe is the one all the rows would give.
    """
    return heapq.nsmallest(MAX_PROFILE_ROWS, (str(i) for i in ids), key=_profile_rank)


def choose_recipe(
    ids: Sequence[str], images: Sequence[bytes], labels: Sequence[str], *, rows: int | None = None
) -> Recipe:
    """Return the recipe for training rows (``ids``, image bytes, truth labels) by the module's rules.

    ``rows``: how many training rows there are, when the ones given are :func:`profiled_ids` of them
    (the epochs follow the whole count; everything else is measured on the rows given).
    """
    profile = [(str(i), b, str(t)) for i, b, t in zip(ids, images, labels, strict=True) if b and t is not None]
    # In an order of their own ids, not the table's: the checks' fits and jitters then depend on the rows alone.
    # Past MAX_PROFILE_ROWS, enough to measure: a subset chosen by id hash.
    profile = sorted(profile, key=lambda r: (_profile_rank(r[0]), r[0], r[2]))[:MAX_PROFILE_ROWS]
    decoded = [(i, *picture, t) for i, b, t in profile if (picture := _decode(b)) is not None]
    pictures, sizes, truths = [image for _, image, _, _ in decoded], [size for *_, size, _ in decoded], [t for *_, t in decoded]
    if len(set(truths)) < 2:
        found = ", ".join(f"{n} of {label!r}" for label, n in sorted(Counter(truths).items())) or "none"
        raise RecipeError(
            "recipe_needs_two_classes",
            f"choosing a recipe needs decodable training images of at least two classes; the {len(profile)} labeled "
            f"training rows decode to {found}: give every class images",
        )
    side, side_evidence = choose_side(pictures, sizes)
    folds = [int(_bucket(i) * FOLDS) for i, *_ in decoded]
    flip = flip_check(pictures, truths, folds)
    mirrored = not (flip["skill_lost"] > SKILL_LOST and flip["p_value"] < SIGNIFICANCE)
    fill = border_grey(pictures)
    jitter = jitter_check(pictures, truths, folds, fill)
    jittered = jitter["with_jittered_copies"] >= jitter["accuracy"]
    epochs, validation = choose_epochs(len(images) if rows is None else rows)
    if not jittered and not mirrored:  # every view would be the image itself
        validation["views"] = 1
    return Recipe(
        side=side,
        visual_tokens=(side // 28) ** 2,
        flip=mirrored,
        jitter=jittered,
        fill=fill,
        epochs=epochs,
        validation=validation,
        evidence={
            "rows": len(images) if rows is None else rows,
            "profiled_rows": len(decoded),
            "classes": len(set(truths)),
            **side_evidence,
            "flip_check": flip,
            "jitter_check": jitter,
            "rules": {
                "detail_kept": DETAIL_KEPT,
                "skill_lost": SKILL_LOST,
                "significance": SIGNIFICANCE,
                "jitter": "with_jittered_copies >= accuracy",
                "step_budget": STEP_BUDGET,
            },
        },
    )


def set_processor_side(model_dir: str | Path, side: int) -> bool:
    """Make a Qwen2-VL processor saved in ``model_dir`` resize every image to about side x side pixels (in area).

    Returns False (and changes nothing) when the folder has no such processor: a hub model keeps
    its own processor, and only LLaMA-Factory's ``image_max_pixels`` applies in training.
    """
    path = Path(model_dir) / "processor_config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    size = config.get("image_processor", {}).get("size")
    if not isinstance(size, dict) or "longest_edge" not in size:
        return False
    # Qwen2-VL rounds the scaled sides down (too big) or up (too small) to multiples of 28: half a
    # patch of slack each way lands a square image on side x side exactly, despite float error.
    size.update(longest_edge=(side + 14) ** 2, shortest_edge=(side - 14) ** 2)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return True

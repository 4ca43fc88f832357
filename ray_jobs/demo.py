"""`lancetag demo`: the closed loop, end to end — ingest, tag, fine-tune, re-tag, evaluate.

Offline by default: real handwritten digits from scikit-learn (1,797 images, 10 classes)
written as image files, a tiny Qwen2-VL built locally, a local Ray cluster, a local Lance
table. With ``data`` (a folder per class) and ``model`` (a hub id on a GPU machine) the same
loop runs on a user's own photos with a real model. Every step is a Lance version:

    ingested -> zero-shot (labels from the base model) -> fine-tuned (labels from the trained model)
"""

from __future__ import annotations

import io
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import yaml

from lance_io.errors import errors_uri, printable
from lance_io.reasons import ReasonError
from lance_io.schema import TRUTH
from lance_io.splits import split_of
from llamafactory_ext.recipe import Recipe, choose_recipe, profiled_ids, set_processor_side

if TYPE_CHECKING:
    from lance_io.tasks import Question, Task
    from ray_jobs.evaluation.baselines import Baseline
    from ray_jobs.ingest.items import IngestSummary

REPO_ROOT = Path(__file__).resolve().parent.parent
# Images per labeler request. Tagging the 1,797 digits on a 1-CPU replica here: 16 -> 56 img/s,
# 32 -> 124 img/s, 64 -> 95 img/s (a request's fixed cost against one forward's size).
LABEL_BATCH = 32
# Labeling workers (0.25 CPU each, reading rows and waiting on the labeler): two keep one replica busy.
LABEL_UNITS = 2
TINY_CONFIG = REPO_ROOT / "configs" / "train" / "tiny_qwen2_vl_digits_full.yaml"
LORA_CONFIG = REPO_ROOT / "configs" / "train" / "qwen2_vl_2b_lora.yaml"
TEST_FRACTION = 0.2
# Split folders a dataset may ship with, and what each is (compared lower-cased).
SPLIT_FOLDERS = {
    "train": "train", "training": "train",
    "test": "test", "testing": "test",
    "val": "validation", "valid": "validation", "validation": "validation", "dev": "validation",
}
COMMIT_ROWS = 262_144  # the split column of this many rows per commit: a commit or two for a folder, 4 a million rows
SPLIT_COLUMN = pa.schema([pa.field("split", pa.string())])


@dataclass
class DemoResult:
    """What the loop did and measured."""

    workdir: str
    table: str
    accuracy_before: float
    accuracy_after: float
    test_rows: int
    train_rows: int
    versions: dict[str, int]
    adapter: str
    report: str
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)  # seconds by step name; the log line adds its figures
    baselines: list[Baseline] = field(default_factory=list)  # pixel baselines on the held-out rows, each against the model
    recipe: dict[str, Any] = field(default_factory=dict)  # what llamafactory_ext.recipe chose from the data
    validation: dict[str, Any] | None = None  # the validation curve of the run
    ingest: dict[str, Any] = field(default_factory=dict)  # where every file went, and the errors record


def write_digits(folder: Path) -> Path:
    """Write scikit-learn's 1,797 digits as 56x56 PNGs (nearest-neighbour), a folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for k, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        out = folder / str(target)
        out.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels * 255 / 16).astype("uint8")).resize((56, 56), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        (out / f"{k:04d}.png").write_bytes(buffer.getvalue())
    return folder


def ingest_folder(data_dir: Path, table: str, layout: FolderLayout, *, progress: bool = True) -> IngestSummary:
    """Ingest the user's folder ``data_dir`` into ``table``, each image labeled by ``layout``.

    Symlinks are followed wherever they lead, as a folder of links into a dataset kept elsewhere is
    a common way to lay one out (ingest refuses them by default). An image's class is the class
    folder it sits in, at any depth (the layout's rule, not ingest's parent folder), given at
    ingest: the same image in two class folders is a ``truth_conflict``, not a silent duplicate.
    """
    from ray_jobs.ingest import IngestOptions, ingest

    options = IngestOptions(allow_outside_root=True, progress=progress)
    return ingest([str(data_dir)], table, options, truth_of=lambda source: layout.place_of(source)[0])


def add_split_column(table: str, layout: FolderLayout, *, commit_rows: int = COMMIT_ROWS) -> int:
    """Write ``split`` from where each image sits in ``layout``, for rows without one; return the version.

    ``split`` is the split folder's, or train/test by id hash for a folder per class. Each row's
    ``truth`` is written at ingest (:func:`ingest_folder`).
    """
    from lance_io import open_table
    from lance_io.columns import fill_column

    def compute(batch: pa.RecordBatch) -> pa.RecordBatch:
        splits = [layout.place_of(source)[1] or split_of(i, TEST_FRACTION, held_out="test")
                  for i, source in zip(batch.column("id").to_pylist(), batch.column("source").to_pylist(), strict=True)]
        return pa.record_batch([pa.array(splits, pa.string())], schema=SPLIT_COLUMN)

    # The labeling run's commit protocol, computed here: a commit per ``commit_rows`` rows.
    fill_column(table, compute, read_columns=["source"], output_schema=SPLIT_COLUMN, todo="split IS NULL",
                commit_rows=commit_rows, properties={"lancetag.job": "demo-layout"})
    return open_table(table).version


def labeler_resources(cluster: dict[str, float] | None) -> dict[str, Any]:
    """Return the label options that size the started replica on the demo's own ``cluster`` (its resources).

    The node's CPUs less the row readers' share, and a GPU when it has one. The replica computes on
    its CPUs rounded up (serve_apps.backends.transformers_backend), so on 2 cores it gets 1.5 and
    runs on both: re-tagging digits' 8 views of 1,797 images took 76 s instead of 85 s. ``None``
    (a cluster the demo joined, where others may hold resources): the defaults.
    """
    if cluster is None:
        return {}
    sized: dict[str, Any] = {
        "concurrency": LABEL_UNITS,
        "labeler_num_cpus": max(1.0, cluster.get("CPU", 1.0) - 0.25 * LABEL_UNITS),
    }
    if cluster.get("GPU", 0.0) >= 1:
        sized["labeler_num_gpus"] = 1.0
    return sized


@dataclass(frozen=True)
class FolderLayout:
    """How ``--data`` is laid out: a folder per class, or split folders (``train/``, ``test/``, ...)
    that each hold a folder per class, as datasets are often shipped."""

    root: Path
    labels: list[str]
    splits: dict[str, str] = field(default_factory=dict)  # split folder -> "train" or "test"
    names: dict[str, str] = field(default_factory=dict)  # class folder -> the task's label, where they differ
    grouped: bool = False  # the class folders sit in grouping folders (SUN397's a/abbey/), as in split folders

    def place_of(self, source: str) -> tuple[str | None, str | None]:
        """Return the class and the split of the image at ``source`` (a path under ``root``), from one parse.

        The class is the class folder the image sits in, at any depth below it (the folder just under
        ``root``, or under its split or grouping folder), or None outside every class folder. The split
        is its split folder's, or None outside any (the rows of a folder per class, split by content hash).
        """
        inside = self._parts(source)
        split = self.splits.get(inside[0]) if len(inside) > 1 else None
        below = inside[1 if self.splits or self.grouped else 0:]
        truth = self.names.get(below[0], below[0]) if len(below) > 1 and below[0] in self._classes else None
        return truth, split

    def named_by(self, question: Question) -> FolderLayout:
        """Return this layout with each class folder labeled by the task's label it states, as an
        answer matches a label (``Lobby/`` is a ``lobby``: case, spaces and a final period aside)."""
        matched = {folder: question.match(folder) for folder in self.labels}
        return replace(self, names={f: label for f, label in matched.items() if label not in (None, f)})

    def _parts(self, source: str) -> list[str]:
        """The path of ``source`` below ``root``, split into its parts (string work: a million rows a run)."""
        return source[len(self._prefix):].split("/") if source.startswith(self._prefix) else []

    @cached_property
    def _prefix(self) -> str:
        return printable(str(self.root)).rstrip("/") + "/"  # ingest's sources are printable

    @cached_property
    def _classes(self) -> frozenset[str]:
        return frozenset(self.labels)

    def classes(self) -> str:
        """Say where the classes were found, for the progress line."""
        inside = " inside the split folders" if self.splits else " inside the grouping folders" if self.grouped else ""
        return f"{len(self.labels)} class folders{inside}"

    def held_out(self) -> str:
        """Say which rows are held out, for the progress line."""
        held = sorted(name for name, split in self.splits.items() if split == "test")
        return f"the folder's own {', '.join(held)} split" if held else f"{TEST_FRACTION:.0%} by content hash"


def folder_layout(data: Path) -> FolderLayout:
    """Return the classes of ``data`` (its sub-folders, or those of its split or grouping folders) and its splits.

    Split folders (``train``, ``val``, ``test``, any case) keep the division the dataset shipped with:
    ``test`` (or, with none, the validation folder) is held out; the others train.
    """
    if not data.is_dir():
        raise ReasonError("bad_source", f"{data} is not a folder: give a folder with a sub-folder per class")
    folders = _folders_in(data)
    if len(folders) == 1 and len(_folders_in(folders[0])) >= 2:  # a wrapper, as an archive unpacks: flowers/<class>/
        return folder_layout(folders[0])
    if folders and all(p.name.lower() in SPLIT_FOLDERS for p in folders):
        labels = sorted({printable(c.name) for p in folders for c in _folders_in(p)})
        if len(labels) < 2:
            raise ReasonError(
                "bad_source",
                f"{data} holds split folders ({', '.join(p.name for p in folders)}) but not two class folders "
                f"in them, found {labels}: give each split a sub-folder per class",
            )
        unlabeled = [p.name for p in folders if not _folders_in(p)]
        if unlabeled:  # a test set shipped without its answers: nothing to train on or measure with
            raise ReasonError(
                "bad_source",
                f"the split folder(s) {', '.join(unlabeled)} of {data} hold no class folders, so their images have "
                "no label to train on or measure with: give each split a sub-folder per class, or move an "
                "unlabeled split out of the folder",
            )
        kinds = {p.name: SPLIT_FOLDERS[p.name.lower()] for p in folders}
        held = "test" if "test" in kinds.values() else "validation"
        return FolderLayout(data, _label_set(labels, data), {n: "test" if k == held else "train" for n, k in kinds.items()})
    grouped = [] if any(map(_holds_images, folders)) else [c.name for p in folders for c in _folders_in(p)]
    if len(set(grouped)) == len(grouped) > len(folders):
        # Folders that only group the classes (SUN397's a/abbey/, b/bakery/): each name inside them
        # is found once, some hold several, and no image sits in them directly. A name found in two
        # (cats/2021/, dogs/2021/) is a part of each class, and the folders at the top are the classes.
        return FolderLayout(data, _label_set(sorted(printable(n) for n in grouped), data), grouped=True)
    labels = [printable(p.name) for p in folders]  # a name not in UTF-8 as ingest shows it: '\\xff'
    if len(labels) < 2:
        raise ReasonError("bad_source", f"{data} needs at least two class folders (one per label), found {labels}")
    return FolderLayout(data, _label_set(labels, data))


def _label_set(labels: list[str], data: Path) -> list[str]:
    """Return ``labels`` if a classify task takes them; refuse folders that name one label twice."""
    from pydantic import ValidationError

    from lance_io.tasks import ClassifyTask

    try:
        ClassifyTask(name="folders", labels=labels)
    except ValidationError as err:
        problem = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise ReasonError(
            "bad_source",
            f"the class folders of {data} do not make a label set ({problem}): an answer matches a "
            "label whatever its case, spaces and final period, so 'Cat' and 'cat' are one label: merge such folders",
        ) from None
    return labels


def _holds_images(folder: Path) -> bool:
    """Whether a file with an image's name sits directly in ``folder``."""
    from ray_jobs.ingest.decode import IMAGE_EXTENSIONS

    return any(p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir() for p in folder.iterdir())


def _folders_in(folder: Path) -> list[Path]:
    """Return the sub-folders of ``folder`` that may be classes or splits, in name order."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _metadata_folder(p.name))


def folder_task(layout: FolderLayout, out: Path) -> Path:
    """Write a classify task whose labels are the class folders of ``layout``; return its path."""
    path = out / "task.yaml"
    path.write_text(yaml.safe_dump({"kind": "classify", "name": printable(layout.root.name) or "folders", "labels": layout.labels}))
    return path


def _metadata_folder(name: str) -> bool:
    """Whether a folder of ``--data`` is no class: hidden (``.git``), or the ``__MACOSX`` folder of
    AppleDouble files a zip made on a Mac unpacks to (ingest skips those files as not images)."""
    return name.startswith(".") or name == "__MACOSX"


def _task_question(task: str) -> Question:
    """Return the one closed question of ``task``, refusing a task folder names cannot be the truth of."""
    from lance_io.tasks import load_task

    questions = load_task(task).questions()
    if len(questions) != 1 or not questions[0].values:
        raise ReasonError(
            "bad_task",
            f"the demo learns one label per image, its folder's name, and task {task!r} asks "
            f"{len(questions)} question(s){'' if len(questions) != 1 else ' with no fixed answers'}: "
            "give a classify task whose labels are the folder names, or no --task",
        )
    return questions[0]


def _require_images(accounted: dict[str, Any], data_dir: Path) -> None:
    """Refuse a folder none of whose files went into the table; its errors stay in the errors record."""
    if accounted["added"] + accounted["duplicates"]:
        return
    raise ReasonError("no_images", f"no file under {data_dir} is an image the table could take: {describe_ingest(accounted)}")


def _accounted(ingested: IngestSummary) -> dict[str, Any]:
    """Return where every file of the folder went (the ingest's counts) and the errors record's location."""
    keys = ("inputs", "added", "duplicates", "errors", "skipped", "errors_by_reason")
    return {**{k: v for k, v in ingested.to_json().items() if k in keys}, "errors_table": errors_uri(ingested.table)}


def describe_ingest(accounted: dict[str, Any]) -> str:
    """Return where the folder's files went, in words: the demo's progress line and its summary."""
    said = f"{accounted['added']} images of {accounted['inputs']} files"
    if accounted["duplicates"]:
        said += f", {_count(accounted['duplicates'], 'duplicate')}"
    if accounted["skipped"]:
        said += f", {accounted['skipped']} skipped (not images)"
    if accounted.get("outside_classes"):
        said += f", {accounted['outside_classes']} outside the class folders (no label: neither trained on nor measured)"
    if accounted.get("untrained_classes"):
        said += f", no image to train on in {', '.join(accounted['untrained_classes'])}"
    if accounted["errors"]:
        reasons = ", ".join(f"{n} {reason}" for reason, n in accounted["errors_by_reason"].items())
        said += f", {_count(accounted['errors'], 'error')} ({reasons}) in {accounted['errors_table']}"
    return said


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def truth_counts(table: str) -> Counter[tuple[str | None, str | None]]:
    """Return how many rows of ``table`` hold each (``truth``, ``split``) pair: one read of the two
    columns, a batch at a time, for every check made of the layout columns."""
    from lance_io import open_table

    counts: Counter[tuple[str | None, str | None]] = Counter()
    for batch in open_table(table).to_batches(columns=[TRUTH, "split"]):
        grouped = pa.table(batch).group_by([TRUTH, "split"], use_threads=False).aggregate([([], "count_all")])
        for group in grouped.to_pylist():
            counts[group[TRUTH], group["split"]] += group["count_all"]
    return counts


def _require_known_classes(counts: Counter[tuple[str | None, str | None]], labels: set[str], data_dir: Path) -> None:
    """Refuse images whose class folder is not one of the task's labels (a ``--task`` that misspells a
    folder): training would skip such rows as ``label_not_in_task`` and learn the other classes only."""
    strays: Counter[str] = Counter()
    for (truth, _), n in counts.items():
        if truth is not None and truth not in labels:
            strays[truth] += n
    if strays:
        found = ", ".join(f"{n} in the folder {name!r}" for name, n in sorted(strays.items()))
        raise ReasonError(
            "bad_source",
            f"images under {data_dir} sit in class folders that are not labels of the task ({found}); the labels "
            f"are {sorted(labels)}: name each class folder after a label of the task, or give no --task",
        )


def _label_coverage(counts: Counter[tuple[str | None, str | None]], labels: set[str]) -> dict[str, Any]:
    """Return how many images sit outside every class folder (beside them, or in a hidden one: no
    label), and the labels no training image has (an empty class folder: never learned)."""
    trained = {truth for (truth, split) in counts if split == "train"}
    return {"outside_classes": sum(n for (truth, _), n in counts.items() if truth is None),
            "untrained_classes": sorted(labels - trained)}


def _require_held_out(counts: Counter[tuple[str | None, str | None]], layout: FolderLayout) -> None:
    """Refuse a folder so small that no image fell in the held-out split: the loop would measure nothing."""
    if any(truth is not None and split == "test" for truth, split in counts):
        return
    raise ReasonError(
        "no_rows",
        f"none of the {counts.total()} images fell in the held-out share ({layout.held_out()}), so the loop "
        "would have nothing to measure its accuracy on: add images",
    )


def training_recipe(table: str, version: int) -> Recipe:
    """Return the recipe ``llamafactory_ext.recipe`` chooses from the table's training split (truth labels)."""
    from lance_io import open_table
    from lance_io.scan import rows_with_ids

    ds, training = open_table(table, version=version), "split = 'train' AND truth IS NOT NULL"
    ids = (i for batch in ds.to_batches(columns=["id"], filter=training) for i in batch.column("id").to_pylist())
    profiled = profiled_ids(ids)  # the images of these rows alone are read: the profile, not the table
    found = {row["id"]: row for part in rows_with_ids(ds, profiled, ["id", "image", "truth"], where=training)
             for row in part.to_pylist()}
    rows = [found[i] for i in profiled if i in found]
    return choose_recipe([r["id"] for r in rows], [r["image"] for r in rows], [r["truth"] for r in rows],
                         rows=ds.count_rows(filter=training))


def _training_config(
    model: str, tiny: bool, dataset_dir: Path, output_dir: Path, epochs: float | None, recipe: Recipe,
    cluster: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Return the run's LLaMA-Factory config: the model's YAML with the recipe's choices.

    A pretrained model trains with the template LLaMA-Factory knows it by (``template_for``) and, on
    the demo's own ``cluster`` (its resources), on Ray Train workers sized to it: one a GPU, or one
    worker on its CPUs without bf16. ``None`` (a cluster the demo joined): the YAML's workers.
    """
    from llamafactory_ext.model_template import template_for

    config = yaml.safe_load((TINY_CONFIG if tiny else LORA_CONFIG).read_text())
    config.update(model_name_or_path=model, dataset="demo_train", dataset_dir=str(dataset_dir), output_dir=str(output_dir))
    chosen = recipe.overrides()
    if not tiny:  # a pretrained model keeps its config's epochs and its tower: from-scratch rules
        chosen.pop("num_train_epochs")
        chosen.pop("freeze_vision_tower")
        chosen["lancetag"].pop("vision_warmup")
        config["template"] = template_for(model)
        if cluster is not None:  # data parallel over its GPUs, or one worker on all of its CPUs
            workers = max(1, int(cluster.get("GPU", 0.0)))
            gpu = cluster.get("GPU", 0.0) >= 1
            cpus = min(config["lancetag"]["cpus_per_worker"], cluster.get("CPU", 1.0) / workers)
            config["lancetag"].update(workers=workers, gpus_per_worker=1 if gpu else 0, cpus_per_worker=cpus)
            config["bf16"] = config.get("bf16", False) and gpu
    elif epochs is not None:
        chosen["lancetag"]["vision_warmup"]["epochs"] = math.ceil(epochs)
    config["lancetag"] = {**config.get("lancetag", {}), **chosen.pop("lancetag")}
    config.update(chosen)
    if epochs is not None:
        config["num_train_epochs"] = epochs
    return config


def aspect_ratios(table: str, version: int, where: str) -> tuple[float, float]:
    """Return the widest and the tallest aspect (width over height, upright: an EXIF orientation of 5-8
    swaps the sides) of the rows of ``table`` at ``version`` that ``where`` selects: one read of three
    integer columns, a batch at a time."""
    import pyarrow.compute as pc

    from lance_io import open_table

    widest, tallest = 1.0, 1.0
    columns = ["width", "height", "exif_orientation"]
    for batch in open_table(table, version=version).to_batches(columns=columns, filter=where):
        width, height = pc.cast(batch["width"], pa.float64()), pc.cast(batch["height"], pa.float64())
        turned = pc.fill_null(pc.is_in(batch["exif_orientation"], pa.array([5, 6, 7, 8], batch["exif_orientation"].type)), False)
        low, high = pc.min_max(pc.if_else(turned, pc.divide(height, width), pc.divide(width, height))).values()
        widest, tallest = max(widest, high.as_py() or 1.0), min(tallest, low.as_py() or 1.0)
    return widest, tallest


def _fit_cutoff(config: dict[str, Any], task: Task, ratios: tuple[float, ...] = ()) -> dict[str, Any]:
    """Return ``config`` with a ``cutoff_len`` that holds the task's longest example, its images of
    aspect ``ratios`` included: a prompt listing dozens of labels, an image of thousands of tokens
    (LLaVA-NeXT) or a long strip outgrows a YAML's, and LLaMA-Factory would cut it (``llamafactory_ext.cutoff``)."""
    from llamafactory_ext.cutoff import task_cutoff

    pixels = (config["image_max_pixels"], config.get("image_min_pixels"))
    needed = task_cutoff(task, config["model_name_or_path"], config["template"], *pixels, ratios)
    return {**config, "cutoff_len": max(config.get("cutoff_len", 0), needed)}


def run_demo(
    workdir: str | Path | None = None,
    *,
    data: str | Path | None = None,
    task: str | None = None,
    model: str | None = None,
    epochs: float | None = None,
    progress: bool = True,
    log: Any = print,
) -> DemoResult:
    """Run the loop in ``workdir`` (default: a fresh ./lancetag-work/demo-<time>) and return the figures."""
    import ray

    from lance_io.tasks import load_task
    from lance_io.versions import tag_version
    from llamafactory_ext.register import register_dataset
    from llamafactory_ext.train import run_training
    from llamafactory_ext.validation import require_validation_rows, validation_sources
    from ray_jobs.evaluation import evaluate_table
    from ray_jobs.evaluation.in_training import transformers_labeler
    from ray_jobs.label import LabelOptions, label_table
    from ray_jobs.ray_session import ensure_ray, require_ray_data_at
    from serve_apps.tiny_models import build_tiny_model

    if epochs is not None and not epochs > 0:
        raise ReasonError("bad_option", f"epochs must be above 0, not {epochs}")
    started = time.perf_counter()
    steps: dict[str, float] = {}
    work = Path(workdir or Path("lancetag-work") / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    if data is not None and work.is_relative_to(Path(data).resolve()):  # `--data .` run from the photos' folder
        raise ReasonError(
            "bad_option",
            f"the work folder {work} is inside the data folder {Path(data).resolve()}, whose every file the demo "
            "reads as a photo (its tables and models too): give --workdir outside it, or run from elsewhere",
        )
    if os.environ.get("RAY_ADDRESS"):  # a cluster it cannot run on is refused before anything is written
        require_ray_data_at(os.environ["RAY_ADDRESS"])
    work.mkdir(parents=True, exist_ok=True)
    table = str(work / "images.lance")

    def step(name: str, t0: float, detail: str = "") -> None:  # ``steps`` keys are the names: one JSON shape a run
        steps[name] = round(time.perf_counter() - t0, 1)
        described = f"{name} ({detail})" if detail else name
        log(f"[{time.perf_counter() - started:6.1f}s] {described} done in {steps[name]:.1f}s")

    t0 = time.perf_counter()
    data_dir = work / "data" if data is None else Path(data).resolve()
    layout = None if data is None else folder_layout(data_dir)  # refused here, before anything is written
    task = task or ("digits" if layout is None else str(folder_task(layout, work)))
    question = _task_question(task)
    labels = set(question.values or ())
    if layout is None:
        layout = folder_layout(write_digits(data_dir))  # a folder per digit
    layout = layout.named_by(question)
    tiny = model is None
    # the recipe's model (docs/training.md §7): text 4 heads of 32, vision tower 128 wide
    base = str(build_tiny_model("qwen2_vl", work / "models" / "base", heads=4, vision_hidden=128)) if tiny else model
    step("data + base model", t0)

    ensure_ray(object_store_memory=1024**3)
    t0 = time.perf_counter()
    ingested = ingest_folder(data_dir, table, layout, progress=progress)
    accounted = _accounted(ingested)
    _require_images(accounted, data_dir)
    add_split_column(table, layout)
    counts = truth_counts(table)
    _require_known_classes(counts, labels, data_dir)
    accounted.update(_label_coverage(counts, labels))
    _require_held_out(counts, layout)
    versions = {"ingested": tag_version(table, "ingested")}
    step("ingest", t0, f"{describe_ingest(accounted)}; {layout.classes()}; held out: {layout.held_out()}")

    t0 = time.perf_counter()
    recipe = training_recipe(table, versions["ingested"])
    if tiny:  # the labeler reads the side from the model's processor, as training does
        set_processor_side(base, recipe.side)
    registration = register_dataset(
        table, "demo_train", work / "lf", version=versions["ingested"], task=task, where="split = 'train'", label_column="truth"
    )  # pinned at the ingested version: what it registers does not depend on when
    require_validation_rows(validation_sources(work / "lf", [registration.name], recipe.validation["fraction"]))
    own_cluster = None if os.environ.get("RAY_ADDRESS") else ray.cluster_resources()
    config = _training_config(base, tiny, work / "lf", work / "models" / "fine-tuned", epochs, recipe, own_cluster)
    config = _fit_cutoff(config, load_task(task), aspect_ratios(table, versions["ingested"], "split = 'train'"))
    step("recipe from the training rows", t0, f"side {recipe.side}, flip {'on' if recipe.flip else 'off'}, "
         f"jitter {'on' if recipe.jitter else 'off'}, up to {config['num_train_epochs']:g} epochs, "
         f"cutoff_len {config['cutoff_len']}")

    t0 = time.perf_counter()
    labeler = labeler_resources(own_cluster)
    label_table(table, LabelOptions(task=task, model=base, batch_size=LABEL_BATCH, version_tag="zero-shot", **labeler),
                progress=progress)
    versions["zero-shot"] = tag_version(table, "zero-shot")
    before = evaluate_table(table, "label", "truth", version="zero-shot", where="split = 'test'")
    step("zero-shot tagging", t0, f"held-out accuracy {100 * before.accuracy:.1f}%")

    t0 = time.perf_counter()
    trained = run_training(config, labeler=transformers_labeler)
    loss = "n/a" if trained.train_loss is None else f"{trained.train_loss:.3f}"
    step("fine-tuning", t0, f"{registration.rows} rows, mean train loss {loss}")

    t0 = time.perf_counter()
    tuned = LabelOptions(task=task, relabel=True, batch_size=LABEL_BATCH, version_tag="fine-tuned", **labeler,
                         **({"model": trained.output_dir} if tiny else {"model": base, "lora": trained.output_dir}))
    label_table(table, tuned, progress=progress)
    versions["fine-tuned"] = tag_version(table, "fine-tuned")
    after = evaluate_table(table, "label", "truth", version="fine-tuned", where="split = 'test'", report_dir=work / "report",
                           baseline_train="split = 'train'")
    step("re-tagging", t0, f"held-out accuracy {100 * after.accuracy:.1f}%")

    test_rows = next(iter(after.evaluations.values())).rows
    return DemoResult(
        workdir=str(work),
        table=table,
        accuracy_before=before.accuracy,
        accuracy_after=after.accuracy,
        test_rows=test_rows,
        train_rows=registration.rows,
        versions=versions,
        adapter=trained.output_dir,
        report=str(after.report),
        seconds=round(time.perf_counter() - started, 1),
        steps=steps,
        baselines=next(iter(after.baselines.values())),
        recipe=recipe.as_dict(),
        validation=trained.validation,
        ingest=accounted,
    )

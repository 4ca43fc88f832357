"""Run LLaMA-Factory training with the Lance extension active, in this process or on Ray Train.

``run_training(config)`` takes a LLaMA-Factory YAML (or dict), plus an optional ``lancetag:``
block (:class:`~llamafactory_ext.run_options.RunOptions`) that LLaMA-Factory never sees. Before training it pins every
Lance dataset the run names: a copy of ``dataset_info.json`` is written into the output
folder with tags resolved to version numbers, and the run reads that copy, so a table that
changes during or after the run cannot change what it trained on. Lineage (table URI +
version + filter -> output folder) is written to ``<output_dir>/lancetag_lineage.json``.

With ``workers >= 1`` the run is a Ray Train ``TorchTrainer`` (:mod:`llamafactory_ext.ray_train`);
the adapter and HF checkpoints are reported to Ray's storage path.

With a ``validation:`` entry in the block (:mod:`llamafactory_ext.validation`) each Lance dataset is
split again into train and validation rows; the run scores the task on the validation rows at
intervals, keeps the best weights, stops on a plateau, and records the curve in the lineage.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lance_io.augment import VIEWS_FILE
from lance_io.image_size import LINEAGE_FILE
from lance_io.reasons import first_problem
from llamafactory_ext.augment import ImageAugment, install
from llamafactory_ext.image_fit import trained_pixels
from llamafactory_ext.placement import require_placeable
from llamafactory_ext.ray_train import (
    connect_ray,
    final_train_loss,
    train_on_ray,
    training_callbacks,
    worker_resources,
)
from llamafactory_ext.run_options import (
    RunOptions,
    TrainConfigError,
    check_datasets_and_template,
    dataset_names,
    load_config,
)
from llamafactory_ext.source import DATA_CONFIG, lance_source_of, read_dataset_info
from llamafactory_ext.validation import (
    CURVE_FILE,
    InTrainingLabeler,
    ValidationPlan,
    plan_validation,
    read_curve,
)
from llamafactory_ext.vision_warmup import warm_vision_tower

PINNED_DIR = "lancetag_dataset_info"
STREAM_PREPROCESSING_BATCH = 128


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: output folder, final train loss, lineage file, Ray checkpoint, validation curve."""

    output_dir: str
    train_loss: float | None
    lineage_path: str
    seconds: float
    workers: int
    checkpoint: str | None = None
    validation: dict[str, Any] | None = None
    resumed_from_step: int = 0  # Ray Train restarted the workers (a node lost) from this checkpoint's step
    nodes: dict[str, int] | None = None  # Ray Train: workers per Ray node id (of the last worker group)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


def pin_datasets(args: dict[str, Any], pinned_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return (args reading a pinned dataset_info copy, lineage records of the Lance datasets used).

    Lance entries get a version number (tags and "latest" resolved now); file entries get
    absolute paths so they still resolve from the copy.
    """
    from lance_io.scan import open_at
    from llamafactory_ext.reader import resolve
    from llamafactory_ext.samples_reader import count_samples

    dataset_dir = Path(args.get("dataset_dir", "data")).resolve()
    info = read_dataset_info(dataset_dir)
    used = dataset_names(args.get("dataset")) + dataset_names(args.get("eval_dataset"))
    records = []
    for name in used:
        entry = info.get(name)
        source = lance_source_of(entry, name=name) if entry else None
        if entry and "file_name" in entry and source is None:
            entry["file_name"] = str(dataset_dir / entry["file_name"])
        if source is None:
            continue
        ds = open_at(source.uri, source.ref(), storage_options=source.storage_options())
        pinned = resolve(source.model_copy(update={"version": ds.version, "tag": None}))
        entry["lance"] = pinned.model_dump(mode="json", exclude_none=True)
        records.append(
            {
                "dataset": name,
                "uri": source.uri,
                "version": ds.version,
                "tag": source.tag,
                "where": source.where,
                "split": source.split,
                "val_fraction": source.val_fraction,
                "task": source.task,
                "label_column": source.label_column,
                "messages_column": source.messages_column,
                "samples_version": source.samples_version,
                "rows_matching_where": (  # a samples entry's where filters the samples table
                    ds.count_rows(filter=source.where) if source.samples_version is None else count_samples(pinned)
                ),
            }
        )
    if not records:
        return args, records
    pinned_dir.mkdir(parents=True, exist_ok=True)
    (pinned_dir / DATA_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    new_args = dict(args, dataset_dir=str(pinned_dir))
    new_args.setdefault("media_dir", str(dataset_dir))
    if new_args.get("streaming"):  # each rank reads its own fragments instead of rank 0 dispatching all
        accel = dict(new_args.get("accelerator_config") or {})
        accel.setdefault("dispatch_batches", False)
        new_args["accelerator_config"] = accel
        # LLaMA-Factory previews one preprocessed batch of a stream before training: keep it small
        new_args.setdefault("preprocessing_batch_size", STREAM_PREPROCESSING_BATCH)
    return new_args, records


def _absolute(args: dict[str, Any]) -> dict[str, Any]:
    """Return args with local paths made absolute (Ray workers do not share our working directory)."""
    out = dict(args)
    for key in ("output_dir", "dataset_dir", "media_dir", "deepspeed", "tokenized_path"):
        if isinstance(out.get(key), str) and "://" not in out[key]:
            out[key] = str(Path(out[key]).resolve())
    model = out.get("model_name_or_path")
    if isinstance(model, str) and Path(model).exists():
        out["model_name_or_path"] = str(Path(model).resolve())
    return out


def _train_in_process(args: dict[str, Any], augment: ImageAugment | None, validation: ValidationPlan | None) -> None:
    from llamafactory.train.tuner import run_exp

    from llamafactory_ext.patch import activate

    activate()
    install(augment)
    try:
        run_exp(args=args, callbacks=training_callbacks(validation))
    finally:
        install(None)


def run_training(
    config: str | Path | dict[str, Any],
    *,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    storage: str | None = None,
    overrides: dict[str, Any] | None = None,
    labeler: InTrainingLabeler | None = None,
) -> TrainResult:
    """Train as ``config`` says with Lance datasets pinned; return the output folder, loss and lineage.

    ``labeler`` answers validation rows with the model being trained (needed with a ``validation``
    block; ``lancetag train`` passes ``ray_jobs.evaluation.in_training.transformers_labeler``).

    Example::

        from llamafactory_ext.train import run_training
        result = run_training("configs/train/tiny_qwen2_vl_cpu.yaml", workers=2)
        print(result.output_dir, result.train_loss)
    """
    args, options = load_config(config)
    args.update(overrides or {})
    flags = {"workers": workers, "gpus_per_worker": gpus_per_worker, "storage": storage}
    try:  # validated as the block's own values are (workers >= 0, ...), not merely copied in
        options = RunOptions.model_validate({**options.model_dump(), **{k: v for k, v in flags.items() if v is not None}})
    except ValueError as err:
        raise TrainConfigError("bad_option", first_problem(err)) from None
    if "output_dir" not in args:
        raise TrainConfigError(
            "output_dir_missing", "the training config needs output_dir (where the adapter goes)"
        )
    args = _absolute(args)
    check_datasets_and_template(args)
    if options.workers > 0:  # before any work: Ray Train would wait for ever for workers no node holds
        connect_ray()
        require_placeable(options.workers, worker_resources(options), options.placement_strategy)
    output_dir = Path(args["output_dir"])
    started = time.time()
    args, lineage = pin_datasets(args, output_dir / PINNED_DIR)
    validation = None
    if options.validation is not None:
        validation, changed = plan_validation(args, options.validation, labeler, options.augment)
        for record in lineage:
            record.update(changed.get(record["dataset"], {}))
    for left in (CURVE_FILE, VIEWS_FILE):  # left in this folder by an earlier run
        (output_dir / left).unlink(missing_ok=True)
    warmup = None
    if options.vision_warmup is not None:  # on the training rows validation left (never its own)
        args["model_name_or_path"], warmup = warm_vision_tower(args, options.vision_warmup, options.augment)
    checkpoint, filesystem, resumed_from, nodes = None, None, 0, None
    if options.workers == 0:
        _train_in_process(args, options.augment, validation)
    else:
        result = train_on_ray(args, options, validation)
        resumed_from = int((result.metrics or {}).get("resumed_from_step", 0))
        nodes = (result.metrics or {}).get("nodes")
        if result.checkpoint is not None:
            filesystem = result.checkpoint.filesystem
            checkpoint = _checkpoint_uri(result.checkpoint.path, filesystem)
    seconds = time.time() - started
    loss = final_train_loss(output_dir)
    curve = read_curve(output_dir) if validation is not None else None
    if curve is not None:
        curve.update(datasets=validation.datasets, options=options.validation.model_dump())
    lineage_path = output_dir / LINEAGE_FILE
    record = {
        "output_dir": str(output_dir),
        "model_name_or_path": args.get("model_name_or_path"),
        "finetuning_type": args.get("finetuning_type", "lora"),
        "stage": args.get("stage"),
        "datasets": lineage,
        "dataset_info": str(Path(args.get("dataset_dir", "")) / DATA_CONFIG),
        "workers": options.workers,
        "augment": options.augment and options.augment.model_dump(),
        "image_pixels": vars(trained_pixels(args)),  # the labeler resizes as trained
        "validation": curve,
        "vision_warmup": warmup,
        "ray_checkpoint": checkpoint,
        "resumed_from_step": resumed_from,
        "nodes": nodes,
        "train_loss": loss,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(seconds, 2),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    lineage_path.write_text(json.dumps(record, indent=2) + "\n")
    if checkpoint is not None:  # the adapter in Ray's storage carries its lineage too
        path = checkpoint.split("://", 1)[-1]
        with filesystem.open_output_stream(f"{path}/{LINEAGE_FILE}") as out:
            out.write((json.dumps(record, indent=2) + "\n").encode())
    return TrainResult(
        str(output_dir), loss, str(lineage_path), round(seconds, 2), options.workers, checkpoint, curve, resumed_from,
        nodes,
    )


def _checkpoint_uri(path: str, filesystem: Any) -> str:
    """Return the checkpoint's location: a local path as is, else ``<scheme>://path`` (e.g. s3://)."""
    kind = getattr(filesystem, "type_name", "local")
    return path if kind == "local" else f"{kind}://{path}"

"""Run LLaMA-Factory training with the Lance extension active, in this process or on Ray Train.

``run_training(config)`` takes a LLaMA-Factory YAML (or dict), plus an optional ``lancetag:``
block (:class:`RunOptions`) that LLaMA-Factory never sees. Before training it pins every
Lance dataset the run names: a copy of ``dataset_info.json`` is written into the output
folder with tags resolved to version numbers, and the run reads that copy, so a table that
changes during or after the run cannot change what it trained on. Lineage (table URI +
version + filter -> output folder) is written to ``<output_dir>/lancetag_lineage.json``.

With ``workers >= 1`` the run is a Ray Train ``TorchTrainer`` (gloo on CPU, NCCL on GPU), one
LLaMA-Factory process per worker, with the ``ScalingConfig``/``RunConfig`` knobs LLaMA-Factory
0.9.5 dropped; the adapter and HF checkpoints are reported to Ray's storage path.

With a ``validation:`` entry in the block (:mod:`llamafactory_ext.validation`) each Lance dataset is
split again into train and validation rows; the run scores the task on the validation rows at
intervals, keeps the best weights, stops on a plateau, and records the curve in the lineage.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from lance_io.reasons import ReasonError
from llamafactory_ext.augment import ImageAugment, install
from llamafactory_ext.source import DATA_CONFIG, lance_source_of, read_dataset_info
from llamafactory_ext.validation import (
    CURVE_FILE,
    InTrainingLabeler,
    ValidationOptions,
    ValidationPlan,
    plan_validation,
    read_curve,
)

LINEAGE_FILE = "lancetag_lineage.json"
PINNED_DIR = "lancetag_dataset_info"
STREAM_PREPROCESSING_BATCH = 128


class TrainConfigError(ReasonError):
    """A training config that cannot run; ``reason`` is a stable code."""


class RunOptions(BaseModel):
    """The ``lancetag:`` block of a training YAML: where to run (Ray Train), augmentation, validation.

    CLI flags override it.
    """

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(0, ge=0, description="Ray Train workers; 0 runs in this process without Ray")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker (0: CPU workers, gloo)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs per worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    storage: str | None = Field(None, description="Ray Train storage path for checkpoints (local or s3://)")
    name: str | None = Field(None, description="Ray Train run name (default: output folder name)")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts on failure (-1: unlimited)")
    checkpoints_to_keep: int | None = Field(None, ge=1, description="Checkpoints kept in storage")
    augment: ImageAugment | None = Field(None, description="Random affine jitter of training images")
    validation: ValidationOptions | None = Field(
        None, description="Hold back rows, score the task on them, keep the best weights, stop on a plateau"
    )


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


def load_config(config: str | Path | dict[str, Any]) -> tuple[dict[str, Any], RunOptions]:
    """Return (LLaMA-Factory args, run options) from a YAML path or dict."""
    if isinstance(config, str | Path) and not Path(config).is_file():
        raise TrainConfigError(
            "config_not_found", f"no training config at {config}; see configs/train/ for examples"
        )
    data = yaml.safe_load(Path(config).read_text()) if isinstance(config, str | Path) else dict(config)
    if not isinstance(data, dict):
        raise TrainConfigError(
            "config_not_mapping", f"{config} must be a YAML mapping of LLaMA-Factory arguments"
        )
    try:
        options = RunOptions.model_validate(data.pop("lancetag", None) or {})
    except ValueError as err:
        raise TrainConfigError("bad_lancetag_block", f"{config}: {err}") from err
    if isinstance(config, str | Path) and isinstance(data.get("deepspeed"), str):
        beside = Path(config).parent / data["deepspeed"]  # paths in a config are relative to it first
        if not Path(data["deepspeed"]).exists() and beside.exists():
            data["deepspeed"] = str(beside)
    return data, options


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip()]
    return list(value)


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
    used = _names(args.get("dataset")) + _names(args.get("eval_dataset"))
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


def final_train_loss(output_dir: str | Path) -> float | None:
    """Return ``train_loss`` from LLaMA-Factory's results file, or the last logged loss."""
    out = Path(output_dir)
    for name in ("all_results.json", "train_results.json"):
        path = out / name
        if path.is_file():
            loss = json.loads(path.read_text()).get("train_loss")
            if loss is not None:
                return float(loss)
    log = out / "trainer_log.jsonl"
    if log.is_file():
        losses = [json.loads(line).get("loss") for line in log.read_text().splitlines() if line.strip()]
        losses = [x for x in losses if x is not None]
        return float(losses[-1]) if losses else None
    return None


def _callbacks(validation: ValidationPlan | None) -> list[Any]:
    """Return the callbacks every training process adds to LLaMA-Factory's own."""
    if validation is None:
        return []
    from llamafactory_ext.validation import validation_callback

    return [validation_callback(validation)]


def _train_in_process(args: dict[str, Any], augment: ImageAugment | None, validation: ValidationPlan | None) -> None:
    from llamafactory.train.tuner import run_exp

    from llamafactory_ext.patch import activate

    activate()
    install(augment)
    try:
        run_exp(args=args, callbacks=_callbacks(validation))
    finally:
        install(None)


def _worker_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: one LLaMA-Factory training process (runs in the worker)."""
    import ray.train
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    from llamafactory_ext.patch import activate

    activate()
    install(config.get("augment"))
    rank = ray.train.get_context().get_world_rank()
    nodes = _workers_by_node()
    args = dict(config["args"])
    resumed = ray.train.get_checkpoint()  # set when Ray Train restarts the workers after a failure
    resume_dir = tempfile.mkdtemp(prefix="lancetag-resume-") if resumed is not None else None
    resumed_from = _resume_from(resumed, resume_dir, args) if resumed is not None else 0

    class ReportCheckpoints(TrainerCallback):
        """Hands each HF checkpoint to Ray Train (rank 0 uploads; every rank reports), then waits until
        Ray Train committed it, so a restart resumes from it: no more than one interval of steps is redone.
        """

        def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            ckpt_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            checkpoint = None
            if rank == 0 and ckpt_dir.is_dir():
                checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
            ray.train.report(
                {"step": state.global_step, "resumed_from_step": resumed_from},
                checkpoint=checkpoint,
                checkpoint_dir_name=ckpt_dir.name,
            )
            # the controller registers reports on its next poll (seconds); train on only once it has
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    try:
        run_exp(args=args, callbacks=[ReportCheckpoints(), *_callbacks(config.get("validation"))])
    finally:
        if resume_dir is not None:
            shutil.rmtree(resume_dir, ignore_errors=True)
    output_dir = Path(config["args"]["output_dir"])
    loss = final_train_loss(output_dir) if rank == 0 else None
    with tempfile.TemporaryDirectory(prefix="lancetag-final-") as staging:
        final = None
        if rank == 0:  # the adapter/model files, without the intermediate checkpoint-* folders
            for item in output_dir.iterdir():
                if item.is_file():
                    _link_or_copy(item, Path(staging) / item.name)
            final = ray.train.Checkpoint.from_directory(staging)
        ray.train.report(
            {"train_loss": loss if loss is not None else float("nan"), "resumed_from_step": resumed_from, "nodes": nodes},
            checkpoint=final,
            checkpoint_dir_name="final",
        )


def _workers_by_node() -> dict[str, int]:
    """Return {Ray node id: workers on it} of this worker group (every rank calls it: a collective)."""
    import ray
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized():
        return {mine: 1}
    every: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {node: every.count(node) for node in sorted(set(every))}


def _resume_from(checkpoint: Any, local_dir: str, args: dict[str, Any]) -> int:
    """Download the HF checkpoint Ray Train restarted from and point ``resume_from_checkpoint`` at it; return its step.

    A checkpoint without ``trainer_state.json`` (the final adapter) is not resumed from: 0.
    """
    checkpoint.to_directory(local_dir)
    state = Path(local_dir) / "trainer_state.json"
    if not state.is_file():
        return 0
    args["resume_from_checkpoint"] = local_dir  # weights, optimizer, scheduler, step and RNG of rank 0
    return int(json.loads(state.read_text())["global_step"])


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HF_DATASETS_CACHE",
    "TOKENIZERS_PARALLELISM",
    "LANCETAG_TASKS_DIR",
)


def worker_env(args: dict[str, Any]) -> dict[str, str]:
    """Return the environment variables workers need: offline/cache switches and Lance storage secrets.

    Secrets named by an entry's ``storage_options_env`` are forwarded by name from this process,
    so they never appear in a config file.
    """
    names = [n for n in FORWARDED_ENV if n in os.environ]
    dataset_dir = args.get("dataset_dir")
    if dataset_dir:
        for name, entry in read_dataset_info(dataset_dir).items():
            source = lance_source_of(entry, name=name)
            if source is not None:
                names += [env for env in source.storage_options_env.values() if env in os.environ]
    return {n: os.environ[n] for n in names}


def _train_on_ray(args: dict[str, Any], options: RunOptions, validation: ValidationPlan | None) -> Any:
    """Run ``args`` on a Ray Train TorchTrainer; return its result (last checkpoint, last metrics).

    With ``max_failures`` > 0 a lost worker (kill -9, node lost) restarts the worker group, which
    resumes from the last checkpoint reported to ``storage`` (:func:`_resume_from`), not step 0.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": options.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = options.gpus_per_worker
    name = options.name or Path(args["output_dir"]).name
    storage = options.storage or str(Path(args["output_dir"]).resolve().parent / "ray_results")
    trainer = TorchTrainer(
        _worker_loop,
        # pickled to the workers as is
        train_loop_config={"args": args, "augment": options.augment, "validation": validation},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=options.workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=options.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=options.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=options.max_failures),
            worker_runtime_env={"env_vars": worker_env(args)},
        ),
    )
    return trainer.fit()


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
    options = options.model_copy(update={k: v for k, v in flags.items() if v is not None})
    if "output_dir" not in args:
        raise TrainConfigError(
            "output_dir_missing", "the training config needs output_dir (where the adapter goes)"
        )
    args = _absolute(args)
    output_dir = Path(args["output_dir"])
    started = time.time()
    args, lineage = pin_datasets(args, output_dir / PINNED_DIR)
    validation = None
    if options.validation is not None:
        validation, changed = plan_validation(args, options.validation, labeler)
        for record in lineage:
            record.update(changed.get(record["dataset"], {}))
    (output_dir / CURVE_FILE).unlink(missing_ok=True)  # a curve left by an earlier run in this folder
    checkpoint, filesystem, resumed_from, nodes = None, None, 0, None
    if options.workers == 0:
        _train_in_process(args, options.augment, validation)
    else:
        result = _train_on_ray(args, options, validation)
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
        "validation": curve,
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

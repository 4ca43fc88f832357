"""Run a LLaMA-Factory training on Ray Train: one LLaMA-Factory process per worker.

:func:`train_on_ray` builds the ``TorchTrainer`` (gloo on CPU, NCCL on GPU) with the
``ScalingConfig``/``RunConfig`` knobs LLaMA-Factory 0.9.5 dropped; :func:`worker_loop` runs in
each worker: it reports every HF checkpoint to Ray's storage path and waits until Ray Train has
committed it, resumes from the newest one when Ray Train restarts the workers (a lost worker or
node), and reports the final adapter with the workers' placement (``nodes``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llamafactory_ext.augment import install
from llamafactory_ext.run_options import RunOptions
from llamafactory_ext.source import lance_source_of, read_dataset_info
from llamafactory_ext.validation import ValidationPlan


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


def training_callbacks(validation: ValidationPlan | None) -> list[Any]:
    """Return the callbacks every training process adds to LLaMA-Factory's own."""
    if validation is None:
        return []
    from llamafactory_ext.validation import validation_callback

    return [validation_callback(validation)]


def worker_loop(config: dict[str, Any]) -> None:
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
        run_exp(args=args, callbacks=[ReportCheckpoints(), *training_callbacks(config.get("validation"))])
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


def connect_ray() -> None:
    """Join the cluster at ``RAY_ADDRESS`` (or start a local one) unless this process already has."""
    import ray

    if not ray.is_initialized():
        # configure_logging=False: Ray's "Connecting to existing Ray cluster" INFO lines stay out of
        # the CLI's output, whose error is one line
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False, configure_logging=False)


def worker_resources(options: RunOptions) -> dict[str, float]:
    """Return one Ray Train worker's resources: its CPUs, and its GPUs when it has any."""
    resources = {"CPU": options.cpus_per_worker}
    if options.gpus_per_worker > 0:
        resources["GPU"] = options.gpus_per_worker
    return resources


def train_on_ray(args: dict[str, Any], options: RunOptions, validation: ValidationPlan | None) -> Any:
    """Run ``args`` on a Ray Train TorchTrainer; return its result (last checkpoint, last metrics).

    With ``max_failures`` > 0 a lost worker (kill -9, node lost) restarts the worker group, which
    resumes from the last checkpoint reported to ``storage`` (:func:`_resume_from`), not step 0.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    connect_ray()
    use_gpu = options.gpus_per_worker > 0
    resources = worker_resources(options)
    name = options.name or Path(args["output_dir"]).name
    storage = options.storage or str(Path(args["output_dir"]).resolve().parent / "ray_results")
    trainer = TorchTrainer(
        worker_loop,
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

"""Node loss during Ray Train on the three-node cluster of bench/node_loss.py.

The tiny Qwen2-VL (LoRA, built offline) trains on 16 digits with 2 Ray Train workers on 2 nodes
(STRICT_SPREAD, ``max_failures: 2``), checkpoints every ``SAVE_STEPS`` steps to S3
(``lancetag.storage``). Once Ray Train registered a checkpoint (its
``checkpoint_manager_snapshot.json`` names one) and rank 0 logged step ``KILL_STEP`` (half an
interval later), the node of a training worker is killed. Rank 0's ``trainer_log.jsonl`` is
watched all along: the time to recover is from the kill to the first step logged after the
restart, and steps redone = the step logged at the kill - ``resumed_from_step`` (from
``lancetag train --json``).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.nodes import Cluster, job_output, submit, submitted_result, wait_for
from bench.s3_server import S3Server

SAVE_STEPS, MAX_STEPS = 6, 36
KILL_STEP = SAVE_STEPS + SAVE_STEPS // 2  # mid-interval: half an interval past the first checkpoint
REPO = Path(__file__).resolve().parent.parent


class StepLog:
    """Watches rank 0's ``trainer_log.jsonl`` in a thread: (time, step) of every line when it appeared.

    A restarted worker group starts the file again (``overwrite_output_dir``), so a file that
    shrank is read from its start.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.steps = path, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        offset, pending = 0, ""
        while not self._stop.is_set():
            size = self.path.stat().st_size if self.path.exists() else 0
            if size < offset:
                offset, pending = 0, ""
            if size > offset:
                with self.path.open() as f:
                    f.seek(offset)
                    pending += f.read()
                    offset = f.tell()
                *lines, pending = pending.split("\n")
                now = datetime.now(UTC)
                for line in lines:
                    if line.strip():
                        self.steps.append((now, int(json.loads(line).get("current_steps", 0))))
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def last_step(self) -> int:
        return self.steps[-1][1] if self.steps else 0


def train_runs(cluster: Cluster, s3: S3Server, workdir: Path) -> list[dict]:
    """Train undisturbed, then with the node of a training worker killed after a registered checkpoint.

    Each run's figures: ``scenario``, ``status``, ``seconds``, ``recover_s``, ``checks`` (bench/node_loss.py's Outcome).
    """
    from bench.data import digit_images, write_table
    from llamafactory_ext.register import register_dataset
    from serve_apps.tiny_models import build_tiny_model

    model = build_tiny_model("qwen2_vl", workdir / "tiny-qwen2-vl")
    write_table(workdir / "digits.lance", digit_images(16), rows_per_file=8)  # every node sees this machine's disk
    register_dataset(str(workdir / "digits.lance"), "digits", workdir / "data")
    return [_train(cluster, s3, workdir, model, "undisturbed", kill=False),
            _train(cluster, s3, workdir, model, "node-lost", kill=True)]


def registered_step(client, bucket: str, run: str) -> int:  # client: a boto3 S3 client
    """The last checkpoint Ray Train registered (every worker reported it) for the run stored under
    ``s3://bucket/run/``, from its ``checkpoint_manager_snapshot.json``; 0 before any."""
    try:
        snapshot = client.get_object(Bucket=bucket, Key=f"{run}/checkpoint_manager_snapshot.json")
    except client.exceptions.NoSuchKey:
        return 0
    latest = json.loads(snapshot["Body"].read()).get("latest_checkpoint_result")
    found = re.search(r"checkpoint-(\d+)", json.dumps(latest)) if latest else None
    return int(found.group(1)) if found else 0


def _train(cluster: Cluster, s3: S3Server, workdir: Path, model: Path, name: str, *, kill: bool) -> dict:
    import boto3
    import yaml

    options = s3.storage_options
    out = workdir / f"train-{name}"
    config = yaml.safe_load((REPO / "configs" / "train" / "tiny_qwen2_vl_cpu.yaml").read_text())
    endpoint = options["endpoint"].removeprefix("http://")
    config.update(
        model_name_or_path=str(model), dataset_dir=str(workdir / "data"), output_dir=str(out),
        max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS, logging_steps=1,
        lancetag={"workers": 2, "cpus_per_worker": 0.5, "placement_strategy": "STRICT_SPREAD", "max_failures": 2, "name": name,
                  "storage": f"s3://{s3.bucket}/train?endpoint_override={endpoint}&scheme=http"},
    )
    (workdir / f"train-{name}.yaml").write_text(yaml.safe_dump(config))
    env = {"AWS_ACCESS_KEY_ID": options["aws_access_key_id"], "AWS_SECRET_ACCESS_KEY": options["aws_secret_access_key"],
           "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1"}
    bucket = boto3.client("s3", endpoint_url=options["endpoint"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    log = workdir / f"train-{name}.log"
    steps = StepLog(out / "trainer_log.jsonl")
    run = submit(cluster, ["train", str(workdir / f"train-{name}.yaml"), "--json"], log, env)
    killed_at, step_at_kill, registered = None, 0, 0
    try:
        if kill:
            wait_for(lambda: (registered_step(bucket, s3.bucket, f"train/{name}") >= SAVE_STEPS and steps.last_step() >= KILL_STEP)
                     or run.poll() is not None, 600, f"step {KILL_STEP}, past a registered checkpoint on S3")
            if run.poll() is not None:
                raise RuntimeError(f"training ended before a node was killed: {log.read_text()[-3000:]}")
            pids = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
            nodes = [n for n in (cluster.node_of_pid(int(p)) for p in pids) if n in cluster.workers]
            if not nodes:
                raise RuntimeError(f"no Ray Train worker on a worker node: {pids}")
            killed_at = datetime.now(UTC)
            cluster.kill_node(nodes[0])
            step_at_kill, registered = steps.last_step(), registered_step(bucket, s3.bucket, f"train/{name}")
        result = submitted_result(run, log, timeout=900)
    finally:
        steps.stop()
    train = job_output(log, "resumed_from_step") or {}
    resumed = int(train.get("resumed_from_step", 0))
    nodes = train.get("nodes")
    placed = f"; workers by node {sorted(nodes.values(), reverse=True)}" if nodes else ""
    if kill:
        checks = (f"step at the kill {step_at_kill} (registered checkpoint {registered}), resumed_from_step {resumed}: "
                  f"{step_at_kill - resumed} steps redone (save_steps {SAVE_STEPS}){placed}")
        restarted = [t for t, step in steps.steps if killed_at and t > killed_at and step == resumed + 1]
        recover_s = (restarted[0] - killed_at).total_seconds() if restarted else None
    else:
        checks, recover_s = f"{MAX_STEPS} steps, save_steps {SAVE_STEPS}{placed}", None
    seconds = float(train.get("seconds", 0.0))
    return {"scenario": "node of a training worker" if kill else "undisturbed", "status": result["status"],
            "seconds": seconds, "recover_s": recover_s, "checks": checks}

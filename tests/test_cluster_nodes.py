"""A real three-node Ray cluster on this machine (`ray start`: a head and two workers with a
custom resource ``accel_a`` standing in for a GPU type), tables on the moto S3 server, labeling
runs submitted with `lancetag submit`, the labeler deployed with `serve deploy`.

- placement: label tasks spread over the nodes, each commit and the run say which node labeled
  how many rows; the Serve replica goes only to a node with ``accel_a``;
- node loss: kill -9 of the whole worker node hosting the Serve replica mid-run: Serve restarts
  the replica on the other worker, the run goes on; no row lost, none labeled twice;
- a node joining mid-run receives work;
- Serve autoscaling from 1 to 2 replicas under the bounded load generator, and back to 1;
- Ray Train: two workers on two nodes, training table and checkpoints on S3; a worker's node killed:
  the run resumes from its newest checkpoint (at most one interval of steps redone);
- ingest: tasks on several nodes (each commit says which node wrote its rows); a worker node killed
  mid-ingest: every image once;
- the last nodes that can host the replica lost mid-run: the run ends after the labeler timeout
  with ``labeler_unavailable`` (it does not wait forever), keeps what it committed, and a rerun
  finishes once a node with the resource is back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.node_loss_train import registered_step as registered_checkpoint_step
from lance_io import append_images, open_table
from lance_io.versions import list_versions, run_summaries
from ray_jobs.label import label_commits
from ray_jobs.label.placement import NODES_PROPERTY
from tests.cluster_nodes import (
    free_port,
    job_output,
    labeler_config,
    ray_cluster_nodes,
    replica_pids,
    serve_deploy,
    submit,
    submit_label,
    submitted_result,
    wait_for,
    worker_node_running,
)

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.s3]  # a three-node cluster: about 10 min

APP = "cluster-labeler"
LATENCY_MS = 40  # per image: a run of 600 rows lasts ~25 s on one replica


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster_nodes(workers=[{"accel_a": 1}, {"accel_a": 1}]) as nodes:
        nodes.http_port = free_port()  # Serve's HTTP options are fixed once Serve started
        yield nodes


def deploy(cluster, tmp_path: Path, *, autoscaling: dict | None = None) -> None:
    serve_deploy(cluster, labeler_config(APP, cluster.http_port, latency_ms=LATENCY_MS, autoscaling=autoscaling), tmp_path)


def replicas() -> list[int]:
    return replica_pids(APP)


def make_table(s3, name: str, rows: int) -> str:
    from bench.bench_label import digits_rows

    uri = s3.uri(name)
    append_images(uri, digits_rows(0, rows), storage_options=s3.storage_options, max_rows_per_file=25)
    return uri


def labeled(uri: str, s3) -> int:
    ds = open_table(uri, storage_options=s3.storage_options)
    return ds.count_rows(filter="label_provenance IS NOT NULL") if "label_provenance" in ds.schema.names else 0


def label_run(cluster, s3, uri: str, log: Path) -> subprocess.Popen:
    return submit_label(cluster, uri, APP, s3.storage_options, log)


def finished(process: subprocess.Popen, log: Path) -> dict:
    return submitted_result(process, log)


def audit(uri: str, s3, rows: int) -> dict:
    """Every row labeled, each by exactly one commit; each commit's rows by node add up."""
    table = open_table(uri, storage_options=s3.storage_options).to_table(columns=["id", "label_provenance"])
    commits = label_commits(uri, storage_options=s3.storage_options)
    written = sum(int(v.properties["lancetag.rows"]) for v in commits)
    assert table.num_rows == rows and len(set(table["id"].to_pylist())) == rows, "no row lost, no duplicate id"
    assert table["label_provenance"].null_count == 0, "every row labeled"
    assert written == rows, f"label commits wrote {written} rows for {rows}: a row was labeled twice"
    by_node: dict[str, int] = {}
    for v in commits:
        nodes = json.loads(v.properties[NODES_PROPERTY])
        assert sum(nodes.values()) == int(v.properties["lancetag.rows"])
        for node, n in nodes.items():
            by_node[node] = by_node.get(node, 0) + n
    return by_node


def test_serve_replica_is_placed_by_resource_and_label_tasks_spread_over_nodes(cluster, s3, tmp_path):
    deploy(cluster, tmp_path)
    (pid,) = replicas()
    assert cluster.node_of_pid(pid) in cluster.workers, "the replica needs accel_a: only workers have it"

    uri = make_table(s3, "placed.lance", 300)
    result = finished(label_run(cluster, s3, uri, tmp_path / "label.log"), tmp_path / "label.log")
    assert result["status"] == "SUCCEEDED", (tmp_path / "label.log").read_text()[-3000:]

    by_node = audit(uri, s3, 300)
    (summary,) = run_summaries(uri, storage_options=s3.storage_options).values()
    assert summary["nodes"] == by_node, "the run's summary and its commits agree"
    assert set(by_node) <= {n.node_id for n in cluster.nodes}
    assert len(by_node) >= 2, f"label tasks ran on one node only: {by_node}"


def test_killing_the_node_of_the_serve_replica_mid_run_loses_no_row_and_labels_none_twice(cluster, s3, tmp_path):
    deploy(cluster, tmp_path)
    uri = make_table(s3, "node-loss.lance", 600)
    log = tmp_path / "label.log"
    run = label_run(cluster, s3, uri, log)
    wait_for(lambda: labeled(uri, s3) >= 120, 180, "a fifth of the rows labeled")
    (pid,) = replicas()
    victim = cluster.node_of_pid(pid)
    assert victim in cluster.workers
    killed_at = time.monotonic()
    cluster.kill_node(victim)

    result = finished(run, log)
    recovered = time.monotonic() - killed_at
    if result["status"] != "SUCCEEDED":  # allowed: a clear failure, then a rerun completes
        assert "error" in log.read_text() or result["returncode"] != 0
        result = finished(label_run(cluster, s3, uri, tmp_path / "rerun.log"), tmp_path / "rerun.log")
        assert result["status"] == "SUCCEEDED", (tmp_path / "rerun.log").read_text()[-3000:]
    print(f"node killed; run finished {recovered:.1f} s later; first run {result}")

    wait_for(lambda: len(replicas()) == 1, 120, "the replica started again")
    (pid,) = replicas()
    assert cluster.node_of_pid(pid) in cluster.workers and cluster.node_of_pid(pid) is not victim, "replica restarted elsewhere"
    by_node = audit(uri, s3, 600)
    assert victim.node_id not in by_node or by_node[victim.node_id] < 600


def test_a_node_joining_during_a_label_run_receives_work(cluster, s3, tmp_path):
    deploy(cluster, tmp_path)
    uri = make_table(s3, "joining.lance", 600)
    log = tmp_path / "label.log"
    run = label_run(cluster, s3, uri, log)
    wait_for(lambda: labeled(uri, s3) >= 32, 180, "the first commit")
    joined = cluster.add_node({"accel_a": 1})
    result = finished(run, log)
    assert result["status"] == "SUCCEEDED", log.read_text()[-3000:]
    by_node = audit(uri, s3, 600)
    assert by_node.get(joined.node_id, 0) > 0, f"the node that joined labeled nothing: {by_node}"


def test_serve_autoscales_up_under_load_and_down_after(cluster, tmp_path):
    from bench.bench_label import digits_rows
    from bench.load import run_load

    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                   "upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    deploy(cluster, tmp_path, autoscaling=autoscaling)
    images = digits_rows(0, 16)["image"].to_pylist()
    seen: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(len(replicas()))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        report = run_load(f"http://127.0.0.1:{cluster.http_port}", images, clients=8, duration_s=25)
    finally:
        stop.set()
        watcher.join()
    assert max(seen) == 2, f"replicas seen under load: {sorted(set(seen))}"
    assert report.statuses.get(200, 0) > 0
    wait_for(lambda: len(replicas()) == 1, 90, "scale down to one replica after the load")


def test_ray_train_runs_on_two_nodes_and_resumes_within_one_checkpoint_interval_after_a_node_is_lost(
    cluster, s3, tiny_qwen2_vl, tmp_path
):
    """3(c) and placement: two Ray Train workers on two nodes (STRICT_SPREAD), the training table and the
    checkpoints on S3 (nodes share no table path); kill -9 of a node hosting a worker after a checkpoint:
    the job resumes from the newest checkpoint, so the steps redone are at most one checkpoint interval."""
    import boto3
    import lance
    import yaml

    from bench.data import digit_images, image_rows
    from llamafactory_ext.register import register_dataset
    from tests.conftest import REPO_ROOT

    save_steps, max_steps = 6, 36
    table = s3.uri("train-digits.lance")
    lance.write_dataset(image_rows(digit_images(16)), table, storage_options=s3.storage_options, max_rows_per_file=8)
    secrets = {key: f"LANCETAG_TEST_S3_{key.upper()}" for key in s3.storage_options}  # forwarded by name
    env = {**{secrets[k]: v for k, v in s3.storage_options.items()},
           "AWS_ACCESS_KEY_ID": s3.storage_options["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": s3.storage_options["aws_secret_access_key"], "AWS_DEFAULT_REGION": "us-east-1",
           "HF_HUB_OFFLINE": "1"}
    for key, value in s3.storage_options.items():
        os.environ[secrets[key]] = value  # register_dataset opens the table through the same names
    try:
        register_dataset(table, "digits", tmp_path / "data", storage_options_env=secrets)
    finally:
        for name in secrets.values():
            os.environ.pop(name, None)
    config = yaml.safe_load((REPO_ROOT / "configs" / "train" / "tiny_qwen2_vl_cpu.yaml").read_text())
    endpoint = s3.storage_options["endpoint"].removeprefix("http://")
    config.update(
        model_name_or_path=str(tiny_qwen2_vl), dataset_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"),
        max_steps=max_steps, save_strategy="steps", save_steps=save_steps, logging_steps=1,
        lancetag={"workers": 2, "cpus_per_worker": 0.5, "placement_strategy": "STRICT_SPREAD", "max_failures": 2,
                  "name": "resume", "storage": f"s3://{s3.bucket}/train?endpoint_override={endpoint}&scheme=http"},
    )
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    bucket = boto3.client("s3", endpoint_url=s3.storage_options["endpoint"], aws_access_key_id=s3.storage_options["aws_access_key_id"],
                          aws_secret_access_key=s3.storage_options["aws_secret_access_key"], region_name="us-east-1")

    def checkpoint_steps() -> list[int]:
        keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=s3.bucket, Prefix="train/resume/").get("Contents", [])]
        return sorted({int(k.split("checkpoint-")[1].split("/")[0]) for k in keys if "/checkpoint-" in k and k.endswith("trainer_state.json")})

    log = tmp_path / "train.log"
    run = submit(cluster, ["train", str(tmp_path / "train.yaml"), "--json"], log, env)

    def logged_step() -> int:  # rank 0's per-step log (LLaMA-Factory's trainer_log.jsonl)
        path = tmp_path / "out" / "trainer_log.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return max((json.loads(line).get("current_steps", 0) for line in lines if line.strip()), default=0)

    def registered_step() -> int:
        return registered_checkpoint_step(bucket, s3.bucket, "train/resume")

    wait_for(lambda: registered_step() >= save_steps or run.poll() is not None, 400, "training past a checkpoint on S3")
    assert run.poll() is None, log.read_text()[-3000:]
    workers = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
    placed = [cluster.node_of_pid(int(p)) for p in workers]
    assert len(set(placed) - {None}) == 2, f"two Ray Train workers on two nodes: {placed}"
    victim = next(node for node in placed if node in cluster.workers)
    cluster.kill_node(victim)
    step_at_kill = logged_step()

    result = submitted_result(run, log, timeout=600)
    assert result["status"] == "SUCCEEDED", log.read_text()[-4000:]
    (train,) = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{") and "resumed_from_step" in line]
    redone = step_at_kill - train["resumed_from_step"]
    print(f"killed at step {step_at_kill}; resumed from step {train['resumed_from_step']} ({redone} steps redone, "
          f"interval {save_steps}); {train['seconds']} s; workers by node after the restart {train['nodes']}")
    assert train["resumed_from_step"] >= save_steps, "resumed from a checkpoint, not step 0"
    assert 0 <= redone <= save_steps, f"{redone} steps redone: more than one checkpoint interval ({save_steps})"
    assert len(train["nodes"]) == 2 and victim.node_id not in train["nodes"], "restarted on two surviving nodes"
    assert set(train["nodes"]) <= {n.node_id for n in cluster.nodes}
    lineage = json.loads((tmp_path / "out" / "lancetag_lineage.json").read_text())
    assert lineage["nodes"] == train["nodes"] and lineage["datasets"][0]["uri"] == table

    assert train["checkpoint"].startswith(f"s3://{s3.bucket}/train/resume/")
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == max_steps
    assert checkpoint_steps()[-1] == max_steps


def test_killing_a_worker_node_mid_ingest_loses_no_image_and_adds_none_twice(cluster, s3, tmp_path):
    """3(a): the source on S3 (nodes share no paths), the table on S3, `lancetag submit -- ingest`;
    kill -9 of a worker node while it runs an ingest task: Ray runs the task again elsewhere."""
    import boto3

    from tests.ingest_fixtures import image_bytes

    images = 4_000
    client = boto3.client("s3", endpoint_url=s3.storage_options["endpoint"], region_name="us-east-1",
                          aws_access_key_id=s3.storage_options["aws_access_key_id"],
                          aws_secret_access_key=s3.storage_options["aws_secret_access_key"])
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: client.put_object(Bucket=s3.bucket, Key=f"nl/{n:05d}.png",
                                                  Body=image_bytes(n, "PNG", size=(8, 8))), range(images)))
    serve = Path(sys.executable).parent / "serve"  # the labeler of earlier tests holds the workers' CPUs
    subprocess.run([str(serve), "shutdown", "--address", cluster.jobs_address, "-y"], env=cluster.env,
                   capture_output=True, timeout=120, check=False)
    while len(cluster.workers) < 2:  # earlier tests killed workers: one to kill, one to go on beside the head
        cluster.add_node({"accel_a": 1})
    uri = s3.uri("ingest-node-loss.lance")
    log = tmp_path / "ingest.log"
    args = ["ingest", f"s3://{s3.bucket}/nl/", "--table", uri, "--commit-rows", "500", "--commit-seconds", "2", "--json"]
    env = {"LANCETAG_STORAGE_OPTIONS": json.dumps(s3.storage_options)}
    run = submit(cluster, args, log, env)
    victim = None
    deadline = time.monotonic() + 240
    while victim is None and run.poll() is None and time.monotonic() < deadline:
        victim = worker_node_running(cluster, "validate_and_write")
        time.sleep(0.05)
    assert victim is not None, f"no ingest task seen on a worker node: {log.read_text()[-3000:]}"
    cluster.kill_node(victim)

    result = finished(run, log)
    if result["status"] != "SUCCEEDED":  # allowed: a clear failure, then a rerun completes
        result = finished(submit(cluster, args, tmp_path / "rerun.log", env), tmp_path / "rerun.log")
        assert result["status"] == "SUCCEEDED", (tmp_path / "rerun.log").read_text()[-3000:]
    table = open_table(uri, storage_options=s3.storage_options)
    table.validate()
    rows = table.to_table(columns=["id", "source"])
    assert rows.num_rows == images, "every image once: none lost, none twice"
    assert len(set(rows["id"].to_pylist())) == len(set(rows["source"].to_pylist())) == images
    by_node: dict[str, int] = {}
    for version in list_versions(uri, storage_options=s3.storage_options):
        for node, n in json.loads(version.properties.get("lancetag.rows_by_node", "{}")).items():
            by_node[node] = by_node.get(node, 0) + n
    assert sum(by_node.values()) == images, "each commit says which node wrote its rows"
    assert len(by_node) >= 2 and set(by_node) <= {n.node_id for n in cluster.nodes}, f"ingest on one node: {by_node}"
    print(f"ingest node loss: killed {victim.name} ({victim.node_id[:8]}); {result}")


def test_losing_every_node_that_can_host_the_replica_ends_the_run_after_the_timeout_and_a_rerun_finishes(
    cluster, s3, tmp_path
):
    timeout_s = 20
    while len(cluster.workers) < 2:
        cluster.add_node({"accel_a": 1})
    deploy(cluster, tmp_path)
    uri = make_table(s3, "last-node.lance", 600)
    log = tmp_path / "label.log"
    run = submit_label(cluster, uri, APP, s3.storage_options, log, "--labeler-timeout", str(timeout_s))
    wait_for(lambda: labeled(uri, s3) >= 120, 180, "a fifth of the rows labeled")
    killed_at = time.monotonic()
    for node in list(cluster.workers):  # the head has no accel_a: no replica can run anywhere now
        cluster.kill_node(node)

    result = finished(run, log)
    ended_after = time.monotonic() - killed_at
    summary = job_output(log, "errors")
    assert result["status"] == "FAILED" and summary is not None, log.read_text()[-3000:]
    # no answer in time (the usual end), or the replica's death seen by every retry: either ends the run
    assert summary["errors"] and set(summary["errors"]) <= {"labeler_unavailable", "labeler_unreachable"}, summary
    assert ended_after < timeout_s + 60, f"the run ended {ended_after:.0f} s after the last replica's node was lost"
    kept = labeled(uri, s3)
    assert kept >= 120 and kept == summary["labeled"] < 600, "what was committed before stays, the rest is todo"
    print(f"all accel_a nodes killed; run ended {ended_after:.1f} s later: {summary}")

    cluster.add_node({"accel_a": 1})
    rerun_log = tmp_path / "rerun.log"
    rerun = finished(submit_label(cluster, uri, APP, s3.storage_options, rerun_log), rerun_log)
    assert rerun["status"] == "SUCCEEDED", rerun_log.read_text()[-3000:]
    assert job_output(rerun_log, "errors")["labeled"] == 600 - kept
    audit(uri, s3, 600)

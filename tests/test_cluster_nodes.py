"""A real three-node Ray cluster on this machine (`ray start`: a head and two workers with a
custom resource ``accel_a`` standing in for a GPU type), tables on the moto S3 server, labeling
runs submitted with `lancetag submit`, the labeler deployed with `serve deploy`.

- placement: label tasks spread over the nodes, each commit and the run say which node labeled
  how many rows; the Serve replica goes only to a node with ``accel_a``;
- node loss: kill -9 of the whole worker node hosting the Serve replica mid-run: Serve restarts
  the replica on the other worker, the run goes on; no row lost, none labeled twice;
- a node joining mid-run receives work;
- Serve autoscaling from 1 to 2 replicas under the bounded load generator, and back to 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lance_io import append_images, open_table
from lance_io.versions import run_summaries
from ray_jobs.label import label_commits
from ray_jobs.label.placement import NODES_PROPERTY
from tests.conftest import LANCETAG
from tests.ray_head import free_port

pytestmark = [pytest.mark.slow, pytest.mark.s3]

APP = "cluster-labeler"
REPLICA_TITLE = f"ray::ServeReplica:{APP}"
LATENCY_MS = 40  # per image: a run of 600 rows lasts ~25 s on one replica


@pytest.fixture(scope="module")
def cluster():
    from tests.cluster_nodes import ray_cluster_nodes

    with ray_cluster_nodes(workers=[{"accel_a": 1}, {"accel_a": 1}]) as nodes:
        nodes.http_port = free_port()  # Serve's HTTP options are fixed once Serve started
        yield nodes


def serve_config(http_port: int, *, autoscaling: dict | None = None) -> dict:
    """The shipped config's shape (configs/serve): a random-backend labeler placed by ``accel_a``."""
    deployment: dict = {
        "name": "Labeler",
        "max_ongoing_requests": 8,
        "max_queued_requests": 256,
        "ray_actor_options": {"num_cpus": 0.25, "resources": {"accel_a": 1}},
    }
    deployment.update({"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": 1})
    return {
        "proxy_location": "HeadOnly",  # every node is 127.0.0.1 here: one HTTP proxy, on the head
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "serve_apps.deploy:app",
                "args": {
                    "task": "digits",
                    "backend": {"kind": "random", "model": "random", "batch_size": 8, "options": {"latency_ms": LATENCY_MS}},
                    "max_batch_size": 8,
                },
                "deployments": [deployment],
            }
        ],
    }


def serve_deploy(cluster, tmp_path: Path, *, autoscaling: dict | None = None) -> None:
    config = serve_config(cluster.http_port, autoscaling=autoscaling)
    path = tmp_path / "serve.json"  # JSON is YAML
    path.write_text(json.dumps(config))
    serve = Path(sys.executable).parent / "serve"
    subprocess.run([str(serve), "deploy", str(path), "--address", cluster.jobs_address], check=True, env=cluster.env,
                   capture_output=True, timeout=120)
    wait_for(lambda: len(replica_pids()) == 1, 120, "one labeler replica")


def replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", REPLICA_TITLE], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.2)


def make_table(s3, name: str, rows: int) -> str:
    from bench.bench_label import digits_rows

    uri = s3.uri(name)
    append_images(uri, digits_rows(0, rows), storage_options=s3.storage_options, max_rows_per_file=25)
    return uri


def labeled(uri: str, s3) -> int:
    ds = open_table(uri, storage_options=s3.storage_options)
    return ds.count_rows(filter="label_provenance IS NOT NULL") if "label_provenance" in ds.schema.names else 0


def submit_label(cluster, s3, uri: str, log: Path) -> subprocess.Popen:
    env = {**cluster.env, "LANCETAG_STORAGE_OPTIONS": json.dumps(s3.storage_options)}
    command = [LANCETAG, "submit", "--address", cluster.jobs_address, "--env", "LANCETAG_STORAGE_OPTIONS", "--wait",
               "--json", "--", "label", uri, "--task", "digits", "--app", APP, "--concurrency", "2",
               "--batch-size", "8", "--commit-rows", "32", "--commit-seconds", "2", "--json"]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen, log: Path, timeout: float = 300) -> dict:
    process.wait(timeout=timeout)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines, log.read_text()[-3000:]
    return {**json.loads(lines[-1]), "returncode": process.returncode}


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
    serve_deploy(cluster, tmp_path)
    (pid,) = replica_pids()
    assert cluster.node_of_pid(pid) in cluster.workers, "the replica needs accel_a: only workers have it"

    uri = make_table(s3, "placed.lance", 300)
    result = finished(submit_label(cluster, s3, uri, tmp_path / "label.log"), tmp_path / "label.log")
    assert result["status"] == "SUCCEEDED", (tmp_path / "label.log").read_text()[-3000:]

    by_node = audit(uri, s3, 300)
    (summary,) = run_summaries(uri, storage_options=s3.storage_options).values()
    assert summary["nodes"] == by_node, "the run's summary and its commits agree"
    assert set(by_node) <= {n.node_id for n in cluster.nodes}
    assert len(by_node) >= 2, f"label tasks ran on one node only: {by_node}"


def test_killing_the_node_of_the_serve_replica_mid_run_loses_no_row_and_labels_none_twice(cluster, s3, tmp_path):
    serve_deploy(cluster, tmp_path)
    uri = make_table(s3, "node-loss.lance", 600)
    log = tmp_path / "label.log"
    run = submit_label(cluster, s3, uri, log)
    wait_for(lambda: labeled(uri, s3) >= 120, 180, "a fifth of the rows labeled")
    (pid,) = replica_pids()
    victim = cluster.node_of_pid(pid)
    assert victim in cluster.workers
    killed_at = time.monotonic()
    cluster.kill_node(victim)

    result = finished(run, log)
    recovered = time.monotonic() - killed_at
    if result["status"] != "SUCCEEDED":  # allowed: a clear failure, then a rerun completes
        assert "error" in log.read_text() or result["returncode"] != 0
        result = finished(submit_label(cluster, s3, uri, tmp_path / "rerun.log"), tmp_path / "rerun.log")
        assert result["status"] == "SUCCEEDED", (tmp_path / "rerun.log").read_text()[-3000:]
    print(f"node killed; run finished {recovered:.1f} s later; first run {result}")

    wait_for(lambda: len(replica_pids()) == 1, 120, "the replica started again")
    (pid,) = replica_pids()
    assert cluster.node_of_pid(pid) in cluster.workers and cluster.node_of_pid(pid) is not victim, "replica restarted elsewhere"
    by_node = audit(uri, s3, 600)
    assert victim.node_id not in by_node or by_node[victim.node_id] < 600


def test_a_node_joining_during_a_label_run_receives_work(cluster, s3, tmp_path):
    serve_deploy(cluster, tmp_path)
    uri = make_table(s3, "joining.lance", 600)
    log = tmp_path / "label.log"
    run = submit_label(cluster, s3, uri, log)
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
    serve_deploy(cluster, tmp_path, autoscaling=autoscaling)
    images = digits_rows(0, 16)["image"].to_pylist()
    seen: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(len(replica_pids()))
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
    wait_for(lambda: len(replica_pids()) == 1, 90, "scale down to one replica after the load")

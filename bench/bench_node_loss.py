"""Node loss on a real three-node Ray cluster: time to recover and to finish a labeling run.

A head and two worker nodes started with `ray start` on this machine (1 CPU each; the workers
carry ``accel_a``, the Serve labeler's placement resource), the table on a local S3-compatible
server (moto), the labeler deployed with `serve deploy` (random backend, 40 ms per image as a
model's inference time), each run submitted with `lancetag submit`. Scenarios:

- undisturbed run;
- kill -9 of the worker node hosting the Serve replica once 20% of the rows are labeled (Serve
  starts the replica on the other worker; label tasks on the lost node run again);
- a node added back, then kill -9 of a worker node that hosts no replica, only label tasks.

Time to recover = from the kill to the next label commit; time to finish = the job's own
``seconds`` (its run summary), plus a rerun's if the run failed. Rows lost and rows labeled twice
come from the table and the commit audit (``lancetag.rows`` of every label commit).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from bench.bench_label import digits_rows
from bench.nodes import (
    Cluster,
    free_port,
    labeler_config,
    ray_cluster_nodes,
    replica_pids,
    serve_deploy,
    submit_label,
    submitted_result,
    wait_for,
)
from bench.report import Section
from bench.s3_server import s3_server

N_ROWS = 600
APP = "bench-node-loss"
LATENCY_MS = 40


def _labeled(uri: str, options: dict[str, str]) -> int:
    from lance_io import open_table

    ds = open_table(uri, storage_options=options)
    return ds.count_rows(filter="label_provenance IS NOT NULL") if "label_provenance" in ds.schema.names else 0


def _scenario(cluster: Cluster, uri: str, options: dict[str, str], workdir: Path, victim: str | None) -> dict:
    """Label ``uri``; kill the ``victim`` node ("replica" or "tasks") at 20% labeled; return the figures."""
    from lance_io import append_images, open_table
    from lance_io.versions import run_summaries
    from ray_jobs.label import label_commits

    append_images(uri, digits_rows(0, N_ROWS), storage_options=options, max_rows_per_file=25)
    log = workdir / f"{uri.rsplit('/', 1)[-1]}.log"
    run = submit_label(cluster, uri, APP, options, log)
    killed_at = None
    if victim is not None:
        wait_for(lambda: _labeled(uri, options) >= N_ROWS // 5, 300, "20% of the rows labeled")
        (pid,) = replica_pids(APP)
        hosting = cluster.node_of_pid(pid)
        node = hosting if victim == "replica" else next(n for n in cluster.workers if n is not hosting)
        killed_at = datetime.now(UTC)
        cluster.kill_node(node)
    result = submitted_result(run, log)
    reruns = 0
    if result["status"] != "SUCCEEDED":
        reruns = 1
        result = submitted_result(submit_label(cluster, uri, APP, options, log.with_suffix(".rerun.log")),
                                  log.with_suffix(".rerun.log"))
    seconds = sum(float(s["seconds"]) for s in run_summaries(uri, storage_options=options).values())
    commits = label_commits(uri, storage_options=options)
    after = [v.timestamp.astimezone(UTC) for v in commits if killed_at and v.timestamp.astimezone(UTC) > killed_at]
    written = sum(int(v.properties.get("lancetag.rows", 0)) for v in commits)
    table = open_table(uri, storage_options=options).to_table(columns=["id"])
    return {
        "status": result["status"],
        "reruns": reruns,
        "seconds": seconds,
        "recover_s": (min(after) - killed_at).total_seconds() if after and killed_at else None,
        "lost": N_ROWS - _labeled(uri, options),
        "twice": written - N_ROWS,
        "duplicate_ids": table.num_rows - len(set(table["id"].to_pylist())),
        "nodes": len({n for s in run_summaries(uri, storage_options=options).values() for n in s.get("nodes", {})}),
    }


def run(workdir: Path) -> Section:
    """Label 600 rows on a 3-node cluster undisturbed, then with each kind of worker node lost mid-run."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with s3_server("bench") as s3, ray_cluster_nodes(workers=[{"accel_a": 1}, {"accel_a": 1}]) as cluster:
        options = s3.storage_options
        serve_deploy(cluster, labeler_config(APP, free_port(), latency_ms=LATENCY_MS), workdir)
        _scenario(cluster, "s3://bench/warm-up.lance", options, workdir, None)  # job start-up paid once
        base = _scenario(cluster, "s3://bench/undisturbed.lance", options, workdir, None)
        replica = _scenario(cluster, "s3://bench/replica-node.lance", options, workdir, "replica")
        cluster.add_node({"accel_a": 1})
        tasks = _scenario(cluster, "s3://bench/task-node.lance", options, workdir, "tasks")

    def line(name: str, r: dict) -> str:
        recover = f"{r['recover_s']:.1f} s" if r["recover_s"] is not None else "-"
        return (f"| {name} | {r['status']}{' after a rerun' if r['reruns'] else ''} | {recover} | {r['seconds']:.1f} s "
                f"({r['seconds'] / base['seconds']:.2f}x) | {r['lost']} | {r['twice']} | {r['duplicate_ids']} | {r['nodes']} |")

    md = f"""
{N_ROWS} real digit images on a local S3 server (moto) in fragments of 25 rows; a Ray cluster of three
`ray start` nodes on this machine (head + 2 workers, 1 CPU each, the workers with `accel_a`); one Serve
labeler replica placed by `resources: {{accel_a: 1}}` (random backend, {LATENCY_MS} ms per image standing in
for a model); each run submitted with `lancetag submit`, 2 label tasks at once (SPREAD), a commit every
32 rows or 2 s. A node is killed (SIGKILL to all its processes: raylet, object store, workers) once 20% of
the rows are labeled. Time to recover = kill to the next label commit; time to finish = the job's own time.

| scenario | job | time to recover | time to finish (vs undisturbed) | rows lost | rows labeled twice | duplicate ids | nodes that labeled |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |
{line("undisturbed", base)}
{line("worker node of the Serve replica killed", replica)}
{line("worker node with label tasks only killed", tasks)}

The replica's node: Serve starts the replica on the other `accel_a` worker once Ray marks the node dead;
label requests to the dead replica fail with an actor error and the client asks again (the new replica
answers). Label tasks on a lost node end with a worker/node error; the driver commits what they sent and
runs their fragments again (rows still todo only).
"""
    return Section("Node loss on a three-node cluster (labeling)", md)

"""Node loss on a real three-node Ray cluster, for each job kind: labeling, ingest, Ray Train.

A head and two worker nodes started with `ray start` on this machine (1 CPU each; the workers
carry ``accel_a``, the Serve labeler's placement resource), tables and sources on a local
S3-compatible server (moto), every job submitted with `lancetag submit`. Each kind runs once
undisturbed and once with a worker node killed (SIGKILL to every process of the node) mid-run;
a killed node is replaced before the next kind, so every kind starts on head + 2 workers.

- labeling: the worker node of the Serve replica, then a worker node with label tasks only,
  then every node that can host the replica (``--labeler-timeout 20``: the run must end, not
  wait), killed once 20% of the rows are labeled (labeler: random backend, 40 ms per image);
- ingest: the worker node running an ingest task (``validate_and_write``) killed;
- Ray Train: the worker node of a training worker killed after Ray Train registered a
  checkpoint (bench/node_loss_train.py).

Used by ``python -m bench faults`` (bench/bench_faults.py), which adds this table to its section.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.nodes import (
    RAY_BIN,
    Cluster,
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
from bench.s3_server import S3Server, s3_server

KINDS = ("label", "ingest", "train")
LABEL_ROWS = 600
LABEL_APP = "bench-node-loss"
LATENCY_MS = 40
INGEST_IMAGES = 4_000
LABELER_TIMEOUT_S = 20  # of the run that loses every node able to host the replica


@dataclass
class Outcome:
    """One run: which job kind, what was killed, how it ended, how long it took, what it lost or redid."""

    kind: str
    scenario: str
    status: str
    seconds: float
    recover_s: float | None
    checks: str


def run_node_loss(workdir: Path, kinds: tuple[str, ...] = KINDS) -> list[Outcome]:
    """Run the undisturbed and node-loss scenarios of ``kinds`` on one three-node cluster; return their outcomes."""
    from bench.node_loss_train import train_runs

    outcomes: list[Outcome] = []
    workdir.mkdir(parents=True, exist_ok=True)
    with s3_server("bench") as s3, ray_cluster_nodes(workers=[{"accel_a": 1}, {"accel_a": 1}]) as cluster:
        if "label" in kinds:
            outcomes += _label_runs(cluster, s3, workdir)
        if "ingest" in kinds:
            _two_workers(cluster)
            outcomes += _ingest_runs(cluster, s3, workdir)
        if "train" in kinds:
            _two_workers(cluster)
            outcomes += [Outcome("Ray Train", **figures) for figures in train_runs(cluster, s3, workdir)]
    return outcomes


def _two_workers(cluster: Cluster) -> None:
    """Add worker nodes until two are alive (a scenario before killed one)."""
    while len(cluster.workers) < 2:
        cluster.add_node({"accel_a": 1})


def _after(killed_at: datetime | None, times: list[datetime]) -> float | None:
    """Seconds from the kill to the first of ``times`` after it."""
    later = [t for t in times if killed_at and t > killed_at]
    return (min(later) - killed_at).total_seconds() if later and killed_at else None


# Labeling


def _labeled(uri: str, options: dict[str, str]) -> int:
    from lance_io import open_table

    ds = open_table(uri, storage_options=options)
    return ds.count_rows(filter="label_provenance IS NOT NULL") if "label_provenance" in ds.schema.names else 0


def _label_runs(cluster: Cluster, s3: S3Server, workdir: Path) -> list[Outcome]:
    serve_deploy(cluster, labeler_config(LABEL_APP, free_port(), latency_ms=LATENCY_MS), workdir)
    _label(cluster, s3, workdir, "warm-up", None)  # job start-up paid once
    runs = [_label(cluster, s3, workdir, "undisturbed", None), _label(cluster, s3, workdir, "replica-node", "replica")]
    cluster.add_node({"accel_a": 1})
    runs.append(_label(cluster, s3, workdir, "task-node", "tasks"))
    _two_workers(cluster)
    runs.append(_label(cluster, s3, workdir, "last-nodes", "all"))
    serve = RAY_BIN.parent / "serve"  # the replica holds a quarter of a worker's CPU: free it for the next kinds
    subprocess.run([str(serve), "shutdown", "--address", cluster.jobs_address, "-y"], env=cluster.env,
                   capture_output=True, timeout=120, check=False)
    return runs


def _label(cluster: Cluster, s3: S3Server, workdir: Path, name: str, victim: str | None) -> Outcome:
    """Label a table; kill the ``victim`` node(s) ("replica", "tasks" or "all" the workers) at 20% labeled."""
    from bench.bench_label import digits_rows
    from lance_io import append_images, open_table
    from lance_io.versions import run_summaries
    from ray_jobs.label import label_commits

    uri, options = s3.uri(f"label-{name}.lance"), s3.storage_options
    append_images(uri, digits_rows(0, LABEL_ROWS), storage_options=options, max_rows_per_file=25)
    log = workdir / f"label-{name}.log"
    extra = ("--labeler-timeout", str(LABELER_TIMEOUT_S)) if victim == "all" else ()
    run = submit_label(cluster, uri, LABEL_APP, options, log, *extra)
    killed_at = None
    if victim is not None:
        wait_for(lambda: _labeled(uri, options) >= LABEL_ROWS // 5, 300, "20% of the rows labeled")
        (pid,) = replica_pids(LABEL_APP)
        hosting = cluster.node_of_pid(pid)
        other = next(n for n in cluster.workers if n is not hosting)
        nodes = {"replica": [hosting], "tasks": [other], "all": list(cluster.workers)}[victim]
        killed_at = datetime.now(UTC)
        for node in nodes:
            cluster.kill_node(node)
    result = submitted_result(run, log)
    status = result["status"]
    if status != "SUCCEEDED":
        ended = job_output(log, "errors") or {}
        after = f" {(datetime.now(UTC) - killed_at).total_seconds():.0f} s after the kill" if killed_at else ""
        status = f"{status} ({', '.join(ended.get('errors', {})) or 'no summary'}){after}, then "
        _two_workers(cluster)  # the rerun: with a node able to host the replica
        rerun = log.with_suffix(".rerun.log")
        status += f"{submitted_result(submit_label(cluster, uri, LABEL_APP, options, rerun), rerun)['status']} after a rerun"
    seconds = sum(float(s["seconds"]) for s in run_summaries(uri, storage_options=options).values())
    commits = label_commits(uri, storage_options=options)
    written = sum(int(v.properties.get("lancetag.rows", 0)) for v in commits)
    ids = open_table(uri, storage_options=options).to_table(columns=["id"])["id"].to_pylist()
    checks = (f"{LABEL_ROWS - _labeled(uri, options)} rows lost, {written - LABEL_ROWS} labeled twice, "
              f"{len(ids) - len(set(ids))} duplicate ids")
    scenario = {None: "undisturbed", "replica": "worker node of the Serve replica", "tasks": "worker node with label tasks only",
                "all": "every node able to host the replica (both workers)"}
    # With every worker lost nothing recovers by itself: the next commit is the ending run's last one.
    recover = None if victim == "all" else _after(killed_at, [v.timestamp.astimezone(UTC) for v in commits])
    return Outcome("labeling", scenario[victim], status, seconds, recover, checks)


# Ingest


def _ingest_runs(cluster: Cluster, s3: S3Server, workdir: Path) -> list[Outcome]:
    import boto3

    from bench.data import png_bytes

    images = [png_bytes(n, size=8) for n in range(INGEST_IMAGES)]
    assert len(set(images)) == INGEST_IMAGES, "every source image distinct"
    options = s3.storage_options
    client = boto3.client("s3", endpoint_url=options["endpoint"], region_name="us-east-1",
                          aws_access_key_id=options["aws_access_key_id"], aws_secret_access_key=options["aws_secret_access_key"])
    warm = [png_bytes(INGEST_IMAGES + n, size=8) for n in range(200)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: client.put_object(Bucket=s3.bucket, Key=f"ingest/{n:05d}.png", Body=images[n]),
                      range(INGEST_IMAGES)))
        list(pool.map(lambda n: client.put_object(Bucket=s3.bucket, Key=f"warm/{n:05d}.png", Body=warm[n]), range(200)))
    _ingest(cluster, s3, workdir, "warm-up", kill=False, prefix="warm/")  # job start-up paid once
    base = _ingest(cluster, s3, workdir, "undisturbed", kill=False)
    return [base, _ingest(cluster, s3, workdir, "node-lost", kill=True)]


def _ingest(cluster: Cluster, s3: S3Server, workdir: Path, name: str, *, kill: bool, prefix: str = "ingest/") -> Outcome:
    """Ingest the S3 ``prefix`` into a new table; with ``kill``, kill -9 a worker node while it runs an ingest task."""
    from lance_io import open_table
    from lance_io.versions import list_versions

    uri, options = s3.uri(f"ingest-{name}.lance"), s3.storage_options
    args = ["ingest", f"s3://{s3.bucket}/{prefix}", "--table", uri, "--commit-rows", "500", "--commit-seconds", "2", "--json"]
    env = {"LANCETAG_STORAGE_OPTIONS": json.dumps(options)}
    log = workdir / f"ingest-{name}.log"
    run, submitted = submit(cluster, args, log, env), time.monotonic()
    killed_at, kill_s = None, 0.0
    if kill:
        victim = None
        deadline = time.monotonic() + 240
        while victim is None and run.poll() is None and time.monotonic() < deadline:
            victim = worker_node_running(cluster, "validate_and_write")
            time.sleep(0.05)
        if victim is None:
            raise RuntimeError(f"no ingest task seen on a worker node: {log.read_text()[-3000:]}")
        killed_at, kill_s = datetime.now(UTC), time.monotonic() - submitted
        cluster.kill_node(victim)
    result = submitted_result(run, log, timeout=600)
    status, summaries = result["status"], [job_output(log, "images_per_s")]
    if status != "SUCCEEDED":
        rerun = log.with_suffix(".rerun.log")
        status = f"{submitted_result(submit(cluster, args, rerun, env), rerun, timeout=600)['status']} after a rerun"
        summaries.append(job_output(rerun, "images_per_s"))
    seconds = sum(float(s["seconds"]) for s in summaries if s)
    versions = list_versions(uri, storage_options=options)
    by_node: dict[str, int] = {}
    for version in versions:
        for node, n in json.loads(version.properties.get("lancetag.rows_by_node", "{}")).items():
            by_node[node] = by_node.get(node, 0) + n
    ids = open_table(uri, storage_options=options).to_table(columns=["id"])["id"].to_pylist()
    checks = f"{INGEST_IMAGES - len(set(ids))} images lost, {len(ids) - len(set(ids))} duplicate ids"
    checks += f"; rows written by node {sorted(by_node.values(), reverse=True)}" if by_node else ""
    checks += f"; killed {kill_s:.1f} s after the submit" if kill else ""
    return Outcome("ingest", "worker node running an ingest task" if kill else "undisturbed", status, seconds,
                   _after(killed_at, [v.timestamp.astimezone(UTC) for v in versions]), checks)


def node_loss_markdown(outcomes: list[Outcome]) -> str:
    """The node-loss table and how it was measured, for the kinds in ``outcomes``."""
    base = {o.kind: o.seconds for o in outcomes if o.scenario == "undisturbed"}
    lines = []
    for o in outcomes:
        recover = f"{o.recover_s:.1f} s" if o.recover_s is not None else "-"
        ratio = f" ({o.seconds / base[o.kind]:.2f}x)" if base.get(o.kind) else ""
        lines.append(f"| {o.kind} | {o.scenario} | {o.status} | {recover} | {o.seconds:.1f} s{ratio} | {o.checks} |")
    kinds = {o.kind for o in outcomes}
    setup = {
        "labeling": f"**labeling**: {LABEL_ROWS} real digit images in fragments of 25 rows, one Serve labeler replica "
        f"placed by `resources: {{accel_a: 1}}` (random backend, {LATENCY_MS} ms per image standing in for a model), "
        "2 label tasks at once (SPREAD), a commit every 32 rows or 2 s; the node killed once 20% of the rows are "
        "labeled. Time to recover = kill to the next label commit. When every worker is killed, no node can host "
        f"the replica: that run has `--labeler-timeout {LABELER_TIMEOUT_S}`, must end by itself (status and time "
        "from the kill in the table), and is rerun once a worker with `accel_a` is back.",
        "ingest": f"**ingest**: {INGEST_IMAGES:,} distinct 8x8 PNGs on S3 (`lancetag submit -- ingest s3://bench/ingest/ "
        "--commit-rows 500 --commit-seconds 2`), tasks SPREAD over the nodes; the worker node killed while it runs an "
        "ingest task (`validate_and_write`). Time to recover = kill to the next commit (Lance version) of the table.",
        "Ray Train": "**Ray Train**: the tiny Qwen2-VL (LoRA) on 16 digits, 2 workers of 0.5 CPU on 2 nodes "
        "(`STRICT_SPREAD`), `max_failures: 2`, a checkpoint every 6 steps to S3 (`lancetag.storage`), 36 steps; the node "
        "of a training worker killed once Ray Train registered the checkpoint of step 6 and rank 0 logged step 9 or "
        "later (the step at the kill is in the table). Time to recover = kill to the first step logged after the restart "
        "(rank 0's `trainer_log.jsonl`). Steps redone = step at the kill - `resumed_from_step`.",
    }
    return f"""
A Ray cluster of three `ray start` nodes on this machine (head + 2 workers, 1 CPU each, the workers
with `accel_a`), sources and tables on a local S3 server (moto), every job submitted with `lancetag
submit`. Each kind runs undisturbed, then with a worker node killed (SIGKILL to all its processes:
raylet, object store, workers) mid-run; a killed node is replaced before the next kind. Time to
finish = the job's own time (its `--json` `seconds`; a rerun's added if the first run failed).

{chr(10).join(f"- {text}" for kind, text in setup.items() if kind in kinds)}

| job | node killed | job status | time to recover | time to finish (vs undisturbed) | lost, twice, redone |
| --- | --- | --- | ---: | ---: | --- |
{chr(10).join(lines)}

What happens: Serve starts a lost replica again on the other `accel_a` worker once Ray marks the
node dead, and the label client asks the dead replica's requests again (with no node left that can
host it, the first request unanswered after `--labeler-timeout` ends the run with
`labeler_unavailable`, its committed rows kept); label tasks lost with a node
end with a worker/node error, the driver commits what they sent and runs their fragments again (rows
still todo only); ingest tasks lost with a node are run again by Ray on the nodes left (files they had
written are in no version); Ray Train restarts its worker group on the nodes left (`max_failures`)
from the last checkpoint it committed.

Every node here shares this machine's 2 cores: a lost node takes away no real CPU, so the time to
finish after a loss is the undisturbed time plus the work redone and the time Ray takes to declare
the node dead, less what three nodes' processes cost each other. On a real cluster the lost node's
share of the work is added too. Runs of 25-40 s on a 2-core machine vary from run to run: read the
ratios as rough.
"""

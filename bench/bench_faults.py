"""Time to recover from kill -9, of one process and of a whole node, with the exactly-once audits.

Processes: one table of real digit images, one tiny-model labeler, a local Ray cluster. For each
victim (the Serve replica, a tagging worker, the job's driver) a run is started, the victim is
killed once a fifth of the rows are labeled, and the run is completed (Ray and Serve restart what
they own; a killed driver is rerun). Measured: the time from the kill to the next label commit
(time to recover), the time to finish against an undisturbed run, rows lost and rows labeled twice
(the sum of the rows every label commit wrote, against the table's rows).

Nodes: a real three-node cluster, a worker node killed during labeling, ingest and Ray Train
(bench/node_loss.py). ``BENCH_FAULTS=process,label,ingest,train`` (the default: all) picks parts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.bench_label import digits_rows
from bench.node_loss import KINDS, node_loss_markdown, run_node_loss
from bench.report import Section
from lance_io import append_images, open_table
from ray_jobs.label import label_commits

N_ROWS = 960
APP = "bench-faults"
VICTIMS = {"serve replica": f"ray::ServeReplica:{APP}", "tagging worker": "ray::label_fragments", "job driver": None}


def _labeled(uri: str) -> int:
    ds = open_table(uri)
    return ds.count_rows(filter="label_provenance IS NOT NULL") if "label_provenance" in ds.schema.names else 0


def _label_commits(uri: str) -> list[tuple[datetime, int]]:
    """(time, rows written) of every label commit, oldest first."""
    return [(v.timestamp.astimezone(UTC), int(v.properties.get("lancetag.rows", 0))) for v in label_commits(uri)]


def _kill(title: str, timeout: float = 10) -> int:
    """SIGKILL the processes whose title contains ``title``, waiting up to ``timeout`` for one to exist
    (a Ray worker is titled after its task only while it runs one)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [int(p) for p in subprocess.run(["pgrep", "-f", title], capture_output=True, text=True).stdout.split()]
        if pids or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


def _wait_for(uri: str, rows: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _labeled(uri) < rows:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{uri} did not reach {rows} labeled rows")
        time.sleep(0.05)


def _scenario(victim: str, uri: str, url: str, address: str) -> dict[str, float | int]:
    from ray_jobs.label import LabelOptions, label_table

    options = LabelOptions(task="digits", serve=url, concurrency=2, batch_size=16, commit_rows=32)
    started = time.perf_counter()
    if victim == "job driver":
        driver = subprocess.Popen(
            [str(Path(sys.executable).parent / "lancetag"), "label", uri, "--task", "digits", "--serve", url,
             "--address", address, "--concurrency", "2", "--batch-size", "16", "--commit-rows", "32", "--json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_for(uri, N_ROWS // 5)
        killed_at = datetime.now(UTC)
        driver.kill()
        driver.wait()
        label_table(uri, options, progress=False)  # the rerun
    else:
        first = threading.Thread(target=label_table, args=(uri, options), kwargs={"progress": False})
        first.start()
        _wait_for(uri, N_ROWS // 5)
        killed_at = datetime.now(UTC)
        if not _kill(VICTIMS[victim]):
            raise RuntimeError(f"no process of the {victim} found")
        first.join()
        label_table(uri, options, progress=False)  # finishes what the first run reported failed, if anything
    finished = time.perf_counter() - started
    commits = _label_commits(uri)
    after = [t for t, _ in commits if t > killed_at]
    written = sum(rows for _, rows in commits)
    return {
        "recover_s": (after[0] - killed_at).total_seconds() if after else float("nan"),
        "total_s": finished,
        "lost": N_ROWS - _labeled(uri),
        "twice": written - N_ROWS,
    }


def run(workdir: Path) -> Section:
    """Kill each process victim, then a node during each job kind; report time to recover and to finish, what was lost."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parts = os.environ.get("BENCH_FAULTS", ",".join(("process", *KINDS))).split(",")
    md = _process_kills(workdir) if "process" in parts else ""
    kinds = tuple(kind for kind in KINDS if kind in parts)
    if kinds:
        md += "\n### A whole node lost (kill -9 of a worker node of a three-node cluster)\n"
        md += node_loss_markdown(run_node_loss(workdir / "nodes", kinds))
    return Section("Recovery from kill -9: processes and whole nodes", md)


def _process_kills(workdir: Path) -> str:
    """Kill each process victim once mid-run on a local cluster; return the markdown of its table."""
    import ray

    from ray_jobs.label import LabelOptions, label_table
    from serve_apps.app import LabelerConfig, run_labeler
    from serve_apps.backends.base import BackendConfig
    from serve_apps.tiny_models import build_tiny_model

    model = str(build_tiny_model("qwen2_vl", workdir / "tiny"))
    rows = digits_rows(0, N_ROWS)
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    url = run_labeler(
        LabelerConfig(task="digits", backend=BackendConfig(kind="transformers", model=model, batch_size=16),
                      app_name=APP, route_prefix=f"/{APP}", max_batch_size=16)
    )
    from serve_apps.client import LabelerClient

    # Warm-up: the replica's first batch and the tagging workers' imports are paid once, not per run.
    LabelerClient.over_http(url).label(rows.column("image").to_pylist()[:16])
    warm_uri = str(workdir / "warm-up.lance")
    append_images(warm_uri, rows.slice(0, 128), max_rows_per_file=64)
    label_table(warm_uri, LabelOptions(task="digits", serve=url, concurrency=2, batch_size=16), progress=False)
    baseline_uri = str(workdir / "baseline.lance")
    append_images(baseline_uri, rows, max_rows_per_file=64)
    baseline = label_table(baseline_uri, LabelOptions(task="digits", serve=url, concurrency=2, batch_size=16,
                                                      commit_rows=32), progress=False).seconds
    lines = []
    for victim in VICTIMS:
        uri = str(workdir / f"{victim.replace(' ', '-')}.lance")
        append_images(uri, rows, max_rows_per_file=64)
        r = _scenario(victim, uri, url, address)
        lines.append(f"| {victim} | {r['recover_s']:.1f} s | {r['total_s']:.1f} s ({r['total_s'] / baseline:.2f}x) "
                     f"| {r['lost']} | {r['twice']} |")
    ray.shutdown()
    return f"""
### One process killed (a local Ray cluster)

{N_ROWS} real digit images in fragments of 64 rows, one tiny Qwen2-VL replica (1 CPU), label job with
2 workers at once and a commit (by the driver) every 32 rows; each victim killed (SIGKILL) once 20% of the rows
were labeled. Undisturbed run: {baseline:.1f} s. Time to recover = kill to the next label commit.

| victim | time to recover | time to finish (vs undisturbed) | rows lost | rows labeled twice |
| --- | ---: | ---: | ---: | ---: |
{chr(10).join(lines)}

A killed replica is restarted by Serve (the model reloads); a killed tagging worker's fragments are run
again by the driver once it committed what that worker sent (only rows still todo); a killed driver is rerun by the user (here at once), and
the rerun plans only the unlabeled rows.
"""

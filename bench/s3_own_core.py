"""Ingest from object storage with the S3 server on a core of its own (a part of ``bench_ingest``).

On a shared machine moto, a Python server, takes its CPU from the decoders; a real object store
does not run on the machine that decodes. ``bench_ingest`` pins moto to one core and runs this
module pinned to the others: a Ray cluster of those cores ingests ``s3://BUCKET/photos/`` and the
decode limit of the same files on local disk runs on the same cores, in alternating order, so the
ratio compares the two with the same CPUs and no server in either's way.

    python -m bench.s3_own_core ENDPOINT BUCKET SERVER_PID PATHS_FILE WORKDIR   # prints one JSON object

``LANCETAG_STORAGE_OPTIONS`` must name the server (the ingest workers read it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROUNDS = 3


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(endpoint: str, bucket: str, server_pid: int, paths: list[Path], workdir: Path) -> dict:
    """Alternate the local decode limit and an ingest from the server ROUNDS times on this process's cores."""
    import ray

    from bench.bench_ingest import decode_limit
    from ray_jobs.ingest import IngestOptions, ingest

    cores = len(os.sched_getaffinity(0))
    ray.init(address="local", num_cpus=cores, object_store_memory=1024**3, include_dashboard=False, log_to_driver=False)
    try:
        warm = ingest([f"s3://{bucket}/warm/"], str(workdir / "own-core-warm.lance"), IngestOptions(progress=False))
        assert warm.added > 0 and warm.reconciled
        limits_s, ingests_s, server_s, added = [], [], [], []

        def one_ingest(attempt: int) -> None:
            before, started = cpu_seconds(server_pid), time.perf_counter()
            summary = ingest([f"s3://{bucket}/photos/"], str(workdir / f"own-core-{attempt}.lance"),
                             IngestOptions(progress=False))
            ingests_s.append(time.perf_counter() - started)
            server_s.append(cpu_seconds(server_pid) - before)
            assert summary.reconciled
            added.append(summary.added)

        for attempt in range(ROUNDS):
            pair = [lambda: limits_s.append(decode_limit(paths)), lambda a=attempt: one_ingest(a)]
            for run_one in pair if attempt % 2 == 0 else reversed(pair):
                run_one()
    finally:
        ray.shutdown()
    return {"cores": cores, "limit_s": limits_s, "ingest_s": ingests_s, "server_cpu_s": server_s, "added": added}


if __name__ == "__main__":
    endpoint, bucket, pid, paths_file, workdir = sys.argv[1:6]
    paths = [Path(line) for line in Path(paths_file).read_text().splitlines()]
    print(json.dumps(measure(endpoint, bucket, int(pid), paths, Path(workdir))))

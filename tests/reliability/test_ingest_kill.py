"""Real kill -9s of a running ingest. Workers write data files, the driver commits them, so both are killed:

- the driver's whole process group (driver, its local Ray cluster, the workers) dies mid-run with no
  ``finally`` and no commit thread finishing its work, as when a machine is lost: the table opens at
  a valid version, no id twice, every committed row's bytes intact (sha256 matches the id and the
  file on disk); files written and never committed are in no version, and ``lancetag maintain``
  reclaims them; the same command run again finishes the job with counts that reconcile across runs.
- one Ray worker process, in the middle of a task that is writing: Ray runs the task again, the
  ingest finishes on its own, every input once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from lance_io import open_table, table_exists
from lance_io.schema import content_hashes
from tests.conftest import LANCETAG, REPO_ROOT
from tests.ingest_fixtures import image_bytes
from tests.reliability.kill import kill_9_once, kill_group, own_cluster_environment

pytestmark = pytest.mark.slow  # three CLI ingests of 6,500 files, each starting its own Ray cluster

COMMIT_ROWS = 1_024  # a version per task's fragment or so: several commits before the end
IMAGES = 6 * COMMIT_ROWS + 356  # the kill after the first commit leaves most of the folder to do
WORKER_KILL_IMAGES = 24 * COMMIT_ROWS + 356
"""The worker kill needs a commit and a task still writing at once. The first commit lands about
1.3 s after the first task starts (worker start-up, the table's creation), whatever the folder: the
6,500 small files were all written 0.2 s after it here (4 polls of 50 ms), and a fast run had none,
so no worker was killed; 25,000 leave 1.3 s (25 polls)."""


def _command(folder: Path, table: str) -> list[str]:
    """The command a user runs (its own local Ray cluster, as on a laptop), committing often."""
    return [LANCETAG, "ingest", str(folder), "--table", table, "--num-cpus", "2", "--json", "--commit-rows", str(COMMIT_ROWS)]


def _photos(tmp_path: Path, count: int = IMAGES) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path / "photos"
    folder.mkdir()
    files: dict[str, bytes] = {}
    for n in range(count):
        path = folder / f"{n:05d}.png"
        path.write_bytes(image_bytes(n, "PNG", size=(8, 8)))
        files[str(path)] = path.read_bytes()
    return folder, files


def _orphans(table: str) -> set[str]:
    """Data files no version of the table references (what a killed writer leaves)."""
    referenced = set()
    ds = open_table(table)
    for v in ds.versions():
        for fragment in ds.checkout_version(v["version"]).get_fragments():
            referenced.update(Path(f.path).name for f in fragment.metadata.files)
    return {p.name for p in (Path(table) / "data").iterdir()} - referenced


def _rows_committed(table: str) -> int:
    """Rows of the table's latest version, 0 while it does not exist yet (read-only, safe mid-write)."""
    if not table_exists(table):
        return 0
    return open_table(table).count_rows()


def _check_rows(table: str, files: dict[str, bytes]) -> list[dict]:
    """Return the table's rows after checking ids unique and every row's bytes intact."""
    ds = open_table(table)
    ds.validate()  # Lance's own consistency check of the manifest and its fragments
    rows = ds.to_table(columns=["id", "sha256", "image", "source"]).to_pylist()
    assert len({r["id"] for r in rows}) == len(rows), "an id appears twice"
    for row in rows:
        assert content_hashes(row["image"]) == (row["id"], row["sha256"]), row["source"]
        assert files[row["source"]] == row["image"], row["source"]
    return rows


def test_kill_9_of_the_driver_mid_ingest_leaves_a_valid_table_and_the_rerun_completes_it(tmp_path: Path) -> None:
    folder, files = _photos(tmp_path)
    table = str(tmp_path / "photos.lance")

    running = kill_9_once(_command(folder, table), lambda: _rows_committed(table) > 0, tmp_path / "killed.log")
    assert running, f"the ingest ended before the kill: {(tmp_path / 'killed.log').read_text()[-2000:]}"

    committed = _check_rows(table, files)
    assert 0 < len(committed) < IMAGES, "killed after a commit and before the last"

    rerun = subprocess.run(
        _command(folder, table), cwd=REPO_ROOT, env=own_cluster_environment(), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["inputs"] == IMAGES
    assert (summary["errors"], summary["skipped"]) == (0, 0)
    assert summary["added"] + summary["duplicates"] + summary["errors"] == summary["inputs"]
    assert summary["duplicates"] == len(committed), "what the killed run committed is found, not re-added"
    assert len(committed) + summary["added"] == IMAGES  # both runs together: every input added once

    final = _check_rows(table, files)
    assert sorted(r["source"] for r in final) == sorted(files), "every input file present exactly once"
    assert summary["version"] == open_table(table).version

    left = _orphans(table)  # the killed run's written, uncommitted files (none if it died between tasks)
    maintained = subprocess.run(
        [LANCETAG, "maintain", table, "--orphan-age", "0s", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert maintained.returncode == 0, maintained.stderr[-2000:]
    assert json.loads(maintained.stdout)["orphan_files_removed"] >= len(left)
    assert _orphans(table) == set()
    assert sorted(r["source"] for r in _check_rows(table, files)) == sorted(files)


def _writing_worker(session: int) -> psutil.Process | None:
    """A Ray worker of the ingest's session running ``validate_and_write`` right now."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(process.pid) == session and "validate_and_write" in " ".join(process.info["cmdline"] or []):
                return process
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return None


def test_kill_9_of_a_writing_worker_is_retried_and_the_ingest_finishes_with_every_input_once(tmp_path: Path) -> None:
    folder, files = _photos(tmp_path, WORKER_KILL_IMAGES)
    table = str(tmp_path / "photos.lance")
    log = tmp_path / "ingest.log"
    with open(log, "w") as err:
        ingest = subprocess.Popen(
            _command(folder, table), cwd=REPO_ROOT, env=own_cluster_environment(), stdout=subprocess.PIPE,
            stderr=err, text=True, start_new_session=True,
        )
        try:
            killed = None
            deadline = time.monotonic() + 240
            while killed is None and ingest.poll() is None and time.monotonic() < deadline:
                worker = _writing_worker(ingest.pid) if _rows_committed(table) > 0 else None
                if worker is not None:
                    worker.send_signal(signal.SIGKILL)
                    killed = worker.pid
                time.sleep(0.05)
            out, _ = ingest.communicate(timeout=300)
        finally:
            kill_group(ingest)
    assert killed is not None, f"no writing worker seen mid-run: {log.read_text()[-2000:]}"
    assert ingest.returncode == 0, log.read_text()[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    counts = (summary["inputs"], summary["added"], summary["duplicates"], summary["errors"])
    assert counts == (WORKER_KILL_IMAGES, WORKER_KILL_IMAGES, 0, 0)
    final = _check_rows(table, files)
    assert sorted(r["source"] for r in final) == sorted(files), "every input file present exactly once"

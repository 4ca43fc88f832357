"""A real kill -9 of a running ingest: its process group (driver, its local Ray cluster, the workers)
dies mid-run with no ``finally`` and no commit thread finishing its work, as when a machine is lost.

What must hold afterwards: the table opens at a valid version holding whole chunks, no id twice,
every committed row's bytes intact (sha256 matches the id and the file on disk); and the same
command run again finishes the job with counts that reconcile across both runs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lance_io import open_table, table_exists
from lance_io.schema import content_hashes
from ray_jobs.ingest.options import IngestOptions
from tests.conftest import LANCETAG, REPO_ROOT
from tests.ingest_fixtures import image_bytes
from tests.reliability.kill import kill_9_once, own_cluster_environment

pytestmark = pytest.mark.slow  # two CLI ingests of 6,500 files, each starting its own Ray cluster

COMMIT_ROWS = IngestOptions().commit_rows  # the CLI's chunk: rows per table version (2,048)
IMAGES = 3 * COMMIT_ROWS + 356  # four chunks: the kill after the first leaves most of the folder to do


def _command(folder: Path, table: str) -> list[str]:
    """The command a user runs (its own local Ray cluster, as on a laptop)."""
    return [LANCETAG, "ingest", str(folder), "--table", table, "--num-cpus", "2", "--json"]


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


def test_kill_9_mid_ingest_leaves_a_valid_table_and_the_rerun_completes_it(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    files: dict[str, bytes] = {}
    for n in range(IMAGES):
        path = folder / f"{n:05d}.png"
        path.write_bytes(image_bytes(n, "PNG", size=(8, 8)))
        files[str(path)] = path.read_bytes()
    table = str(tmp_path / "photos.lance")

    running = kill_9_once(_command(folder, table), lambda: _rows_committed(table) > 0, tmp_path / "killed.log")
    assert running, f"the ingest ended before the kill: {(tmp_path / 'killed.log').read_text()[-2000:]}"

    committed = _check_rows(table, files)
    assert COMMIT_ROWS <= len(committed) < IMAGES, "killed after one chunk and before the last"
    assert len(committed) % COMMIT_ROWS == 0, "a version holds whole chunks, never part of one"

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

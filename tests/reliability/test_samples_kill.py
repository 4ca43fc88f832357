"""A real kill -9 of a running samples ingest (a sharegpt dataset: many conversations per image,
multi-image conversations): its process group (driver, its local Ray cluster, the workers) dies
mid-run, as when a machine is lost.

What must hold afterwards: both tables open at valid versions, no image id and no sample id twice,
and no sample refers to an image the image table does not hold (samples commit after their
images); the same command run again completes the samples with none added twice.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lance_io import open_table, table_exists
from lance_io.samples import open_samples, sample_id, samples_uri
from lance_io.schema import content_hashes
from tests.conftest import REPO_ROOT
from tests.ingest_fixtures import image_bytes
from tests.reliability.kill import kill_9_once, own_cluster_environment

pytestmark = pytest.mark.slow  # two ingests, each starting its own Ray cluster: about 20 s here

IMAGES = 600
COMMIT_ROWS = 32  # many image and samples versions: the kill lands with most samples still to do
INGEST = """
import json, sys
from ray_jobs.ingest import IngestOptions, ingest
options = IngestOptions(commit_rows={commit_rows}, batch_size=16, num_cpus=2, progress=False)
print(json.dumps(ingest([sys.argv[1]], sys.argv[2], options).to_json()), flush=True)
"""


def _command(dataset: Path, table: str) -> list[str]:
    import sys

    return [sys.executable, "-c", INGEST.format(commit_rows=COMMIT_ROWS), str(dataset), table]


def _dataset(folder: Path) -> tuple[Path, set[str]]:
    """Write the images and the sharegpt JSON; return its path and the ids of its samples."""
    (folder / "img").mkdir(parents=True)
    ids = []
    for n in range(IMAGES):
        data = image_bytes(n, "PNG", size=(8, 8))
        (folder / "img" / f"{n}.png").write_bytes(data)
        ids.append(content_hashes(data)[0])
    samples = []
    for n in range(IMAGES):
        for question in ("<image>Which colour?", "<image>什么颜色？"):
            samples.append({"messages": _chat(question, f"colour {n}"), "images": [f"img/{n}.png"]})
        if n % 5 == 0:
            pair = [f"img/{n}.png", f"img/{(n + 1) % IMAGES}.png"]
            samples.append({"messages": _chat("<image><image>Same?", "No."), "images": pair})
        if n % 50 == 0:
            samples.append({"messages": _chat("<image><image>Same?", "Yes."), "images": [f"img/{n}.png"] * 2})
    path = folder / "data.json"
    path.write_text(json.dumps(samples, ensure_ascii=False))
    index = {f"img/{n}.png": ids[n] for n in range(IMAGES)}
    expected = {sample_id([index[p] for p in s["images"]], s["messages"]) for s in samples}
    assert len(expected) == len(samples)
    return path, expected


def _chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _samples_committed(table: str) -> int:
    """Samples in the latest samples version, 0 while there is none (read-only, safe mid-write)."""
    return open_samples(table).count_rows() if table_exists(samples_uri(table)) else 0


def _check_tables(table: str, expected: set[str]) -> list[str]:
    """Return the committed sample ids after checking both tables valid, unique and consistent."""
    images = open_table(table)
    images.validate()
    image_ids = images.to_table(columns=["id"]).column("id").to_pylist()
    assert len(set(image_ids)) == len(image_ids), "an image id appears twice"
    samples = open_samples(table)
    samples.validate()
    rows = samples.to_table(columns=["id", "image_ids"]).to_pylist()
    sample_ids = [r["id"] for r in rows]
    assert len(set(sample_ids)) == len(sample_ids), "a sample appears twice"
    assert set(sample_ids) <= expected
    dangling = {i for r in rows for i in r["image_ids"]} - set(image_ids)
    assert not dangling, f"samples refer to images the table does not hold: {sorted(dangling)[:3]}"
    return sample_ids


def test_kill_9_mid_samples_ingest_leaves_both_tables_valid_and_the_rerun_adds_no_sample_twice(tmp_path: Path) -> None:
    dataset, expected = _dataset(tmp_path / "data")
    table = str(tmp_path / "t.lance")
    running = kill_9_once(_command(dataset, table), lambda: _samples_committed(table) > 0, tmp_path / "killed.log")
    assert running, f"the ingest ended before the kill: {(tmp_path / 'killed.log').read_text()[-2000:]}"

    committed = _check_tables(table, expected)
    assert 0 < len(committed) < len(expected), "killed after a samples commit and before the last"

    rerun = subprocess.run(
        _command(dataset, table), cwd=REPO_ROOT, env=own_cluster_environment(), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    counts = json.loads(rerun.stdout.strip().splitlines()[-1])["samples"]
    assert counts["samples_in"] == len(expected) and counts["samples_error"] == 0
    assert counts["samples_duplicate"] == len(committed), "what the killed run committed is found, not re-added"
    assert counts["samples_added"] + len(committed) == len(expected)

    final = _check_tables(table, expected)
    assert set(final) == expected

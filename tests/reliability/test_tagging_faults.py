"""kill -9 of a tagging worker and of a Serve replica mid-run: the table stays readable at every
instant, the job resumes (a dead worker's fragments run again) or reports failed fragments, and
after a rerun every row is labeled exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import lance
import pytest

from lance_io import append_images, open_table
from ray_jobs.label import LabelOptions, label_table
from tests.conftest import rows_written_by_label_commits
from tests.table_fixtures import image_rows

pytestmark = pytest.mark.slow


def pids_of(title: str) -> list[int]:
    """Processes whose title contains ``title`` (Ray names workers after what they run)."""
    out = subprocess.run(["pgrep", "-f", title], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class TableWatcher(threading.Thread):
    """Opens and scans the table's latest version continuously; records any failure."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.uri, self.failures, self.versions = uri, [], set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                ds = lance.dataset(self.uri)
                columns = [c for c in ("id", "label", "label_provenance") if c in ds.schema.names]
                ds.to_table(columns=columns)
                self.versions.add(ds.version)
            except Exception as exc:
                self.failures.append(repr(exc))
            time.sleep(0.05)


def kill_when(condition, title: str, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            pids = pids_of(title)
            if pids:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                return True
        time.sleep(0.05)
    return False


def labeled(uri: str) -> int:
    ds = lance.dataset(uri)
    return ds.count_rows(filter="label_provenance IS NOT NULL") if "label_provenance" in ds.schema.names else 0


@pytest.mark.parametrize(
    ("victim", "title"),
    [("tagging worker", "ray::label_fragments"), ("serve replica", "ray::ServeReplica:test-digits-labeler")],
)
def test_kill_9_mid_run_then_rerun_labels_every_row_exactly_once(victim, title, digits_labeler, tmp_path):
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(160)), max_rows_per_file=16)
    watcher = TableWatcher(uri)
    watcher.start()
    options = LabelOptions(task="digits", serve=digits_labeler, concurrency=2, batch_size=4, commit_rows=8)
    killer = threading.Thread(target=lambda: results.append(kill_when(lambda: labeled(uri) >= 24, title)))
    results: list[bool] = []
    killer.start()
    first = label_table(uri, options, progress=False)  # resumes or reports failed fragments
    killer.join()
    assert results == [True], f"the {victim} was found and killed mid-run"
    assert first.labeled + first.failed <= first.planned == 160
    if victim == "tagging worker":
        assert first.fragments_failed == 0 and first.labeled == 160, "the driver ran the dead worker's fragments again"

    second = label_table(uri, options, progress=False)
    watcher.stop.set()
    watcher.join()
    assert watcher.failures == [], "the table was readable at every instant"
    assert len(watcher.versions) >= 5
    final = open_table(uri)
    assert final.count_rows(filter="label_provenance IS NULL") == 0
    assert final.count_rows(filter="label_error IS NOT NULL") == 0
    assert first.labeled + second.labeled == 160
    assert rows_written_by_label_commits(uri) == 160, "no row's label was committed twice"


def test_two_label_jobs_on_the_same_column_label_every_row_exactly_once(digits_labeler, tmp_path):
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(96)), max_rows_per_file=16)
    options = LabelOptions(task="digits", serve=digits_labeler, concurrency=2, batch_size=4, commit_rows=8)
    summaries = []
    jobs = [threading.Thread(target=lambda: summaries.append(label_table(uri, options, progress=False))) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert len(summaries) == 2 and all(s.fragments_failed == 0 for s in summaries)
    assert open_table(uri).count_rows(filter="label_provenance IS NULL") == 0
    assert rows_written_by_label_commits(uri) == 96, "racing jobs resolved the conflicts: no row labeled twice"
    assert sum(s.labeled for s in summaries) == 96

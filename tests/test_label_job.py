"""The incremental tagging job: real Ray, a real Serve labeler over HTTP, tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import lance
import pyarrow as pa
import pytest

from lance_io import append_images, open_table
from ray_jobs.label import LabelOptions, label_table
from tests.conftest import LANCETAG, rows_written_by_label_commits
from tests.table_fixtures import image_rows

pytestmark = pytest.mark.slow


@pytest.fixture
def labeler(digits_labeler):
    return digits_labeler


def images_served(url: str) -> int:
    """How many images the labeler has run its model on (its /info stats)."""
    import httpx

    return httpx.get(f"{url}/info", timeout=30).json()["stats"]["images"]


def make_table(tmp_path, n: int, rows_per_fragment: int = 32) -> str:
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(n)), max_rows_per_file=rows_per_fragment)
    return uri


def unlabeled(uri: str, column: str = "label") -> int:
    return open_table(uri).count_rows(filter=f"{column}_provenance IS NULL")


def test_full_run_then_a_one_percent_append_sends_only_the_new_rows_to_the_model(labeler, tmp_path):
    uri = make_table(tmp_path, 200)
    before = images_served(labeler)
    full = label_table(uri, LabelOptions(task="digits", serve=labeler), progress=False)
    assert (full.planned, full.labeled, full.failed, full.skipped) == (200, 200, 0, 0)
    assert images_served(labeler) - before == 200
    assert full.fragments_committed == 7

    append_images(uri, image_rows(range(1000, 1002)))
    before = images_served(labeler)
    incremental = label_table(uri, LabelOptions(task="digits", serve=labeler), progress=False)
    assert (incremental.planned, incremental.labeled) == (2, 2)
    assert images_served(labeler) - before == 2
    table = open_table(uri).to_table(columns=["label", "label_confidence", "image"])
    assert set(table["label"].to_pylist()) <= {str(d) for d in range(10)}
    assert all(0 < c <= 1 for c in table["label_confidence"].to_pylist())


def test_run_parameters_and_counts_are_stored_in_the_version_it_creates_and_tagged(labeler, tmp_path):
    from lance_io.versions import list_versions

    uri = make_table(tmp_path, 20)
    summary = label_table(uri, LabelOptions(task="digits", serve=labeler, version_tag="zero-shot"), progress=False)
    last = list_versions(uri)[-1]
    assert last.version == summary.version and last.tags == ["zero-shot"]
    assert last.properties["lancetag.operation"] == "label"
    assert last.properties["lancetag.task"] == "digits"
    assert last.properties["lancetag.labeled"] == "20"
    assert last.properties["lancetag.model"].endswith("tiny-qwen2-vl0") or "tiny" in last.properties["lancetag.model"]


def test_kill_9_of_the_job_mid_run_then_rerun_labels_every_row_exactly_once(labeler, ray_cluster, tmp_path):
    uri = make_table(tmp_path, 240, rows_per_fragment=16)
    address = ray_cluster.get_runtime_context().gcs_address
    before = images_served(labeler)
    job = subprocess.Popen(
        [LANCETAG, "label", uri, "--task", "digits", "--serve", labeler, "--address", address,
         "--concurrency", "1", "--batch-size", "4", "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    readable_versions = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ds = lance.dataset(uri)  # every intermediate version must open and scan
        if "label_provenance" in ds.schema.names:
            ds.to_table(columns=["id", "label", "label_provenance"])
            readable_versions.add(ds.version)
            if ds.count_rows(filter="label_provenance IS NOT NULL") >= 48:
                break
        time.sleep(0.1)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    time.sleep(1)  # let the cluster notice the dead driver and cancel its tasks

    left = unlabeled(uri)
    assert 0 < left < 240 - 47
    assert len(readable_versions) >= 3
    served_in_run1 = images_served(labeler) - before

    before = images_served(labeler)
    rerun = label_table(uri, LabelOptions(task="digits", serve=labeler), progress=False)
    assert rerun.planned == left and rerun.labeled == left
    assert images_served(labeler) - before == left, "the rerun sends only the unfinished rows"
    assert unlabeled(uri) == 0
    # Rows computed by run 1 but not committed before the kill are the only ones computed twice.
    assert served_in_run1 - (240 - left) <= 16
    assert rows_written_by_label_commits(uri) == 240, "no row's label was committed twice"


def test_ingest_during_tagging_loses_no_row_and_the_next_run_picks_the_new_rows_up(labeler, tmp_path):
    uri = make_table(tmp_path, 96, rows_per_fragment=16)
    errors: list[BaseException] = []

    def ingest() -> None:
        try:
            for k in range(4):
                append_images(uri, image_rows(range(5000 + 8 * k, 5008 + 8 * k)))
                time.sleep(0.3)
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=ingest)
    writer.start()
    first = label_table(uri, LabelOptions(task="digits", serve=labeler, concurrency=2), progress=False)
    writer.join()
    assert not errors
    assert first.fragments_failed == 0 and first.labeled == first.planned >= 96
    assert open_table(uri).count_rows() == 96 + 32, "no appended row is lost"
    left = unlabeled(uri)
    assert left == 128 - first.labeled, "rows appended after the plan are simply still to do"
    second = label_table(uri, LabelOptions(task="digits", serve=labeler), progress=False)
    assert second.planned == second.labeled == left
    assert unlabeled(uri) == 0 and open_table(uri).count_rows() == 128


def test_where_relabels_only_matching_rows_and_relabel_after_switching_model_touches_all(labeler, tmp_path, tiny_qwen2_vl):
    from serve_apps.tiny_models import build_tiny_model

    uri = make_table(tmp_path, 40, rows_per_fragment=16)
    label_table(uri, LabelOptions(task="digits", serve=labeler), progress=False)
    first = open_table(uri).to_table(columns=["id", "truth", "label_provenance"])
    other_model = str(build_tiny_model("qwen2_vl", tmp_path / "other", seed=7))

    matching = first.filter(pa.compute.equal(first["truth"], "1"))
    only_matching = label_table(
        uri, LabelOptions(task="digits", model=other_model, relabel=True, where="truth = '1'"), progress=False
    )
    assert only_matching.planned == only_matching.labeled == matching.num_rows
    after = open_table(uri).to_table(columns=["id", "truth", "label_provenance"])
    changed = {r["id"] for r in after.to_pylist() if other_model in r["label_provenance"]}
    assert changed == set(matching["id"].to_pylist())

    everything = label_table(uri, LabelOptions(task="digits", model=other_model, relabel=True), progress=False)
    assert everything.planned == 40 - matching.num_rows
    assert open_table(uri).count_rows(filter=f"label_provenance LIKE '{other_model}%'") == 40


def test_attribute_and_caption_tasks_write_the_documented_columns(ray_cluster, tiny_qwen2_vl, tmp_path):
    uri = make_table(tmp_path, 6)
    label_table(uri, LabelOptions(task="fashion", column="garment", model=str(tiny_qwen2_vl)), progress=False)
    label_table(uri, LabelOptions(task="caption", column="caption", model=str(tiny_qwen2_vl)), progress=False)
    table = open_table(uri).to_table()
    for attribute in ("category", "sleeve_length", "fabric", "collar", "pattern"):
        assert table[f"garment_{attribute}"].null_count == 0
    assert table["garment_confidence"].null_count == 0
    assert table.schema.field("caption").type == pa.string()
    assert table["caption"].null_count + table["caption_error"].null_count == 6


def test_cli_prints_the_json_summary(labeler, ray_cluster, tmp_path):
    uri = make_table(tmp_path, 10)
    out = subprocess.run(
        [LANCETAG, "label", uri, "--task", "digits", "--serve", labeler, "--json", "--address", ray_cluster.get_runtime_context().gcs_address],
        capture_output=True, text=True, check=True,
    ).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert {"planned", "labeled", "failed", "skipped", "fragments_committed", "version", "seconds"} <= set(summary)
    assert summary["planned"] == summary["labeled"] == 10


def test_a_labeler_serving_another_task_is_refused_with_what_to_do(labeler, tmp_path):
    uri = make_table(tmp_path, 4)
    with pytest.raises(ValueError, match="serves task 'digits'"):
        label_table(uri, LabelOptions(task="hotel", serve=labeler), progress=False)

"""`lance_io.maintenance`: retention that keeps pinned versions, compaction, orphan cleanup, under load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from lance_io import append_images, open_table
from lance_io.maintenance import maintain_table
from lance_io.reasons import ReasonError
from tests.conftest import LANCETAG, REPO_ROOT
from tests.table_fixtures import image_page_bytes, image_rows

NOW = {"older_than": timedelta(0), "retain_versions": 1}  # everything old enough, only the latest kept


def set_labels(uri: str, labels: dict[str, str]) -> None:
    """Write a `label` column for the given ids with plain Lance operations (one Update per fragment)."""
    ds = lance.dataset(uri)
    if "label" not in ds.schema.names:
        ds.add_columns(pa.field("label", pa.string()))
        ds = lance.dataset(uri)
    ids = pa.array(list(labels), pa.string())
    located = ds.to_table(columns=["id"], with_row_address=True, filter=pc.field("id").isin(ids))
    fragment_of = dict(zip(located["id"].to_pylist(), (located["_rowaddr"].to_numpy() >> 32).tolist(), strict=True))
    for fid in sorted(set(fragment_of.values())):
        part = [i for i, f in fragment_of.items() if f == fid]
        values = pa.table({"id": part, "label": [labels[i] for i in part]})
        meta, fields = ds.get_fragment(fid).update_columns(values, left_on="id", right_on="id")
        ds = lance.LanceDataset.commit(
            uri, lance.LanceOperation.Update(updated_fragments=[meta], fields_modified=fields), read_version=ds.version
        )


def rows_at(uri: str, version: int | str) -> dict[str, str | None]:
    table = open_table(uri, version).to_table(columns=["id", "truth"])
    return dict(zip(table["id"].to_pylist(), table["truth"].to_pylist(), strict=True))


@pytest.fixture
def history(tmp_path) -> str:
    """A table with nine versions: create, three appends, a relabel of the same rows twice, updates."""
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(20)), max_rows_per_file=10)  # v1 (+ v2: the id index)
    for k in range(3):
        append_images(uri, image_rows(range(100 + 5 * k, 105 + 5 * k)))
    ids = open_table(uri).to_table(columns=["id"])["id"].to_pylist()
    set_labels(uri, {i: "first" for i in ids[:10]})
    set_labels(uri, {i: "second" for i in ids[:10]})  # the first label file is now only in old versions
    open_table(uri).update({"truth": "'changed'"}, where="truth = '0'")
    return uri


def test_tagged_registered_and_lineage_versions_survive_and_stay_readable(history, tmp_path):
    from llamafactory_ext.register import register_dataset
    from llamafactory_ext.train import pin_datasets

    uri = history
    before = {v["version"]: rows_at(uri, v["version"]) for v in open_table(uri).versions()}
    open_table(uri).tags.create("zero-shot", 3)
    data_dir = tmp_path / "data"
    register_dataset(uri, "pinned", data_dir, version=4, label_column="truth")
    open_table(uri).tags.create("for-training", 5)
    register_dataset(uri, "by-tag", data_dir, version="for-training", label_column="truth")
    other = str(tmp_path / "other.lance")  # another table's pins protect nothing here
    append_images(other, image_rows(range(3)))
    register_dataset(other, "other", data_dir, version=2, label_column="truth")
    # A training run's lineage, as llamafactory_ext.train writes it (pinned at the version it read).
    register_dataset(uri, "trained", data_dir, version=6, label_column="truth")
    _, lineage = pin_datasets({"dataset_dir": str(data_dir), "dataset": "trained"}, tmp_path / "pinned")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "lancetag_lineage.json").write_text(json.dumps({"datasets": lineage}))
    info = json.loads((data_dir / "dataset_info.json").read_text())
    del info["trained"]  # only the lineage pins 6 now
    (data_dir / "dataset_info.json").write_text(json.dumps(info))

    report = maintain_table(uri, dataset_dirs=[data_dir], protect_lineage=[run_dir], compact=False, orphan_age=None, **NOW)

    kept = {v["version"] for v in open_table(uri).versions()}
    latest = open_table(uri).version  # maintenance indexed the appended rows: a new version
    assert kept == {3, 4, 5, 6, latest}, "2 is pinned in another table only"
    assert report.index_optimized and report.version_after == latest
    assert report.versions_removed == len(before) - 4 and report.bytes_freed > 0
    assert any("tag zero-shot" in why for why in report.protected[3])
    assert any("dataset pinned" in why for why in report.protected[4])
    assert any("dataset by-tag" in why for why in report.protected[5])
    assert any("lineage" in why for why in report.protected[6])
    for version in (3, 4, 5, 6):
        assert rows_at(uri, version) == before[version], f"version {version} reads as before"
    assert rows_at(uri, latest) == before[max(before)]


def test_retention_keeps_recent_versions_and_the_last_n(history):
    recent = maintain_table(history, compact=False, orphan_age=None)  # defaults: a day, the last 10
    assert recent.versions_removed == 0
    versions = [v["version"] for v in open_table(history).versions()]
    assert len(versions) == recent.versions_kept == 10
    last_three = maintain_table(history, compact=False, orphan_age=None, older_than=timedelta(0), retain_versions=3)
    assert last_three.versions_removed == len(versions) - 3
    assert [v["version"] for v in open_table(history).versions()] == versions[-3:]


def test_an_unreadable_dataset_registry_stops_maintenance_before_anything_is_removed(history, tmp_path):
    (tmp_path / "dataset_info.json").write_text("{not json")
    versions = open_table(history).versions()
    with pytest.raises(ReasonError) as refused:
        maintain_table(history, dataset_dirs=[tmp_path], **NOW)
    assert refused.value.reason == "bad_dataset_info"
    assert open_table(history).versions() == versions


def test_compaction_merges_small_appends_indexes_them_and_labels_stay_with_their_ids(tmp_path):
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(8)))
    for k in range(12):
        append_images(uri, image_rows(range(100 + 3 * k, 103 + 3 * k)))
    ids = open_table(uri).to_table(columns=["id"])["id"].to_pylist()
    expected = {i: f"label-{i[:6]}" for i in ids[::2]}
    set_labels(uri, expected)
    ds = open_table(uri)
    files_before = sum(len(f.metadata.files) for f in ds.get_fragments())
    assert len(ds.get_fragments()) == 13 and ds.stats.index_stats("id_idx")["num_unindexed_rows"] == 36

    report = maintain_table(uri, target_rows_per_fragment=1024, **NOW)

    ds = open_table(uri)
    assert report.fragments_before == 13 and report.fragments_after == len(ds.get_fragments()) == 1
    assert report.fragments_compacted == 13 and sum(len(f.metadata.files) for f in ds.get_fragments()) < files_before
    assert report.unindexed_rows_after == 0
    table = ds.to_table(columns=["id", "label"])
    got = dict(zip(table["id"].to_pylist(), table["label"].to_pylist(), strict=True))
    assert got == {i: expected.get(i) for i in ids}, "every label is still on its id"
    assert ds.to_table(columns=["id"], filter=f"id = '{ids[-1]}'").num_rows == 1  # the index answers
    assert report.bytes_freed > 0 and report.versions_kept == 1
    from lance_io.versions import list_versions

    assert [v.operation for v in list_versions(uri)] == ["Rewrite"], "the history still reads after compaction"


def test_compaction_writes_large_images_in_pages_of_about_read_batch_bytes(tmp_path, monkeypatch):
    """Lance writes each batch compaction reads as one page, and a scan holds a page: 64 rows of 5 MB photos made pages
    of 320 MB. The batch now follows the rows' bytes (``rows_per_batch``), at most ``COMPACTION_BATCH_ROWS``."""
    from lance_io import scan

    monkeypatch.setattr(scan, "READ_BATCH_BYTES", 2**20)  # 1 MB: one of these 1 MB images a batch
    uri = str(tmp_path / "t.lance")
    for k in range(2):
        append_images(uri, image_rows(range(16 * k, 16 * k + 16), padding=2**20))
    before = open_table(uri).to_table(columns=["id", "image"]).sort_by("id")

    report = maintain_table(uri, target_rows_per_fragment=1024, **NOW)

    assert report.fragments_before == 2 and report.fragments_after == 1
    pages = image_page_bytes(uri)  # Lance adds batches to a page until it holds about 8 MB
    assert len(pages) >= 3 and max(pages) <= 12 * 2**20, pages  # a batch of a fragment's 16 rows was a page of 16 MB
    assert open_table(uri).to_table(columns=["id", "image"]).sort_by("id").equals(before)


def test_cli_maintain_prints_what_it_did_and_refuses_a_bad_duration(history):
    open_table(history).tags.create("zero-shot", 2)
    done = subprocess.run(
        [LANCETAG, "maintain", history, "--older-than", "0", "--retain-versions", "1", "--orphan-age", "1h", "--json"],
        capture_output=True, text=True, check=True,
    )
    report = json.loads(done.stdout)
    assert report["versions_removed"] > 0 and report["protected"] == {"2": ["tag zero-shot"]}
    assert {v["version"] for v in open_table(history).versions()} == {2, report["version_after"]}
    refused = subprocess.run([LANCETAG, "maintain", history, "--older-than", "3x", "--json"], capture_output=True, text=True)
    assert refused.returncode != 0 and json.loads(refused.stdout)["error"]["reason"] == "bad_duration"


ORPHAN_WRITER = """
import sys, lance, pyarrow as pa
from tests.table_fixtures import image_rows
uri = sys.argv[1]
schema = lance.dataset(uri).schema
rows = image_rows(range(10_000, 10_200), padding=200_000)  # about 40 MB per file
print("writing", flush=True)
while True:  # written, never committed: what a writer killed between write and commit leaves
    lance.fragment.write_fragments(rows.select(schema.names), uri, schema=schema, max_rows_per_file=200)
    print("wrote", flush=True)
"""


def data_files(uri: str) -> set[str]:
    return set(os.listdir(Path(uri) / "data"))


def test_files_of_a_writer_killed_mid_write_are_removed_after_their_age_and_the_table_stays_valid(tmp_path):
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(30)), max_rows_per_file=10)
    committed = data_files(uri)
    writer = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_WRITER, uri], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "writing"
    assert writer.stdout.readline().strip() == "wrote"
    time.sleep(0.3)  # well into the next file
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    orphans = data_files(uri) - committed
    assert orphans, "the killed writer left files"

    young = maintain_table(uri, orphan_age=timedelta(hours=1), **NOW)
    assert young.orphan_files_removed == 0 and young.orphan_files_too_young == len(orphans)
    assert data_files(uri) >= orphans, "files younger than the orphan age are kept (a live writer's)"

    time.sleep(1.5)
    report = maintain_table(uri, orphan_age=timedelta(seconds=1), **NOW)
    assert report.orphan_files_removed == len(orphans) and report.bytes_freed > 0
    assert data_files(uri) & orphans == set()
    ds = open_table(uri)
    assert ds.count_rows() == 30 and ds.to_table().num_rows == 30
    referenced = {os.path.basename(f.path) for frag in ds.get_fragments() for f in frag.metadata.files}
    assert referenced <= data_files(uri)


@pytest.mark.s3
def test_on_s3_old_versions_and_unreferenced_files_are_removed_and_the_table_reads(s3):
    uri, opts = s3.uri("maintained.lance"), s3.storage_options
    for k in range(4):
        append_images(uri, image_rows(range(10 * k, 10 * k + 10)), storage_options=opts)
    ds = open_table(uri, storage_options=opts)
    lance.fragment.write_fragments(image_rows(range(900, 905)).select(ds.schema.names), uri, schema=ds.schema,
                                   storage_options=opts)  # written, never committed
    report = maintain_table(uri, storage_options=opts, orphan_age=timedelta(0), **NOW)
    assert report.orphan_files_removed == 1 and report.versions_removed > 0 and report.fragments_after == 1
    ds = open_table(uri, storage_options=opts)
    assert ds.count_rows() == 40 and len(ds.versions()) == 1 and ds.to_table().num_rows == 40


@pytest.fixture(scope="module")
def random_labeler(ray_cluster):
    """A seeded random digits labeler over HTTP: labels at platform speed, reproducible by id."""
    from serve_apps.app import LabelerConfig, run_labeler, stop_labeler
    from serve_apps.backends.base import BackendConfig

    config = LabelerConfig(
        task="digits",
        backend=BackendConfig(kind="random", model="random", options={"seed": 11}),
        app_name="test-maintain-labeler",
        route_prefix="/test-maintain-labeler",
        num_cpus=0.25,
    )
    yield run_labeler(config)
    stop_labeler("test-maintain-labeler")


def expected_digits(uri: str) -> dict[str, str]:
    """What the seed-11 random labeler answers for every row, computed here from the image bytes."""
    from lance_io.tasks import load_task
    from serve_apps.backends.base import BackendConfig, create_backend

    backend = create_backend(BackendConfig(kind="random", model="random", options={"seed": 11}))
    table = open_table(uri).to_table(columns=["id", "image"])
    results = backend.label(table["image"].to_pylist(), load_task("digits"))
    return dict(zip(table["id"].to_pylist(), (r.label for r in results), strict=True))


@pytest.mark.slow
def test_maintain_again_and_again_during_a_label_run_and_appends_loses_nothing_and_labels_once(
    random_labeler, ray_cluster, tmp_path
):
    from ray_jobs.label import LabelOptions, label_table

    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(480)), max_rows_per_file=16)
    job = subprocess.Popen(
        [LANCETAG, "label", uri, "--task", "digits", "--serve", random_labeler, "--json",
         "--address", ray_cluster.get_runtime_context().gcs_address,
         "--concurrency", "1", "--batch-size", "2", "--commit-rows", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    stop = threading.Event()
    errors: list[BaseException] = []
    appended = [0]

    def ingest() -> None:  # small appends: the fragments compaction merges while labels are committed
        try:
            while not stop.is_set():
                first = 5000 + appended[0]
                appended[0] += append_images(uri, image_rows(range(first, first + 4))).added
                time.sleep(0.2)
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=ingest)
    writer.start()
    reports = []
    while job.poll() is None:
        reports.append(
            maintain_table(uri, older_than=timedelta(seconds=3), retain_versions=3,
                           orphan_age=timedelta(minutes=5), target_rows_per_fragment=64)
        )
    stop.set()
    writer.join()
    out, _ = job.communicate()
    assert job.returncode == 0 and not errors
    first = json.loads(out.strip().splitlines()[-1])

    labeled = [first["labeled"]]
    for _ in range(3):  # rows appended during the run, or moved by a compaction, are still to do
        summary = label_table(uri, LabelOptions(task="digits", serve=random_labeler), progress=False)
        labeled.append(summary.labeled)
        if summary.planned == 0:
            break
    total = 480 + appended[0]
    ds = open_table(uri)
    assert ds.count_rows() == total, "no appended or labeled row is lost"
    assert ds.count_rows(filter="label_provenance IS NULL") == 0
    assert sum(labeled) == total, f"every row labeled exactly once: runs labeled {labeled}"
    table = ds.to_table(columns=["id", "label"])
    assert dict(zip(table["id"].to_pylist(), table["label"].to_pylist(), strict=True)) == expected_digits(uri)
    print("maintain rounds:", [(r.versions_removed, r.fragments_compacted, r.compaction_conflicts) for r in reports])
    print("label runs labeled:", labeled, "first run errors:", first.get("errors"))
    assert len(reports) >= 2
    assert sum(r.versions_removed for r in reports) > 0 and sum(r.fragments_compacted for r in reports) > 0
    # Once every writer has stopped, everything unreferenced can go; the table stays whole.
    maintain_table(uri, older_than=timedelta(0), retain_versions=1, orphan_age=timedelta(0))
    table = open_table(uri).to_table(columns=["id", "label"])
    assert dict(zip(table["id"].to_pylist(), table["label"].to_pylist(), strict=True)) == expected_digits(uri)


def test_later_copies_of_an_id_are_removed_and_the_first_copies_stay(tmp_path):
    """The state a writer killed between a raced append and its repair leaves: ids committed twice."""
    from lance_io.errors import ErrorRecord, errors_uri, record_errors

    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(40)), max_rows_per_file=10)
    copies = image_rows([3, 17, 25, 25, 39])  # one id twice within the same append
    copies = copies.set_column(copies.schema.get_field_index("source"), "source", pa.array(["copy"] * 5))
    lance.write_dataset(copies, uri, mode="append")  # a plain Lance append: no check, no repair
    assert open_table(uri).count_rows() == 45
    record_errors(uri, [ErrorRecord(source=f"s{n}", reason="r", message="m", job="j", stage="s", id="same") for n in range(2)])

    report = maintain_table(uri, **NOW)

    assert report.duplicate_rows_removed == 5
    rows = open_table(uri).to_table(columns=["id", "source"])
    assert rows.num_rows == 40 and len(set(rows["id"].to_pylist())) == 40
    assert "copy" not in rows["source"].to_pylist(), "the first copies (committed first) stay"
    assert maintain_table(errors_uri(uri), **NOW).duplicate_rows_removed == 0, "its id may repeat: not touched"
    assert lance.dataset(errors_uri(uri)).count_rows() == 2
    assert maintain_table(uri, **NOW).duplicate_rows_removed == 0

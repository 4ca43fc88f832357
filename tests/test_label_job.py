"""The incremental tagging job: real Ray, a real Serve labeler over HTTP, tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import lance
import pyarrow as pa
import pytest

from lance_io import append_images, open_table
from lance_io.reasons import ReasonError
from ray_jobs.label import LabelOptions, label_commits, label_table
from tests.conftest import LANCETAG, REPO_ROOT, rows_written_by_label_commits
from tests.table_fixtures import image_rows

pytestmark = pytest.mark.slow


@pytest.fixture
def labeler(digits_labeler):
    return digits_labeler


def images_served(url: str, stat: str = "images") -> int:
    """How many images the labeler has run its model on (its /info stats; ``requests``: label requests)."""
    import httpx

    return httpx.get(f"{url}/info", timeout=30).json()["stats"][stat]


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
    assert full.fragments_committed == 7 and full.commits >= 1

    append_images(uri, image_rows(range(1000, 1002)))
    before = images_served(labeler)
    incremental = label_table(uri, LabelOptions(task="digits", serve=labeler), progress=False)
    assert (incremental.planned, incremental.labeled) == (2, 2)
    assert images_served(labeler) - before == 2
    table = open_table(uri).to_table(columns=["label", "label_confidence", "image"])
    assert set(table["label"].to_pylist()) <= {str(d) for d in range(10)}
    assert all(0 < c <= 1 for c in table["label_confidence"].to_pylist())
    assert rows_written_by_label_commits(uri) == 202


def test_run_parameters_and_counts_are_stored_in_the_version_it_creates_and_tagged(labeler, tiny_qwen2_vl, tmp_path):
    from lance_io.versions import list_versions

    uri = make_table(tmp_path, 20)
    summary = label_table(uri, LabelOptions(task="digits", serve=labeler, version_tag="zero-shot"), progress=False)
    last = list_versions(uri)[-1]
    assert last.version == summary.version and last.tags == ["zero-shot"]
    assert last.properties["lancetag.operation"] == "label"
    assert last.properties["lancetag.task"] == "digits"
    assert (last.properties["lancetag.planned"], last.properties["lancetag.labeled"]) == ("20", "20")
    assert last.properties["lancetag.commits"] == str(summary.commits)
    assert last.properties["lancetag.model"] == str(tiny_qwen2_vl), "the model the labeler serves"
    # placement: on one node, that node labeled every row, in the run's summary and in each commit
    import json

    import ray

    from ray_jobs.label import label_commits

    assert summary.nodes == {ray.get_runtime_context().get_node_id(): 20}
    assert sum(sum(json.loads(v.properties["lancetag.nodes"]).values()) for v in label_commits(uri)) == 20


def committed_rows(uri: str) -> int:
    ds = lance.dataset(uri)
    return ds.count_rows(filter="label_provenance IS NOT NULL") if "label_provenance" in ds.schema.names else 0


def test_kill_9_of_the_driver_while_groups_are_pending_then_rerun_labels_every_row_exactly_once(labeler, ray_cluster, tmp_path):
    uri = make_table(tmp_path, 240, rows_per_fragment=16)
    address = ray_cluster.get_runtime_context().gcs_address
    before = images_served(labeler)
    # A driver committing only every 32 rows (never by age), with two workers handing back 8 rows at a time.
    driver = subprocess.Popen(
        [sys.executable, "-c", (
            "from ray_jobs.label import LabelOptions, label_table;"
            f"label_table({uri!r}, LabelOptions(task='digits', serve={labeler!r}, concurrency=2, batch_size=4, in_flight=2,"
            f" commit_rows=32, commit_seconds=3600), progress=False, address={address!r})"
        )],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    readable_versions, pending_at_kill = set(), 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and driver.poll() is None:
        ds = lance.dataset(uri)  # every intermediate version must open and scan
        if "label_provenance" in ds.schema.names:
            ds.to_table(columns=["id", "label", "label_provenance"])
            readable_versions.add(ds.version)
        done = committed_rows(uri)
        pending_at_kill = images_served(labeler) - before - done
        if done >= 64 and pending_at_kill >= 8:  # two groups committed, a third one pending
            break
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(1)  # let the cluster notice the dead driver and stop its workers

    left = unlabeled(uri)
    assert pending_at_kill >= 8, "the driver was killed while labeled rows waited for their commit"
    assert 0 < left <= 240 - 64
    assert len(readable_versions) >= 2
    served_in_run1 = images_served(labeler) - before

    before = images_served(labeler)
    rerun = label_table(uri, LabelOptions(task="digits", serve=labeler), progress=False)
    assert rerun.planned == left and rerun.labeled == left
    assert images_served(labeler) - before == left, "the rerun sends only the rows not committed"
    assert unlabeled(uri) == 0
    # Lost to the kill: the pending group (< 32 rows) and the two workers' batches in flight (2 x 8).
    assert served_in_run1 - (240 - left) < 32 + 16
    assert rows_written_by_label_commits(uri) == 240, "no row's label was committed twice"


APPENDER = """
import sys, time
from pathlib import Path
from lance_io import append_images
from tests.table_fixtures import image_rows
uri, log, stop = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
for k in range(40):
    if stop.exists():
        break
    version = append_images(uri, image_rows(range(5000 + 8 * k, 5008 + 8 * k))).version
    with log.open("a") as out:
        out.write(f"{version} {5000 + 8 * k}\\n")
    time.sleep(0.3)
"""


def test_another_process_appending_while_groups_are_pending_loses_no_row_and_the_rerun_labels_them(labeler, tmp_path):
    from lance_io.schema import image_id
    from tests.table_fixtures import png_bytes

    uri = make_table(tmp_path, 96, rows_per_fragment=16)
    log, stop = tmp_path / "appends.log", tmp_path / "stop"
    appender = subprocess.Popen([sys.executable, "-c", APPENDER, uri, str(log), str(stop)], cwd=REPO_ROOT)
    deadline = time.monotonic() + 60
    while open_table(uri).count_rows() == 96 and time.monotonic() < deadline:
        time.sleep(0.05)  # the appender is running
    # One group, committed at the end: every append during the run lands while its labels are pending.
    options = LabelOptions(task="digits", serve=labeler, concurrency=2, commit_rows=10_000, commit_seconds=3600)
    first = label_table(uri, options, progress=False)
    stop.touch()
    assert appender.wait(timeout=60) == 0
    appends = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    total = 96 + 8 * len(appends)
    assert open_table(uri).count_rows() == total, "no appended row is lost"
    assert first.fragments_failed == 0 and first.labeled == first.planned >= 96
    left = unlabeled(uri)
    assert left == total - first.labeled, "rows appended after the plan are simply still to do"
    [run_commit] = [v.version for v in label_commits(uri)]
    still_todo = set(open_table(uri).to_table(columns=["id"], filter="label_provenance IS NULL")["id"].to_pylist())
    during = [version for version, seed in appends if image_id(png_bytes(seed)) in still_todo and version < run_commit]
    assert during, "an append committed after the plan and before the run's commit (the commit rebased over it)"

    second = label_table(uri, LabelOptions(task="digits", serve=labeler), progress=False)
    assert second.planned == second.labeled == left
    assert unlabeled(uri) == 0 and open_table(uri).count_rows() == total
    assert rows_written_by_label_commits(uri) == total


def test_a_sparse_run_over_many_small_fragments_commits_once_and_a_full_run_in_few_versions(labeler, tmp_path):
    uri = make_table(tmp_path, 240, rows_per_fragment=4)  # 60 fragments
    version_before = open_table(uri).version
    requests_before = images_served(labeler, "requests")
    sparse = label_table(uri, LabelOptions(task="digits", serve=labeler, where="id LIKE '0%'", commit_seconds=3600), progress=False)
    assert sparse.planned == sparse.labeled == open_table(uri).count_rows(filter="id LIKE '0%'") > 0
    assert sparse.fragments_committed >= 8, "the rows are spread over many fragments"
    requests = images_served(labeler, "requests") - requests_before
    assert requests < sparse.fragments_committed, "fragments of a unit share labeler requests (one each before)"
    assert sparse.commits == 1, "one commit for every fragment touched"
    assert open_table(uri).version - version_before == 3, "the new columns, the labels, the run's summary"

    rest = label_table(uri, LabelOptions(task="digits", serve=labeler, commit_rows=64, commit_seconds=3600), progress=False)
    assert rest.labeled == 240 - sparse.labeled and rest.fragments_committed >= 50
    assert rest.commits <= -(-rest.labeled // 64) + 1, "a commit per 64 rows, not per fragment"
    # A group is committed once it holds 64 rows; a worker hands back at most a fragment (4 rows) at a time.
    assert all(64 <= int(v.properties["lancetag.rows"]) < 68 for v in label_commits(uri)[1:-1])
    assert rows_written_by_label_commits(uri) == 240 and unlabeled(uri) == 0


def test_fragments_whose_labeler_went_away_become_error_records_with_their_reason_and_stay_todo(labeler, tmp_path):
    from urllib.parse import urlsplit

    from lance_io import read_errors
    from tests.tcp_proxy import KillableProxy

    uri = make_table(tmp_path, 128, rows_per_fragment=8)
    target = urlsplit(labeler)
    proxy = KillableProxy(target.hostname, target.port)
    proxy.start()

    def kill_the_labeler_once_the_run_planned() -> None:  # the labeler becomes unreachable as the workers start
        deadline = time.monotonic() + 120
        while "label_provenance" not in lance.dataset(uri).schema.names and time.monotonic() < deadline:
            time.sleep(0.02)
        proxy.kill()

    killer = threading.Thread(target=kill_the_labeler_once_the_run_planned)
    killer.start()
    options = LabelOptions(task="digits", serve=proxy.endpoint + target.path, concurrency=2, batch_size=4, in_flight=1)
    summary = label_table(uri, options, progress=False)
    killer.join()

    errors = read_errors(uri, job=f"label-{summary.run_id}").to_pylist()
    assert summary.fragments_failed == len(errors) > 0
    assert summary.errors == {"labeler_unreachable": len(errors)}
    assert {(e["reason"], e["stage"]) for e in errors} == {("labeler_unreachable", "label")}
    failed_fragments = {int(e["source"].rsplit("#fragment=", 1)[1]) for e in errors}
    assert all(e["source"].startswith(uri) and "rerun" in e["message"] for e in errors)
    left = unlabeled(uri)
    assert left > 0 and summary.labeled == 128 - left and summary.skipped == 0
    assert left <= 8 * len(failed_fragments), "only the failed fragments' rows stay todo"

    rerun = label_table(uri, LabelOptions(task="digits", serve=labeler), progress=False)
    assert rerun.labeled == left and rerun.fragments_failed == 0 and unlabeled(uri) == 0
    assert rows_written_by_label_commits(uri) == 128


def test_a_labeler_that_stops_answering_ends_the_run_after_one_timeout_with_labeler_unavailable(labeler, tmp_path):
    from urllib.parse import urlsplit

    from lance_io import read_errors
    from tests.tcp_proxy import KillableProxy

    uri = make_table(tmp_path, 400, rows_per_fragment=8)
    target = urlsplit(labeler)
    proxy = KillableProxy(target.hostname, target.port)
    proxy.start()
    frozen_at: list[float] = []

    def hang_after_the_first_commit() -> None:  # connections stay open, no answer comes: a stuck labeler
        deadline = time.monotonic() + 120
        while not label_commits(uri) and time.monotonic() < deadline:
            time.sleep(0.02)
        proxy.freeze()
        frozen_at.append(time.monotonic())

    timeout_s = 4.0
    hanger = threading.Thread(target=hang_after_the_first_commit)
    hanger.start()
    # Units of 16 rows, two at a time: 25 units. Failing unit by unit would take a dozen waves of the timeout.
    options = LabelOptions(
        task="digits", serve=proxy.endpoint + target.path, concurrency=2, batch_size=4, in_flight=1, commit_rows=16,
        commit_seconds=0.5, labeler_timeout=timeout_s,
    )
    summary = label_table(uri, options, progress=False)
    ended_after = time.monotonic() - frozen_at[0]
    hanger.join()

    assert ended_after < 3 * timeout_s, f"the run waited {ended_after:.1f} s: it should end after one timeout"
    print(f"labeler hung; the run ended {ended_after:.1f} s later (timeout {timeout_s:g} s)")
    errors = read_errors(uri, job=f"label-{summary.run_id}").to_pylist()
    assert summary.errors == {"labeler_unavailable": len(errors)} and summary.fragments_failed == len(errors) > 0
    assert all("did not answer in 4 s" in e["message"] and "rerun" in e["message"] for e in errors)
    left = unlabeled(uri)
    assert 0 < left <= 8 * len(errors) and summary.labeled == 400 - left and summary.skipped == 0
    assert summary.labeled >= 16, "what was committed before the labeler hung stays"

    proxy.thaw()
    rerun = label_table(uri, LabelOptions(task="digits", serve=labeler), progress=False)
    assert rerun.labeled == left and unlabeled(uri) == 0
    assert rows_written_by_label_commits(uri) == 400


@pytest.mark.long  # views are scored in tests/test_transformers_backend.py; this is the whole label job twice
def test_labels_averaged_over_views_say_so_and_relabel_with_the_image_alone_redoes_them(tmp_path, tiny_qwen2_vl):
    uri = make_table(tmp_path, 24, rows_per_fragment=8)
    model = str(tiny_qwen2_vl)
    viewed = label_table(uri, LabelOptions(task="digits", model=model, views=3), progress=False)
    assert viewed.labeled == 24 and viewed.provenance.endswith("|views=3")
    stored = open_table(uri).to_table(columns=["label_provenance"])["label_provenance"].to_pylist()
    assert set(stored) == {viewed.provenance}, "the job's provenance is the one the labeler's records carry"

    same = label_table(uri, LabelOptions(task="digits", model=model, views=3, relabel=True), progress=False)
    assert same.planned == 0, "the same labeler with the same views has nothing to redo"
    alone = label_table(uri, LabelOptions(task="digits", model=model, views=1, relabel=True), progress=False)
    assert alone.planned == alone.labeled == 24 and "views=" not in alone.provenance
    stored = open_table(uri).to_table(columns=["label_provenance"])["label_provenance"].to_pylist()
    assert set(stored) == {alone.provenance}
    assert rows_written_by_label_commits(uri) == 48


def test_where_relabels_only_matching_rows_and_relabel_after_switching_model_touches_all(labeler, tmp_path, tiny_qwen2_vl):
    from serve_apps.app import LabelerConfig, run_labeler, stop_labeler
    from serve_apps.backends.base import BackendConfig
    from serve_apps.tiny_models import build_tiny_model

    uri = make_table(tmp_path, 40, rows_per_fragment=16)
    label_table(uri, LabelOptions(task="digits", serve=labeler), progress=False)
    first = open_table(uri).to_table(columns=["id", "truth", "label_provenance"])
    other_model = str(build_tiny_model("qwen2_vl", tmp_path / "other", seed=7))
    # One labeler serves the other model to both relabel runs (deploying it per run costs ~20 s each).
    other = run_labeler(LabelerConfig(task="digits", backend=BackendConfig(model=other_model), app_name="other-model",
                                      route_prefix="/other-model", num_cpus=0.5))
    try:
        matching = first.filter(pa.compute.equal(first["truth"], "1"))
        only_matching = label_table(
            uri, LabelOptions(task="digits", serve=other, relabel=True, where="truth = '1'"), progress=False
        )
        assert only_matching.planned == only_matching.labeled == matching.num_rows
        after = open_table(uri).to_table(columns=["id", "truth", "label_provenance"])
        changed = {r["id"] for r in after.to_pylist() if other_model in r["label_provenance"]}
        assert changed == set(matching["id"].to_pylist())

        everything = label_table(uri, LabelOptions(task="digits", serve=other, relabel=True), progress=False)
        assert everything.planned == 40 - matching.num_rows
        assert open_table(uri).count_rows(filter=f"label_provenance LIKE '{other_model}%'") == 40
    finally:
        stop_labeler("other-model")


def test_a_caption_task_writes_the_documented_columns(ray_cluster, tiny_qwen2_vl, tmp_path):
    # An attribute task's columns (one per attribute, confidence, error) are checked by the label job
    # of tests/test_label_train_loop.py::test_attribute_labels_train_an_adapter_whose_relabel_is_evaluated_per_attribute.
    uri = make_table(tmp_path, 6)
    label_table(uri, LabelOptions(task="caption", column="caption", model=str(tiny_qwen2_vl)), progress=False)
    table = open_table(uri).to_table()
    assert table.schema.field("caption").type == pa.string()
    assert table["caption_error"].to_pylist() == [None] * 6, "every caption was answered"
    assert all(isinstance(c, str) for c in table["caption"].to_pylist())


def test_cli_prints_the_json_summary(labeler, ray_cluster, tmp_path):
    uri = make_table(tmp_path, 10)
    out = subprocess.run(
        [LANCETAG, "label", uri, "--task", "digits", "--serve", labeler, "--json", "--address", ray_cluster.get_runtime_context().gcs_address],
        capture_output=True, text=True, check=True,
    ).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert {"planned", "labeled", "failed", "skipped", "fragments_committed", "version", "seconds"} <= set(summary)
    assert summary["planned"] == summary["labeled"] == 10 and summary["errors"] == {}


@pytest.mark.parametrize(
    ("task", "backend", "reason"),
    [("caption", "random", "task_kind_unsupported"), ("digits", "no_such_backend", "bad_option")],
)
def test_a_labeler_the_job_cannot_start_is_refused_before_anything_is_written(tmp_path, task, backend, reason):
    """Before: the task's empty label columns were committed first (a version), then the labeler refused."""
    uri = make_table(tmp_path, 4)
    before = lance.dataset(uri).version
    with pytest.raises(ReasonError) as refused:
        label_table(uri, LabelOptions(task=task, model="random", backend=backend), progress=False)
    assert refused.value.reason == reason and lance.dataset(uri).version == before


def test_eval_names_the_label_run_that_wrote_a_version_also_after_a_restore(labeler, tmp_path):
    """The run's summary is found by the version that stored it; a restore rolled the metadata that
    held it back, and eval of the labeled version then lost its cost and lineage."""
    from lance_io.versions import restore_version
    from ray_jobs.evaluation.job import evaluate_table

    uri = make_table(tmp_path, 12)
    first = lance.dataset(uri).version
    run = label_table(uri, LabelOptions(task="digits", serve=labeler, version_tag="lab"), progress=False)
    labeled = evaluate_table(uri, "label", version="lab")
    assert labeled.lineage["labels_written_by"] == f"label run {run.run_id}" and labeled.images_per_second > 0
    restore_version(uri, first)
    again = evaluate_table(uri, "label", version="lab")
    assert (again.lineage, again.images_per_second) == (labeled.lineage, labeled.images_per_second)


def test_a_labeler_serving_another_task_is_refused_with_what_to_do(labeler, tmp_path):
    uri = make_table(tmp_path, 4)
    before = lance.dataset(uri).version
    with pytest.raises(ReasonError, match="serves task 'digits'") as refused:
        label_table(uri, LabelOptions(task="hotel", serve=labeler), progress=False)
    assert refused.value.reason == "labeler_task_mismatch" and lance.dataset(uri).version == before

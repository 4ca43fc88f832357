"""The ingest job end to end on the session's local Ray cluster: real folders, a real HTTP server on
127.0.0.1, real Lance tables; every input accounted for, reruns add nothing. A kill -9 mid-run:
tests/reliability/test_ingest_kill.py; private URLs refused: tests/reliability/test_safe_defaults.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lance_io import open_table, read_errors
from lance_io.reasons import ReasonError
from lance_io.versions import list_versions
from ray_jobs.ingest import IngestOptions, ingest
from tests.conftest import LANCETAG
from tests.ingest_fixtures import HostileServer, build_class_folder, build_hostile_folder, image_bytes

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    with HostileServer() as running:
        yield running


def test_hostile_folder_counts_reconcile_and_every_error_is_recorded(ray_cluster, tmp_path: Path) -> None:
    folder = build_hostile_folder(tmp_path)
    table = str(tmp_path / "photos.lance")
    summary = ingest([str(folder.root)], table, IngestOptions(label_from_dir=True, **QUIET))
    assert summary.reconciled
    assert (summary.inputs, summary.added, summary.duplicates, summary.skipped) == (
        folder.inputs,
        folder.added,
        folder.duplicates,
        folder.skipped,
    )
    assert summary.errors_by_reason == dict(folder.errors)
    rows = open_table(table).to_table().to_pylist()
    assert len(rows) == folder.added == len({r["id"] for r in rows})
    by_name = {Path(r["source"]).name: r for r in rows}
    assert by_name["photo.png"]["truth"] == "c"
    assert by_name["animated.gif"]["frames"] == 3
    assert by_name["rotated.jpg"]["exif_orientation"] == 6
    assert by_name["cmyk.jpg"]["mode"] == "CMYK" and by_name["sixteen.png"]["mode"] == "I;16"
    assert by_name["phone.heic"]["format"] == "HEIF" and by_name["phone.heic"]["image"] == (folder.root / "phone.heic").read_bytes()
    assert by_name["été photo ü 写真.jpg"]["image"] == (folder.root / "été photo ü 写真.jpg").read_bytes()
    not_utf8 = by_name["cr\\xe8me \\xff.jpg"]  # a Latin-1 name: the bytes reached, the name shown escaped
    assert not_utf8["source"] == str(folder.root / "caf\\xe9" / "cr\\xe8me \\xff.jpg") and not_utf8["truth"] == "caf\\xe9"
    assert not_utf8["image"] == image_bytes(13)
    errors = read_errors(table, job=summary.job).to_pylist()
    assert sorted(e["reason"] for e in errors) == sorted(folder.errors.elements())
    assert all(e["message"] and e["source"] for e in errors)


def test_rerunning_the_same_ingest_adds_nothing(ray_cluster, tmp_path: Path) -> None:
    folder = build_hostile_folder(tmp_path)
    table = str(tmp_path / "photos.lance")
    first = ingest([folder.root], Path(table), IngestOptions(**QUIET))  # pathlib paths, as a Python user has them
    again = ingest([str(folder.root)], table, IngestOptions(**QUIET))
    assert first.table == table and again.added == 0 and again.version == first.version
    assert again.duplicates == first.added + first.duplicates
    assert again.reconciled and open_table(table).count_rows() == first.added


@pytest.mark.parametrize(
    "chunking",
    [{}, {"segment_items": 1, "commit_rows": 1}],
    ids=["one-task-one-commit", "a-commit-per-item"],  # a repeat found in the task / at commit time
)
def test_the_same_image_under_another_truth_is_a_truth_conflict_not_a_duplicate(
    ray_cluster, tmp_path: Path, chunking: dict
) -> None:
    """A table keeps an image once with one truth: a copy labeled otherwise is an error naming both."""
    folder = tmp_path / "classes"
    for name, seed in {"a/x.jpg": 1, "a/y.jpg": 2, "a/y_again.jpg": 2, "b/w.jpg": 3, "b/x_again.jpg": 1, "c/x_third.jpg": 1}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(image_bytes(seed))
    table = str(tmp_path / "t.lance")
    summary = ingest([str(folder)], table, IngestOptions(label_from_dir=True, **chunking, **QUIET))
    assert summary.reconciled and (summary.added, summary.duplicates, summary.errors) == (3, 1, 2)
    assert summary.errors_by_reason == {"truth_conflict": 2}
    truths = {Path(r["source"]).name: r["truth"] for r in open_table(table).to_table(columns=["source", "truth"]).to_pylist()}
    assert truths == {"x.jpg": "a", "y.jpg": "a", "w.jpg": "b"}  # the first copy in name order
    x_id = next(r["id"] for r in open_table(table).to_table(columns=["id", "source"]).to_pylist() if r["source"].endswith("x.jpg"))
    errors = read_errors(table, job=summary.job).to_pylist()
    assert sorted(Path(e["source"]).name for e in errors) == ["x_again.jpg", "x_third.jpg"]
    for error in errors:
        assert error["reason"] == "truth_conflict" and error["id"] == x_id
        assert str(folder / "a" / "x.jpg") in error["message"] and "'a'" in error["message"]
        assert f"'{Path(error['source']).parent.name}'" in error["message"]

    (tmp_path / "later" / "a").mkdir(parents=True)
    (tmp_path / "later" / "d").mkdir(parents=True)
    (tmp_path / "later" / "a" / "x.jpg").write_bytes(image_bytes(1))  # the truth the table keeps: a duplicate
    (tmp_path / "later" / "d" / "w.jpg").write_bytes(image_bytes(3))  # content the table holds as b
    later = ingest([str(tmp_path / "later")], table, IngestOptions(label_from_dir=True, **QUIET))
    assert (later.added, later.duplicates, later.errors_by_reason) == (0, 1, {"truth_conflict": 1}) and later.reconciled
    (conflict,) = read_errors(table, job=later.job).to_pylist()
    assert conflict["source"].endswith("w.jpg") and "'b'" in conflict["message"] and "'d'" in conflict["message"]


def test_of_two_copies_in_different_tasks_the_first_listed_is_kept_whichever_task_ends_first(ray_cluster, tmp_path: Path) -> None:
    """The first task holds the first copy and a large image that keeps it busy; the copy in a later
    task, which ends first, is still the one counted against the first, run after run."""
    folder = tmp_path / "classes"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    (folder / "a" / "0.png").write_bytes(image_bytes(1, "PNG"))
    (folder / "a" / "1-large.png").write_bytes(image_bytes(2, "PNG", size=(2500, 2500)))
    for n in range(4):
        (folder / "b" / f"{n}.png").write_bytes(image_bytes(10 + n, "PNG"))
    (folder / "b" / "4-copy-of-a0.png").write_bytes(image_bytes(1, "PNG"))
    for run in range(2):
        table = str(tmp_path / f"t{run}.lance")
        summary = ingest([str(folder)], table, IngestOptions(label_from_dir=True, batch_size=1, **QUIET))
        assert summary.errors_by_reason == {"truth_conflict": 1}, summary  # tasks of 2 items, 4 tasks
        (conflict,) = read_errors(table).to_pylist()
        assert conflict["source"] == str(folder / "b" / "4-copy-of-a0.png")
        kept = open_table(table).to_table(columns=["source", "truth"], filter=f"id = '{conflict['id']}'").to_pylist()
        assert kept == [{"source": str(folder / "a" / "0.png"), "truth": "a"}]


def test_labels_given_later_to_images_the_table_holds_without_a_truth_are_added_to_their_rows(
    ray_cluster, tmp_path: Path
) -> None:
    """Images ingested unlabeled, their classes given later (a folder per class): each row gets its
    truth, the image bytes and the other rows untouched; a copy then labeled otherwise is a conflict.
    Before, the three truths were reported as ``truth_conflict`` and never written."""
    folder = build_class_folder(tmp_path / "photos", {"a": 2, "b": 1})
    table = str(tmp_path / "photos.lance")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "unrelated.png").write_bytes(image_bytes(99, "PNG"))
    first = ingest([str(folder), str(tmp_path / "other")], table, IngestOptions(**QUIET))  # no labels
    before = open_table(table)
    data_files = {f.path for fragment in before.get_fragments() for f in fragment.data_files()}
    again = ingest([str(folder)], table, IngestOptions(label_from_dir=True, commit_rows=2, **QUIET))
    assert (again.added, again.duplicates, again.errors, again.truths_added) == (0, 3, 0, 3) and again.reconciled
    after = open_table(table)
    truths = {Path(r["source"]).parent.name + "/" + Path(r["source"]).name: r["truth"]
              for r in after.to_table(columns=["source", "truth"]).to_pylist()}
    assert truths == {**{f"{p.parent.name}/{p.name}": p.parent.name for p in folder.rglob("*.*")}, "other/unrelated.png": None}
    assert again.version == after.version > first.version
    assert data_files <= {f.path for fragment in after.get_fragments() for f in fragment.data_files()}  # bytes not rewritten
    assert after.to_table(columns=["image"]) == before.to_table(columns=["image"])
    (given,) = [v for v in list_versions(table) if v.properties.get("lancetag.operation") == "ingest_truths"]
    assert given.properties["lancetag.rows"] == "3" and given.properties["lancetag.job"] == again.job

    relabeled = tmp_path / "relabeled"
    (relabeled / "z").mkdir(parents=True)
    some = sorted(folder.rglob("*.*"))[0]
    (relabeled / "z" / some.name).write_bytes(some.read_bytes())
    later = ingest([str(relabeled)], table, IngestOptions(label_from_dir=True, **QUIET))
    assert (later.duplicates, later.truths_added, later.errors_by_reason) == (0, 0, {"truth_conflict": 1}) and later.reconciled
    (conflict,) = read_errors(table, job=later.job).to_pylist()
    assert f"'{some.parent.name}'" in conflict["message"] and "'z'" in conflict["message"]


def test_of_two_labeled_copies_of_an_image_held_without_a_truth_the_first_gives_it_and_the_other_conflicts(
    ray_cluster, tmp_path: Path
) -> None:
    table = str(tmp_path / "t.lance")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "x.png").write_bytes(image_bytes(5, "PNG"))
    ingest([str(tmp_path / "raw")], table, IngestOptions(**QUIET))
    for name in ("a/x.png", "b/x-copy.png"):
        (tmp_path / "classes" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "classes" / name).write_bytes(image_bytes(5, "PNG"))
    summary = ingest([str(tmp_path / "classes")], table, IngestOptions(label_from_dir=True, **QUIET))
    assert (summary.truths_added, summary.duplicates, summary.errors_by_reason) == (1, 1, {"truth_conflict": 1})
    assert open_table(table).to_table(columns=["truth"]).column("truth").to_pylist() == ["a"]
    (conflict,) = read_errors(table, job=summary.job).to_pylist()
    assert conflict["source"].endswith("x-copy.png") and "'a'" in conflict["message"] and "'b'" in conflict["message"]


def test_a_truth_another_writer_gives_between_the_lookup_and_the_commit_stays_and_this_one_conflicts(
    ray_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race ``truth IS NULL`` at commit time is for: ingest finds the row without a truth, another
    writer (a real Lance commit from another process) gives it one, then ingest commits. The other
    writer's truth stays, ingest looks the row up again and records its own copy as a conflict."""
    import pyarrow as pa

    import ray_jobs.ingest.commit as commit_module
    from lance_io.columns import commit_values
    from lance_io.table import kept_truths

    table = str(tmp_path / "t.lance")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "x.png").write_bytes(image_bytes(7, "PNG"))
    ingest([str(tmp_path / "raw")], table, IngestOptions(**QUIET))
    (tmp_path / "classes" / "a").mkdir(parents=True)
    (tmp_path / "classes" / "a" / "x.png").write_bytes(image_bytes(7, "PNG"))
    raced = tmp_path / "raced"

    def lookup_then_another_writer(uri, version, ids, **kwargs):  # runs in a Ray task: pickled by value
        kept = kept_truths(uri, version, ids, **kwargs)
        if not raced.exists():  # the first lookup only
            raced.touch()
            commit_values(uri, pa.table({"id": list(ids), "truth": ["z"] * len(ids)}), todo="truth IS NULL")
        return kept

    monkeypatch.setattr(commit_module, "kept_truths", lookup_then_another_writer)
    summary = ingest([str(tmp_path / "classes")], table, IngestOptions(label_from_dir=True, **QUIET))
    assert raced.exists()
    assert (summary.truths_added, summary.duplicates, summary.errors_by_reason) == (0, 0, {"truth_conflict": 1})
    assert summary.reconciled
    assert open_table(table).to_table(columns=["truth"]).column("truth").to_pylist() == ["z"]
    (conflict,) = read_errors(table, job=summary.job).to_pylist()
    assert "with truth 'z'" in conflict["message"] and "'a'" in conflict["message"]


def test_content_already_in_the_table_is_not_decoded_again(ray_cluster, tmp_path: Path) -> None:
    """A rerun with a 1-pixel limit: decoding any image would refuse it; known content is a duplicate."""
    folder = build_class_folder(tmp_path / "photos", {"a": 3, "b": 2})
    table = str(tmp_path / "photos.lance")
    first = ingest([str(folder)], table, IngestOptions(**QUIET))
    (folder / "a" / "new.png").write_bytes(image_bytes(7, "PNG", size=(9, 7)))
    again = ingest([str(folder)], table, IngestOptions(max_pixels=1, **QUIET))
    assert (first.added, again.added, again.duplicates, again.errors) == (5, 0, 5, 1)
    assert again.errors_by_reason == {"decompression_bomb": 1} and again.reconciled


def test_url_list_ingest_accounts_for_every_url(ray_cluster, tmp_path: Path, server: HostileServer) -> None:
    paths = [
        "/img/1.jpg",
        "/img/2.jpg",
        "/redirect/1.jpg",
        "/flaky/9.jpg",
        "/missing.jpg",
        "/loop",
        "/reset.jpg",
    ]
    paths += ["/endless.jpg", "/html.jpg", "/slow.jpg", "/down.jpg"]
    # a host IDNA cannot encode: the client refuses it, and that must stay this URL's error
    (tmp_path / "urls.txt").write_text(
        "\n".join(server.url(p) for p in paths) + "\nftp://nope/x.jpg\nhttp://\u2603.com/x.jpg\n"
    )
    options = IngestOptions(
        allow_private_urls=True, read_timeout_s=1, url_deadline_s=3, retries=2, max_bytes=2 * 1024**2, **QUIET
    )
    table = str(tmp_path / "u.lance")
    summary = ingest([str(tmp_path / "urls.txt")], table, options)
    assert summary.reconciled and summary.inputs == 13
    assert (summary.added, summary.duplicates) == (3, 1)
    assert summary.errors_by_reason == {
        "http_status": 2,
        "too_many_redirects": 1,
        "connection_failed": 1,
        "too_large": 1,
        "not_an_image": 1,
        "timeout": 1,
        "invalid_url": 2,
    }
    assert summary.seconds < 30


def test_datasets_sharegpt_and_manifest_land_in_one_trainable_table(ray_cluster, tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}
    )
    hf_rows = {"image": [{"bytes": image_bytes(300 + n), "path": None} for n in range(2)], "label": [0, 1]}
    datasets.Dataset.from_dict(hf_rows, features=features).save_to_disk(str(tmp_path / "hf"))
    modelscope_root = build_class_folder(tmp_path, {"beach": 2}, seed=400)
    (tmp_path / "img").mkdir()
    for n in range(3):
        (tmp_path / "img" / f"{n}.jpg").write_bytes(image_bytes(500 + n))
    turns = [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "a dog"}]
    pair = [{"from": "human", "value": "<image><image>Same?"}, {"from": "gpt", "value": "no"}]
    samples = [
        {"messages": turns, "images": ["img/0.jpg"]},
        {"conversations": pair, "images": ["img/1.jpg", "img/2.jpg"]},
    ]
    (tmp_path / "lf.json").write_text(json.dumps(samples))
    (tmp_path / "m.csv").write_text("path,caption\nimg/0.jpg,dup of the sharegpt image\n")
    table = str(tmp_path / "all.lance")
    summary = ingest(
        [
            str(tmp_path / "hf"),
            f"modelscope:{modelscope_root}",
            str(tmp_path / "lf.json"),
            str(tmp_path / "m.csv"),
        ],
        table,
        IngestOptions(prompt="<image>What animal is this?", answer_column="truth", **QUIET),
    )
    assert summary.reconciled and (summary.added, summary.duplicates, summary.errors) == (7, 1, 0)
    rows = open_table(table).to_table().to_pylist()
    kinds = sorted(r["source_kind"] for r in rows)
    assert kinds == ["hf", "hf", "modelscope", "modelscope", "sharegpt", "sharegpt", "sharegpt"]
    hf = [r for r in rows if r["source_kind"] == "hf"]
    assert sorted(r["truth"] for r in hf) == ["cat", "dog"]
    # conversations are samples beside the images: template ones (hf, modelscope) and sharegpt's
    from lance_io.samples import open_samples

    samples = open_samples(table).to_table().to_pylist()
    truth_of = {r["id"]: r["truth"] for r in rows}
    templated = [s for s in samples if s["source_kind"] in ("hf", "modelscope")]
    assert len(templated) == 2 and all(s["messages"][1]["content"] == truth_of[s["image_ids"][0]] for s in templated)
    assert [s["messages"] for s in samples if s["source_kind"] == "sharegpt" and len(s["image_ids"]) == 1] == [turns]
    assert summary.samples.samples_in == summary.samples.added == 4
    for sample in samples:  # what LLaMA-Factory needs: one <image> per image
        assert sum(t["content"].count("<image>") for t in sample["messages"]) == len(sample["image_ids"])


def test_cli_ingest_json_prints_reconciled_counts(ray_cluster, tmp_path: Path) -> None:
    folder = build_hostile_folder(tmp_path)
    table = str(tmp_path / "cli.lance")
    address = ray_cluster.get_runtime_context().gcs_address
    run = subprocess.run(
        [
            LANCETAG,
            "ingest",
            str(folder.root),
            str(tmp_path / "outside.jpg"),  # one image file is a source too
            "--table",
            table,
            "--label-from-dir",
            "--address",
            address,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"inputs", "added", "duplicates", "errors", "skipped", "version", "table"} <= out.keys()
    assert out["inputs"] == out["added"] + out["duplicates"] + out["errors"] + out["skipped"] == folder.inputs + 1
    assert out["table"] == table and out["version"] == open_table(table).version
    lone = open_table(table).to_table(columns=["source", "truth"], filter="source_kind = 'file'").to_pylist()
    assert lone == [{"source": str(tmp_path / "outside.jpg"), "truth": tmp_path.name}]  # --label-from-dir: its folder


def test_an_empty_table_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--table "$OUT"` with OUT unset: not a table in the working directory."""
    folder = build_class_folder(tmp_path / "photos", {"a": 1})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ReasonError, match="the table is empty") as refused:
        ingest([str(folder)], "", IngestOptions(**QUIET))
    assert refused.value.reason == "bad_option" and sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


@pytest.mark.parametrize(
    ("where", "reason"),
    [("under a file", "bad_option"), ("/sys/t.lance", "permission_denied"), ("/proc/t.lance", "write_failed")],
)
def test_a_table_no_table_can_be_created_at_is_refused_before_ray_starts(tmp_path: Path, where: str, reason: str) -> None:
    """Before: refused only at the workers' first write (write_failed), after Ray had started and the
    images were read."""
    folder = build_class_folder(tmp_path / "photos", {"a": 1})
    (tmp_path / "a-file").write_text("not a folder")
    table = str(tmp_path / "a-file" / "t.lance") if where == "under a file" else where
    run = subprocess.run(
        [LANCETAG, "ingest", str(folder), "--table", table, "--json"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and json.loads(run.stdout)["error"]["reason"] == reason, run.stdout + run.stderr[-500:]
    assert "Ray" not in run.stderr and "Started a local Ray" not in run.stderr


def test_cli_reports_an_unreadable_source_as_a_json_error(tmp_path: Path) -> None:
    run = subprocess.run(
        [LANCETAG, "ingest", str(tmp_path / "missing"), "--table", str(tmp_path / "t.lance"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert json.loads(run.stdout)["error"]["reason"] == "bad_source"

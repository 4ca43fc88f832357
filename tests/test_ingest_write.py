"""Workers write, the driver commits: exact dedup across tasks and commits, no image bytes to the driver,
where the work ran, new columns on an existing table. The session's local Ray cluster, real Lance tables.
Kill -9 of a worker and of the driver: tests/reliability/test_ingest_kill.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.data import png_bytes
from lance_io import append_images, ensure_columns, open_table
from lance_io.versions import list_versions
from ray_jobs.ingest import IngestOptions, ingest
from ray_jobs.ingest.job import items_per_task
from tests.ingest_fixtures import image_bytes
from tests.table_fixtures import image_rows

DISTINCT = 240


def _folder_with_far_copies(root: Path) -> tuple[Path, int]:
    """``a/`` holds DISTINCT images, ``z/`` a copy of every third: listed last, so read by other tasks."""
    for n in range(DISTINCT):
        data = image_bytes(n, "PNG", size=(48, 48))
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "a" / f"{n:04d}.png").write_bytes(data)
        if n % 3 == 0:
            (root / "z").mkdir(exist_ok=True)
            (root / "z" / f"copy-{n:04d}.png").write_bytes(data)
    return root, DISTINCT // 3


def _data_files(table: str) -> set[str]:
    return {p.name for p in (Path(table) / "data").iterdir()}


def _referenced(table: str) -> set[str]:
    return {Path(f.path).name for frag in open_table(table).get_fragments() for f in frag.metadata.files}


@pytest.mark.parametrize("commit_rows", [100_000, 30], ids=["one-chunk", "a-commit-per-task"])
def test_the_same_content_in_different_tasks_is_added_once(ray_cluster, tmp_path: Path, commit_rows: int) -> None:
    folder, copies = _folder_with_far_copies(tmp_path / "photos")
    table = str(tmp_path / "photos.lance")
    options = IngestOptions(batch_size=8, commit_rows=commit_rows, progress=False)
    assert items_per_task(DISTINCT + copies, 2, options.batch_size) < DISTINCT, "copies land in other tasks"

    summary = ingest([str(folder)], table, options)

    assert summary.reconciled
    assert (summary.inputs, summary.added, summary.duplicates) == (DISTINCT + copies, DISTINCT, copies)
    rows = open_table(table).to_table(columns=["id", "source", "image"]).to_pylist()
    assert len(rows) == len({r["id"] for r in rows}) == DISTINCT
    assert {Path(r["source"]).parent.name for r in rows} <= {"a", "z"}
    assert all(r["image"] == Path(r["source"]).read_bytes() for r in rows)
    assert _data_files(table) == _referenced(table), "a fragment that lost rows leaves no file behind"
    open_table(table).validate()


def test_the_driver_gets_outcomes_not_image_bytes_and_knows_where_the_work_ran(ray_cluster, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    image_total = 0
    for n in range(120):
        data = image_bytes(n, "PNG", size=(96, 96))  # ~27 KB of noise each
        (folder / f"{n:04d}.png").write_bytes(data)
        image_total += len(data)
    table = str(tmp_path / "photos.lance")

    summary = ingest([str(folder)], table, IngestOptions(progress=False))

    assert summary.added == 120
    assert 0 < summary.bytes_to_driver < image_total / 20, (summary.bytes_to_driver, image_total)
    assert sum(summary.nodes.values()) == summary.inputs and all(len(n) > 20 for n in summary.nodes)
    appended = [v for v in list_versions(table) if v.properties.get("lancetag.operation") == "append_images"]
    by_node = json.loads(appended[-1].properties["lancetag.rows_by_node"])
    assert set(by_node) <= set(summary.nodes) and sum(by_node.values()) == 120


def test_an_existing_table_keeps_its_columns_and_gains_the_new_ones(ray_cluster, tmp_path: Path) -> None:
    table = str(tmp_path / "photos.lance")
    append_images(table, image_rows(range(3)))
    import pyarrow as pa

    ensure_columns(table, [pa.field("label", pa.string())])
    manifest = tmp_path / "m.jsonl"
    folder = tmp_path / "new"
    folder.mkdir()
    lines = []
    for n in range(5):
        path = folder / f"{n}.png"
        path.write_bytes(image_bytes(100 + n, "PNG"))
        lines.append(json.dumps({"path": str(path), "shop": f"s{n}"}))
    manifest.write_text("\n".join(lines) + "\n")

    summary = ingest([str(manifest)], table, IngestOptions(progress=False))

    assert summary.added == 5
    rows = open_table(table).to_table(columns=["id", "label", "shop", "source"]).to_pylist()
    assert len(rows) == 8 and all(r["label"] is None for r in rows)
    assert sorted(r["shop"] for r in rows if r["shop"]) == [f"s{n}" for n in range(5)]
    open_table(table).validate()


def test_items_per_task_keep_every_cpu_busy_and_a_fragment_one_tagging_unit() -> None:
    assert items_per_task(100, 2, 64) == 64  # never below a batch
    assert items_per_task(4_000, 2, 64) == 1_000  # two tasks per CPU
    assert items_per_task(5_000, 2, 64) == 834  # 6 tasks, 3 full rounds on 2 CPUs (not 5: a round with one idle CPU)
    assert items_per_task(10_000_000, 64, 64) <= 1_024  # never above a fragment


def test_a_task_reads_the_next_group_while_it_checks_this_one_and_keeps_the_order():
    import threading
    import time

    from ray_jobs.ingest.write import read_ahead

    events: list[str] = []
    lock = threading.Lock()

    def read(group: int) -> str:
        with lock:
            events.append(f"read {group} start")
        time.sleep(0.05)
        return f"bytes of {group}"

    seen = []
    for group, data in read_ahead([0, 1, 2, 3], read):
        with lock:
            events.append(f"check {group} start")
        time.sleep(0.2)  # the CPU half: the next read runs meanwhile
        with lock:
            events.append(f"check {group} end")
        seen.append((group, data))

    assert seen == [(g, f"bytes of {g}") for g in range(4)]
    for group in range(3):
        assert events.index(f"read {group + 1} start") < events.index(f"check {group} end"), events
    assert events.index("read 2 start") > events.index("check 0 start"), "at most one group read ahead"

    def broken(group: int) -> str:
        raise OSError(f"read {group} failed")

    with pytest.raises(OSError, match="read 0 failed"):
        list(read_ahead([0, 1], broken))


def test_content_another_writer_commits_between_the_lookup_and_the_commit_is_not_added_again(
    ray_cluster, tmp_path: Path, monkeypatch
) -> None:
    """A second writer (another ingest, in another process) commits the same content in the gap."""
    import ray_jobs.ingest.commit as commit

    table = str(tmp_path / "photos.lance")
    append_images(table, image_rows(range(1000, 1003)))
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(60):
        (folder / f"{seed:03d}.png").write_bytes(png_bytes(seed))
    commit_now = commit.commit_fragments
    other: list[int] = []

    def another_writer_commits_first(*args, **kwargs):
        if not other:
            other.append(append_images(table, image_rows(range(50, 70))).added)  # 50-59 are in the folder too
        return commit_now(*args, **kwargs)

    monkeypatch.setattr(commit, "commit_fragments", another_writer_commits_first)
    summary = ingest([str(folder)], table, IngestOptions(progress=False))

    assert other == [20]
    assert summary.reconciled
    assert (summary.inputs, summary.added, summary.duplicates) == (60, 50, 10)
    rows = open_table(table).to_table(columns=["id", "source"]).to_pylist()
    assert len(rows) == len({r["id"] for r in rows}) == 3 + 20 + 50, "every content once"
    assert sum(r["source"].startswith("test://") for r in rows) == 23, "the first writer's copies stay"
    assert summary.version == open_table(table).version
    open_table(table).validate()


def test_a_hugging_face_dataset_s_images_go_from_its_arrow_files_to_the_workers_not_through_the_driver(
    ray_cluster, tmp_path: Path
) -> None:
    import datasets

    images = [image_bytes(n, "PNG", size=(96, 96)) for n in range(120)]  # ~27 KB of noise each
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    rows = {"image": [{"bytes": b, "path": f"img-{n}.png"} for n, b in enumerate(images)], "label": [n % 3 for n in range(120)]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"), num_shards=2)
    table = str(tmp_path / "photos.lance")

    summary = ingest([str(tmp_path / "hf")], table, IngestOptions(progress=False))

    assert summary.reconciled and summary.added == 120
    assert 0 < summary.bytes_from_driver < sum(map(len, images)) / 20, (summary.bytes_from_driver, sum(map(len, images)))
    stored = {r["source"]: r for r in open_table(table).to_table(columns=["source", "image", "truth"]).to_pylist()}
    assert [stored[f"img-{n}.png"]["image"] for n in range(120)] == images, "every image's bytes, unchanged"
    assert [stored[f"img-{n}.png"]["truth"] for n in range(120)] == ["abc"[n % 3] for n in range(120)]


def test_an_existing_lance_table_s_images_go_to_the_workers_not_through_the_driver(ray_cluster, tmp_path: Path) -> None:
    """Copying a table into another (a new project, a merge): the bytes go from table to table on the workers."""
    images = [image_bytes(n, "PNG", size=(96, 96)) for n in range(130)]  # ~27 KB of noise each
    first = str(tmp_path / "first.lance")
    for n, data in enumerate(images):
        (tmp_path / "photos" / "ab"[n % 2]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / "ab"[n % 2] / f"{n}.png").write_bytes(data)
    ingest([str(tmp_path / "photos")], first, IngestOptions(progress=False, label_from_dir=True))
    copy = str(tmp_path / "copy.lance")

    summary = ingest([first], copy, IngestOptions(progress=False))

    assert summary.reconciled and summary.added == 130
    assert 0 < summary.bytes_from_driver < sum(map(len, images)) / 20, (summary.bytes_from_driver, sum(map(len, images)))
    columns = ["id", "image", "truth"]
    assert sorted(open_table(copy).to_table(columns=columns).to_pylist(), key=lambda r: r["id"]) == sorted(
        open_table(first).to_table(columns=columns).to_pylist(), key=lambda r: r["id"]
    )


def test_multi_image_samples_and_row_groups_with_a_null_image_send_no_image_bytes_through_the_driver(
    ray_cluster, tmp_path: Path
) -> None:
    """A list of images per row (Hugging Face ``save_to_disk`` and Hub Parquet), and Parquet row groups the
    statistics cannot vouch for: the workers read every image; the driver sends locations."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lance_io.samples import open_samples
    from lance_io.schema import image_id

    images = [image_bytes(n, "PNG", size=(96, 96)) for n in range(60)]  # ~27 KB of noise each
    pairs = [[{"bytes": images[2 * n], "path": None}, {"bytes": images[2 * n + 1], "path": None}] for n in range(30)]
    chats = [[{"role": "user", "content": "<image><image>Same?"}, {"role": "assistant", "content": f"No {n}."}] for n in range(30)]
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
    })
    datasets.Dataset.from_dict({"images": pairs, "messages": chats}, features=features).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "pq").mkdir()
    pq.write_table(datasets.Dataset.from_dict({"images": pairs, "messages": chats}, features=features).data.table,
                   tmp_path / "pq" / "train.parquet", row_group_size=8)
    photos = [{"bytes": b, "path": f"p{n}.png"} for n, b in enumerate(images)] + [None]  # the last row group has a null
    pq.write_table(pa.table({"image": pa.array(photos, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}),
                   tmp_path / "photos.parquet", row_group_size=16)

    for source, added, samples in ((tmp_path / "hf", 60, 30), (tmp_path / "pq" / "train.parquet", 60, 30),
                                   (tmp_path / "photos.parquet", 60, 0)):
        table = str(tmp_path / f"{source.stem}.lance")
        summary = ingest([str(source)], table, IngestOptions(progress=False))
        assert summary.reconciled and (summary.added, summary.samples.added) == (added, samples), source
        assert 0 < summary.bytes_from_driver < sum(map(len, images)) / 20, (source, summary.bytes_from_driver)
        assert sorted(open_table(table).to_table(columns=["image"]).column("image").to_pylist()) == sorted(images)
        if samples:
            got = sorted(open_samples(table).to_table(columns=["image_ids"]).column("image_ids").to_pylist())
            assert got == sorted([image_id(images[2 * n]), image_id(images[2 * n + 1])] for n in range(30)), "in order"
    assert summary.errors_by_reason == {"missing_location": 1}, "the null image: an error record"

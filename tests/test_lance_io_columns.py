"""Computed columns committed by id in groups: incremental, resumable, append-safe, image bytes untouched."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lance
import pyarrow as pa
import pytest

from lance_io import append_images, ensure_columns, open_table, plan_fragments, write_fragment
from lance_io.columns import commit_values, fill_column, todo_batches
from lance_io.schema import IMAGE
from tests.table_fixtures import image_rows

OUTPUT = pa.schema([pa.field("label", pa.string()), pa.field("label_len", pa.int32())])
REPO = Path(__file__).resolve().parent.parent


def bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def upper_label(batch: pa.RecordBatch) -> pa.RecordBatch:
    labels = [f"L-{i[:4]}" for i in batch.column("id").to_pylist()]
    return pa.record_batch([pa.array(labels), pa.array([len(x) for x in labels], pa.int32())], schema=OUTPUT)


def image_data_files(uri: str) -> set[str]:
    ds = lance.dataset(uri)
    image_field = ds.lance_schema.field(IMAGE).id() if hasattr(ds, "lance_schema") else 1
    return {d.path for f in ds.get_fragments() for d in f.data_files() if image_field in d.fields}


def label_everything(uri: str, where: str | None = None, todo: str = "label IS NULL") -> int:
    return fill_column(uri, upper_label, read_columns=["id"], output_schema=OUTPUT, todo=todo, where=where).rows_written


def rows_audited(uri: str, operation: str) -> int:
    """Sum of ``lancetag.rows`` over the commits of one operation (the exactly-once audit)."""
    ds, rows = lance.dataset(uri), 0
    for v in ds.versions():
        try:
            properties = ds.read_transaction(v["version"]).transaction_properties or {}
        except TypeError:  # pylance 14.0.2 cannot read a compaction that rewrote the id index
            continue
        rows += int(properties["lancetag.rows"]) if properties.get("lancetag.operation") == operation else 0
    return rows


@pytest.fixture
def table(tmp_path) -> str:
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(40), padding=100_000), max_rows_per_file=10)
    return uri


def test_adding_columns_is_metadata_only_and_plans_every_fragment(table, tmp_path):
    before = bytes_on_disk(tmp_path / "t.lance")
    ensure_columns(table, OUTPUT)
    assert bytes_on_disk(tmp_path / "t.lance") - before < 10_000
    plan = plan_fragments(table, "label IS NULL")
    assert [(p.fragment_id, p.rows) for p in plan] == [(0, 10), (1, 10), (2, 10), (3, 10)]


def test_many_fragments_share_one_commit_and_image_bytes_are_never_rewritten(table, tmp_path):
    images_before = image_data_files(table)
    size_before = bytes_on_disk(tmp_path / "t.lance")
    version_before = open_table(table).version

    assert label_everything(table) == 40

    ds = open_table(table)
    assert ds.version - version_before == 1 + 1, "one version for the new columns, one for the 4 fragments' values"
    assert ds.to_table(filter="label IS NULL").num_rows == 0
    assert image_data_files(table) == images_before
    written = bytes_on_disk(tmp_path / "t.lance") - size_before
    assert written < 0.01 * size_before, f"{written} bytes written for labels of a {size_before}-byte table"
    assert plan_fragments(table, "label IS NULL") == []
    assert rows_audited(table, "fill_column") == 40


def test_commit_values_writes_only_rows_still_todo_in_one_version_per_call(table):
    ensure_columns(table, OUTPUT)
    ids = open_table(table).to_table(columns=["id"]).column("id").to_pylist()
    some = ids[::3]  # spread over all 4 fragments
    first = commit_values(table, pa.table({"id": some, "label": ["a"] * len(some)}), todo="label IS NULL")
    assert first.rows == len(some) and first.fragments == (0, 1, 2, 3)
    assert open_table(table).version == first.version

    everything = pa.table({"id": ids, "label": ["b"] * len(ids)})
    second = commit_values(table, everything, todo="label IS NULL", properties={"lancetag.job": "j2"})
    assert second.rows == len(ids) - len(some), "rows labeled by the first commit are not written again"
    assert commit_values(table, everything, todo="label IS NULL").version is None, "nothing left: no version"
    labels = dict(zip(*open_table(table).to_table(columns=["id", "label"]).to_pydict().values(), strict=True))
    assert [labels[i] for i in some] == ["a"] * len(some)
    assert rows_audited(table, "commit_values") == 40


def test_todo_batches_reads_the_fragments_in_the_order_given_with_one_fragment_and_its_row_ids_per_batch(table):
    """One scanner over the fragments: the order given, a fragment gone since the plan skipped, no batch holding
    rows of two fragments, each row with the ``_rowid`` it lives at."""
    ensure_columns(table, OUTPUT)
    ds = open_table(table)
    where = {r["id"]: r["_rowid"] for r in ds.to_table(columns=["id"], with_row_id=True).to_pylist()}
    of = {f: [i for i, r in where.items() if r >> 32 == f] for f in range(4)}
    picked = [*of[0], *of[1][:2], *of[2][:3], *of[3]]
    todo = f"label IS NULL AND id IN ({', '.join(repr(i) for i in picked)})"
    read = list(todo_batches(ds, [3, 1, 99, 2, 0], ["truth"], todo, batch_size=4))
    assert [f for f, _ in itertools.groupby(f for f, _ in read)] == [3, 1, 2, 0], "fragments in order, 99 skipped"
    assert all(where[i] >> 32 == f for f, b in read for i in b.column("id").to_pylist()), "one fragment a batch"
    assert all(where[i] == r for _, b in read for i, r in zip(b.column("id").to_pylist(), b.column("_rowid").to_pylist(),
                                                               strict=True))
    counts = Counter(f for f, b in read for _ in range(b.num_rows))
    assert counts == {3: 10, 1: 2, 2: 3, 0: 10} and all(b.num_rows <= 4 for _, b in read)
    assert read[0][1].column_names == ["id", "truth", "_rowid"]


def test_commit_values_takes_rows_by_the_row_id_they_were_read_with_and_looks_up_only_rows_gone_from_it(table, monkeypatch):
    """Values carrying ``_rowid`` are taken by it (no id lookup in the whole table), whether the row is still todo or
    not; rows an update moved, a deleted row, a row id of a fragment the table lacks or of a row holding another id,
    and a null row id are looked up by id."""
    from lance_io import columns

    ensure_columns(table, OUTPUT)
    rows = open_table(table).to_table(columns=["id"], with_row_id=True)
    ids = rows.column("id").to_pylist()
    row_id = dict(zip(ids, rows.column("_rowid").to_pylist(), strict=True))
    looked_up: list[str] = []
    real_lookup = columns.rows_with_ids

    def counted_lookup(ds, wanted, *args, **kwargs):
        looked_up.extend(wanted)
        return real_lookup(ds, wanted, *args, **kwargs)

    monkeypatch.setattr(columns, "rows_with_ids", counted_lookup)

    def commit(batch: list[str], label: str, row_ids: list[int | None] | None = None, todo: str | None = "label IS NULL"):
        values = pa.table({"id": batch, "label": [label] * len(batch),
                           "_rowid": pa.array(row_ids or [row_id[i] for i in batch], pa.uint64())})
        return commit_values(table, values, todo=todo)

    first = [i for i in ids if row_id[i] >> 32 in (0, 1)]
    done = commit(first, "a")
    assert (done.rows, done.fragments, looked_up) == (20, (0, 1), []), "taken by row id: no lookup"
    assert "_rowid" not in done.written.column_names

    moved = [i for i in ids if row_id[i] >> 32 == 2]
    lance.dataset(table).update({"truth": "'moved'"}, where=f"id IN ({', '.join(repr(i) for i in moved)})")
    rest = [i for i in ids if row_id[i] >> 32 in (2, 3)]
    done = commit(rest, "b")
    assert done.rows == 20 and sorted(looked_up) == sorted(moved), "only the rows the update moved, by id"
    labels = dict(zip(*open_table(table).to_table(columns=["id", "label"]).to_pydict().values(), strict=True))
    assert [labels[i] for i in first] == ["a"] * 20 and [labels[i] for i in rest] == ["b"] * 20
    looked_up.clear()
    in_place = [i for i in ids if i not in moved]
    assert commit(in_place, "c").version is None and looked_up == [], "there, not todo: settled by the take"

    def unlabel(row: str) -> int:
        lance.dataset(table).update({"label": "NULL"}, where=f"id = '{row}'")
        return open_table(table).to_table(columns=["id"], filter=f"id = '{row}'", with_row_id=True).column(
            "_rowid")[0].as_py()

    other = unlabel(ids[39])  # todo, and not among the values below
    for label, row, stale in [("d", ids[0], lambda now: now + (100 << 32)),  # a fragment the table lacks
                              ("d", ids[1], lambda now: other),  # a row holding another id
                              ("d", ids[3], lambda now: (now >> 32 << 32) + 5000),  # past its fragment's rows
                              ("d", ids[2], lambda now: None)]:  # not read with a row id
        now = unlabel(row)
        looked_up.clear()
        done = commit([row], label, [stale(now)])
        assert (done.rows, done.fragments, looked_up) == (1, (now >> 32,), [row]), label
    looked_up.clear()
    assert commit([ids[39]], "f", [other], todo="label != 'f'").version is None, "NULL is not todo, as in a filter"
    assert looked_up == []
    in_3 = [i for i in ids if row_id[i] >> 32 == 3][:2]  # a fragment the update left alone
    assert commit(in_3[:1], "e", todo=None).rows == 1, "todo None: whatever the row holds"
    lance.dataset(table).delete(f"id = '{in_3[1]}'")
    looked_up.clear()
    assert commit(in_3[1:], "e", todo=None).version is None and looked_up == [in_3[1]], "deleted: gone from its row id"
    labels = dict(zip(*open_table(table).to_table(columns=["id", "label"]).to_pydict().values(), strict=True))
    assert [labels[i] for i in [*ids[:4], in_3[0]]] == ["d", "d", "d", "d", "e"] and in_3[1] not in labels


def test_commit_values_takes_rows_by_stable_row_id_after_a_compaction(tmp_path, monkeypatch):
    """A table with stable row ids keeps them through a compaction: the commit finds the moved rows without a lookup."""
    from lance_io import columns

    uri = str(tmp_path / "stable.lance")
    tags = pa.list_(pa.string())  # a list column too: the values are matched to rows without a join on them
    lance.write_dataset(pa.table({"id": [f"r{i}" for i in range(30)], "label": pa.nulls(30, pa.string()),
                                  "tags": pa.nulls(30, tags)}), uri, max_rows_per_file=10, enable_stable_row_ids=True)
    read = lance.dataset(uri).to_table(columns=["id"], with_row_id=True)
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=30)
    assert [f.fragment_id for f in lance.dataset(uri).get_fragments()] == [3]
    monkeypatch.setattr(columns, "rows_with_ids", lambda *a, **k: pytest.fail("looked up by id"))
    values = read.append_column("label", pa.array([f"x{i}" for i in range(30)])).append_column(
        "tags", pa.array([[f"t{i}"] for i in range(30)], tags)).select(["id", "label", "tags", "_rowid"])
    done = commit_values(uri, values.take(list(range(29, -1, -1))), todo="label IS NULL")
    assert (done.rows, done.fragments) == (30, (3,))
    rows = lance.dataset(uri).to_table(columns=["id", "label", "tags"]).to_pylist()
    assert all(r["label"] == f"x{r['id'][1:]}" and r["tags"] == [f"t{r['id'][1:]}"] for r in rows)

def test_where_updates_only_matching_rows_without_rewriting_images(table, tmp_path):
    label_everything(table)
    ds = open_table(table)
    target_ids = ds.to_table(columns=["id"], filter="truth = '1'").column("id").to_pylist()
    images_before = image_data_files(table)

    def relabel(batch: pa.RecordBatch) -> pa.RecordBatch:
        return pa.record_batch([pa.array(["NEW"] * batch.num_rows), pa.array([3] * batch.num_rows, pa.int32())], schema=OUTPUT)

    total = 0
    for frag in plan_fragments(table, "label != 'NEW'", where="truth = '1'"):
        total += write_fragment(
            table, frag.fragment_id, relabel, read_columns=[], output_schema=OUTPUT, todo="label != 'NEW'", where="truth = '1'"
        ).rows_written
    assert total == len(target_ids) > 0
    after = open_table(table).to_table(columns=["id", "label"])
    changed = {i for i, lab in zip(after["id"].to_pylist(), after["label"].to_pylist(), strict=True) if lab == "NEW"}
    assert changed == set(target_ids)
    assert image_data_files(table) == images_before


def test_rows_appended_during_a_write_are_kept_and_reported_as_still_to_do(table):
    ensure_columns(table, OUTPUT)
    plan = plan_fragments(table, "label IS NULL")
    appended = False

    def compute_and_append_once(batch: pa.RecordBatch) -> pa.RecordBatch:
        nonlocal appended
        if not appended:  # another writer appends while this fragment is being computed
            append_images(table, image_rows(range(100, 105)))
            appended = True
        return upper_label(batch)

    for frag in plan:
        write_fragment(table, frag.fragment_id, compute_and_append_once, read_columns=[], output_schema=OUTPUT, todo="label IS NULL")
    ds = open_table(table)
    assert ds.count_rows() == 45
    assert ds.to_table(filter="label IS NULL").num_rows == 5
    assert sum(p.rows for p in plan_fragments(table, "label IS NULL")) == 5
    assert label_everything(table) == 5


def test_concurrent_job_on_the_same_column_does_not_overwrite_finished_rows(table):
    """A second writer that computed values for rows the first already committed writes nothing there."""
    ensure_columns(table, OUTPUT)
    plan = plan_fragments(table, "label IS NULL")

    def other_job_wins(batch: pa.RecordBatch) -> pa.RecordBatch:
        # Before this job commits, another job labels the same fragment.
        write_fragment(table, plan[0].fragment_id, upper_label, read_columns=[], output_schema=OUTPUT, todo="label IS NULL")
        return pa.record_batch([pa.array(["LATE"] * batch.num_rows), pa.array([4] * batch.num_rows, pa.int32())], schema=OUTPUT)

    result = write_fragment(table, plan[0].fragment_id, other_job_wins, read_columns=[], output_schema=OUTPUT, todo="label IS NULL")
    assert result.rows_written == 0
    assert open_table(table).to_table(filter="label = 'LATE'").num_rows == 0


def test_compaction_between_compute_and_commit_reapplies_values_to_the_moved_rows(table):
    ensure_columns(table, OUTPUT)
    plan = plan_fragments(table, "label IS NULL")

    def compute_then_compact(batch: pa.RecordBatch) -> pa.RecordBatch:
        lance.dataset(table).optimize.compact_files(target_rows_per_fragment=1000)
        return upper_label(batch)

    result = write_fragment(table, plan[0].fragment_id, compute_then_compact, read_columns=[], output_schema=OUTPUT, todo="label IS NULL")
    assert result.rows_written == plan[0].rows
    ds = open_table(table)
    assert plan[0].fragment_id not in [f.fragment_id for f in ds.get_fragments()], "compaction moved the rows"
    assert ds.count_rows() == 40
    assert ds.to_table(filter="label IS NOT NULL").num_rows == plan[0].rows


def test_a_compaction_committed_between_locating_and_committing_is_a_conflict_retried_by_relocating(table, monkeypatch):
    """The race a running compaction causes: Lance refuses the stale Update (CommitConflictError), the rows are located again."""
    from lance_io import columns

    ensure_columns(table, OUTPUT)
    ids = open_table(table).to_table(columns=["id"]).column("id").to_pylist()
    real_locate, compactions = columns._locate, []

    def locate_then_compact(ds, *args):  # fault injection: a compaction commits right after this commit located its rows
        found = real_locate(ds, *args)
        if not compactions:
            compactions.append(lance.dataset(table).optimize.compact_files(target_rows_per_fragment=1000))
        return found

    monkeypatch.setattr(columns, "_locate", locate_then_compact)
    done = commit_values(table, pa.table({"id": ids, "label": ["c"] * 40}), todo="label IS NULL")
    monkeypatch.undo()

    assert done.conflicts == 1 and done.rows == 40
    ds = open_table(table)
    assert [f.fragment_id for f in ds.get_fragments()] == list(done.fragments), "the values went to the compacted fragment"
    assert ds.count_rows(filter="label = 'c'") == 40 and rows_audited(table, "commit_values") == 40


def test_kill_9_mid_write_leaves_a_valid_table_and_rerun_finishes_only_what_is_left(tmp_path):
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(120)), max_rows_per_file=20)
    log1, log2 = tmp_path / "run1.log", tmp_path / "run2.log"
    cmd = [sys.executable, "-m", "tests.fragment_writer", uri]
    proc = subprocess.Popen([*cmd, str(log1), "--delay", "0.15", "--commit-rows", "8"], cwd=REPO)
    # Kill it once it has committed some, but not all, of its work.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ds = lance.dataset(uri)
        done = ds.to_table(filter="label IS NOT NULL").num_rows if "label" in ds.schema.names else 0
        if done >= 30:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    ds = open_table(uri)  # the table opens at a valid version
    committed = set(ds.to_table(columns=["id"], filter="label IS NOT NULL").column("id").to_pylist())
    assert 30 <= len(committed) < 120

    subprocess.run([*cmd, str(log2)], cwd=REPO, check=True)
    recomputed = set(log2.read_text().split())
    assert not (recomputed & committed), "the rerun must not label a committed row again"
    final = open_table(uri).to_table(columns=["id", "label"])
    assert final.num_rows == 120 and final.filter(pa.compute.is_null(final["label"])).num_rows == 0
    counts = Counter(log1.read_text().split()) + Counter(log2.read_text().split())
    assert set(counts) == set(final["id"].to_pylist())
    assert rows_audited(uri, "fill_column") == 120, "no row was written twice"


def test_another_process_appending_while_a_process_writes_loses_no_row(tmp_path):
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(60)), max_rows_per_file=10)
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.fragment_writer", uri, str(tmp_path / "w.log"), "--delay", "0.05", "--commit-rows", "8"],
        cwd=REPO,
    )
    appender = subprocess.run(
        [sys.executable, "-c", (
            "import sys, time; sys.path.insert(0, '.');"
            "from lance_io import append_images; from tests.table_fixtures import image_rows;"
            f"[append_images({uri!r}, image_rows(range(1000 + 10 * k, 1010 + 10 * k))) or time.sleep(0.1) for k in range(5)]"
        )],
        cwd=REPO, capture_output=True, text=True,
    )
    assert appender.returncode == 0, appender.stderr
    assert writer.wait(timeout=120) == 0
    ds = open_table(uri)
    assert ds.count_rows() == 110
    still_to_do = sum(p.rows for p in plan_fragments(uri, "label IS NULL"))
    assert still_to_do == ds.to_table(filter="label IS NULL").num_rows
    assert still_to_do <= 50
    assert label_everything(uri) == still_to_do
    assert open_table(uri).to_table(filter="label IS NULL").num_rows == 0



def test_an_append_committed_between_reading_and_adding_columns_is_retried_not_fatal(tmp_path, monkeypatch):
    """The race seen in CI: an ingest commits after ensure_columns read the table, before add_columns."""
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(10)))
    real_dataset, appends = lance.dataset, []

    def dataset_then_an_append(*args, **kwargs):  # fault injection: another writer wins the race, twice
        ds = real_dataset(*args, **kwargs)
        if len(appends) < 2:
            k = len(appends)
            appends.append(k)  # before appending: append_images opens the table too
            append_images(uri, image_rows(range(100 + 10 * k, 110 + 10 * k)))
        return ds

    monkeypatch.setattr(lance, "dataset", dataset_then_an_append)
    version = ensure_columns(uri, [pa.field("label", pa.string())])
    monkeypatch.undo()

    ds = open_table(uri)
    assert len(appends) == 2 and "label" in ds.schema.names and ds.version == version
    assert ds.count_rows() == 30 and ds.count_rows(filter="label IS NULL") == 30


def test_a_label_prefix_that_would_overwrite_columns_no_label_run_wrote_is_column_taken(table):
    from lance_io.labels import check_label_target, label_schema
    from lance_io.reasons import ReasonError
    from lance_io.tasks import load_task, task_from_dict

    digits, fashion = load_task("digits"), load_task("fashion")
    schema = lance.dataset(table).schema
    for task, column in [(digits, "truth"), (digits, "id"), (digits, "source")]:
        with pytest.raises(ReasonError) as refused:
            check_label_target(schema, task, column)
        assert refused.value.reason == "column_taken" and column in refused.value.message, (task.name, column)
    ensure_columns(table, [pa.field("size_error", pa.string())])  # a user's column that only an auxiliary name meets
    with pytest.raises(ReasonError, match="size_error"):
        check_label_target(lance.dataset(table).schema, digits, "size")

    ensure_columns(table, label_schema(digits, "label"))  # what a label run adds: relabeling it is fine
    ensure_columns(table, label_schema(fashion, "attrs"))
    schema = lance.dataset(table).schema
    check_label_target(schema, digits, "label")
    check_label_target(schema, task_from_dict({"name": "d2", "kind": "classify", "labels": ["a", "b"]}), "label")
    check_label_target(schema, fashion, "attrs")
    check_label_target(schema, digits, "fresh")
    check_label_target(schema, fashion, "source")  # source_category, ...: names the table does not hold
    for other_kind in [load_task("quality"), load_task("caption")]:  # answers of another kind (or type)
        with pytest.raises(ReasonError, match="holds classify answers") as refused:
            check_label_target(schema, other_kind, "label")
        assert refused.value.reason == "column_taken"

    with pytest.raises(ReasonError, match="no id or image column") as refused:  # someone else's table
        check_label_target(pa.schema([("a", pa.int64())]), digits, "label")
    assert refused.value.reason == "column_missing"
    text_only = task_from_dict({"name": "g", "kind": "generate", "inputs": {"fabric": "attrs_fabric"}, "prompt": "{fabric}", "image": False})
    check_label_target(pa.schema([("id", pa.string()), ("attrs_fabric", pa.string())]), text_only, "desc")

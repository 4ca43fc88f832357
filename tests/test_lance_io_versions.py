"""Versions for data scientists, the table CLI, and tables on S3."""

from __future__ import annotations

import json
import random
import subprocess

import numpy as np
import pyarrow as pa
import pytest

from lance_io import append_images, ensure_columns, open_table, plan_fragments, write_fragment
from lance_io.diff import diff_versions
from lance_io.versions import list_versions, restore_version, tag_version
from tests.conftest import LANCETAG
from tests.table_fixtures import image_rows

OUTPUT = pa.schema([pa.field("label", pa.string())])


def set_labels(uri: str, labels: dict[str, str], job: str) -> None:
    """Write `label` for the given ids (a hand-built labeling job)."""
    ensure_columns(uri, OUTPUT)

    def compute(batch: pa.RecordBatch) -> pa.RecordBatch:
        return pa.record_batch([pa.array([labels[i] for i in batch.column("id").to_pylist()])], schema=OUTPUT)

    where = "id IN (" + ", ".join(f"'{i}'" for i in labels) + ")"
    for frag in plan_fragments(uri, "true", where=where):
        write_fragment(
            uri, frag.fragment_id, compute, read_columns=[], output_schema=OUTPUT, todo="true", where=where,
            properties={"lancetag.job": job},
        )


@pytest.fixture
def history(tmp_path):
    """A table with a hand-built history: 6 rows, labels a/b, then 2 relabeled and 2 rows added."""
    uri = str(tmp_path / "h.lance")
    rows = image_rows(range(6))
    ids = rows.column("id").to_pylist()
    append_images(uri, rows)
    set_labels(uri, {i: ("a" if k < 3 else "b") for k, i in enumerate(ids)}, job="zero-shot")
    v_before = tag_version(uri, "zero-shot")
    set_labels(uri, {ids[0]: "b", ids[1]: "b"}, job="fine-tuned")
    append_images(uri, image_rows(range(6, 8)))
    v_after = tag_version(uri, "fine-tuned")
    return uri, ids, v_before, v_after


def test_diff_reports_added_rows_and_label_changes_on_a_hand_built_case(history):
    uri, ids, v_before, v_after = history
    d = diff_versions(uri, "zero-shot", "fine-tuned", column="label")
    assert (d.before, d.after) == (v_before, v_after)
    assert d.added == 2 and d.removed == 0
    (column,) = d.columns
    assert column.before == {"a": 3, "b": 3}
    assert column.after == {"b": 5, "a": 1, None: 2}
    assert column.changed == 2 and set(column.changed_ids) == {ids[0], ids[1]}


def test_versions_list_what_each_did_with_job_parameters_and_tags(history):
    uri, _, v_before, v_after = history
    infos = list_versions(uri)
    assert [v.version for v in infos] == sorted(v.version for v in infos)
    by_version = {v.version: v for v in infos}
    assert by_version[v_before].tags == ["zero-shot"] and by_version[v_after].tags == ["fine-tuned"]
    jobs = [v.properties.get("lancetag.job") for v in infos]
    assert "zero-shot" in jobs and "fine-tuned" in jobs
    assert {v.properties.get("lancetag.operation") for v in infos} >= {"append_images", "write_fragment"}


def test_restore_makes_an_old_version_latest_again(history):
    uri, _, _, _ = history
    new = restore_version(uri, "zero-shot")
    ds = open_table(uri)
    assert ds.version == new and ds.count_rows() == 6
    assert ds.to_table(filter="label = 'a'").num_rows == 3


def test_restore_brings_the_training_samples_of_that_version_back(tmp_path):
    """Before: the samples stayed at the latest, so a restored table's samples pointed at images it no
    longer held, and training skipped them (image_missing) without a word."""
    from lance_io.samples import append_samples, open_samples, sample_rows, samples_version_at

    uri = str(tmp_path / "s.lance")

    def add(numbers):  # images and a sample about each, as ingest writes them
        rows = image_rows(numbers)
        version = append_images(uri, rows).version
        samples = [
            {"image_ids": [i], "messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": str(n)}],
             "source": "chats.json"}
            for n, i in zip(numbers, rows.column("id").to_pylist(), strict=True)
        ]
        append_samples(uri, sample_rows(samples, job="ingest"), images_version=version)
        return version

    before_any = append_images(uri, image_rows(range(100, 101))).version
    first, second = add(range(3)), add(range(3, 5))
    restored = restore_version(uri, first)
    held = set(open_table(uri).to_table(columns=["id"]).column("id").to_pylist())
    now = open_samples(uri, samples_version_at(uri, restored)).to_table().to_pylist()
    assert len(held) == 4 and len(now) == 3 and all(set(s["image_ids"]) <= held for s in now)
    assert open_samples(uri, samples_version_at(uri, second)).count_rows() == 5, "the versions before keep theirs"
    again = restore_version(uri, second)
    assert open_samples(uri, samples_version_at(uri, again)).count_rows() == 5
    empty = restore_version(uri, before_any)
    assert open_samples(uri, samples_version_at(uri, empty)).count_rows() == 0 and open_table(uri).count_rows() == 1


def test_a_restore_loses_no_run_summary(history):
    """Before: the summaries lived in the latest metadata only, which a restore rolls back; eval of an
    earlier labeled version then lost its cost and lineage."""
    from lance_io.versions import record_run, run_summaries

    uri, _, v_before, _ = history
    record_run(uri, "early", {"images_per_second": 1.5})
    record_run(uri, "late", {"images_per_second": 2.5})
    restore_version(uri, v_before)
    assert {k: v["images_per_second"] for k, v in run_summaries(uri).items()} == {"early": 1.5, "late": 2.5}


def test_a_tag_that_lance_refuses_or_reads_as_a_number_is_bad_tag_and_a_label_run_checks_it_up_front(history):
    from pydantic import ValidationError

    from lance_io.reasons import ReasonError
    from ray_jobs.label.job import LabelOptions

    uri, _, v_before, _ = history
    for name in ["", "a b", "a/b", "7", ".hidden", "a..b", "x.lock", "a" * 201]:
        with pytest.raises(ReasonError) as refused:
            tag_version(uri, name, v_before)
        assert refused.value.reason == "bad_tag", name
        with pytest.raises(ValidationError) as refused_early:
            LabelOptions(task="digits", version_tag=name)
        assert refused_early.value.errors()[0]["ctx"]["error"].reason == "bad_tag"
    assert set(open_table(uri).tags.list()) == {"zero-shot", "fine-tuned"}
    assert tag_version(uri, "v1.2-rc_3", v_before) == v_before and open_table(uri, "v1.2-rc_3").version == v_before


def test_cli_show_versions_tag_diff_query_print_json(history):
    uri, ids, _, v_after = history

    def cli(*args: str):
        out = subprocess.run([LANCETAG, *args, "--json"], capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    shown = cli("show", uri)
    assert shown["rows"] == 8 and shown["coverage"]["label"] == 6 and shown["version"] == v_after
    assert {v["version"] for v in cli("versions", uri)} >= {v_after}
    assert cli("tag", uri, "again")["version"] == v_after
    diff = cli("diff", uri, "zero-shot", "again", "--column", "label")
    assert diff["added"] == 2 and diff["changed"] == 2 and diff["columns"][0]["changed"] == 2
    rows = cli("query", uri, "--where", "label = 'a'", "--columns", "id,label")
    assert [r["id"] for r in rows] == [ids[2]]


def test_cli_errors_name_the_missing_column(history):
    uri = history[0]
    proc = subprocess.run([LANCETAG, "query", uri, "--columns", "nope"], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    [line] = proc.stderr.splitlines()  # one line, no traceback
    assert line.startswith(f"error: column_missing: {uri} ") and "has no column nope; columns are id," in line


@pytest.mark.s3
def test_tables_on_s3_create_append_write_columns_and_version(s3):
    uri, opts = s3.uri("t.lance"), s3.storage_options
    assert append_images(uri, image_rows(range(10)), storage_options=opts, max_rows_per_file=5).added == 10
    assert append_images(uri, image_rows(range(5, 12)), storage_options=opts).added == 2
    ensure_columns(uri, OUTPUT, storage_options=opts)

    def compute(batch: pa.RecordBatch) -> pa.RecordBatch:
        return pa.record_batch([pa.array(["x"] * batch.num_rows)], schema=OUTPUT)

    for frag in plan_fragments(uri, "label IS NULL", storage_options=opts):
        write_fragment(uri, frag.fragment_id, compute, read_columns=[], output_schema=OUTPUT, todo="label IS NULL", storage_options=opts)
    tag_version(uri, "labeled", storage_options=opts)
    ds = open_table(uri, "labeled", storage_options=opts)
    assert ds.count_rows() == 12 and ds.to_table(filter="label = 'x'").num_rows == 12
    assert len(list_versions(uri, storage_options=opts)) >= 5
    diff = diff_versions(uri, 1, "labeled", column="label", storage_options=opts)  # fragment by fragment on S3
    (label,) = diff.columns
    assert (diff.added, diff.removed, diff.changed, label.before, label.after) == (2, 0, 10, {None: 10}, {"x": 12})


def test_listing_the_newest_versions_reads_only_those_and_keeps_oldest_first(history):
    uri, *_ = history
    every = list_versions(uri)
    newest = list_versions(uri, last=2)
    assert [v.version for v in newest] == [v.version for v in every[-2:]]
    assert [v.operation for v in newest] == [v.operation for v in every[-2:]]
    out = subprocess.run([LANCETAG, "versions", uri, "--last", "1", "--json"], capture_output=True, text=True, check=True)
    shown = json.loads(out.stdout)
    assert [v["version"] for v in shown] == [every[-1].version]


def _row_by_row(uri: str, before: int, after: int, column: str, max_ids: int) -> dict:
    """The diff as a plain Python comparison of two versions' rows: an id's k-th row (by row address) in
    one is its k-th in the other; the rest are added or removed."""
    from collections import Counter

    import lance

    def rows(version: int) -> dict[str, list]:
        table = lance.dataset(uri, version=version).to_table(columns=["id", column], with_row_address=True)
        by_id: dict[str, list] = {}
        for row_id, value, _ in sorted(zip(*(table.column(c).to_pylist() for c in ("id", column, "_rowaddr")), strict=True),
                                       key=lambda row: row[2]):
            by_id.setdefault(row_id, []).append(None if value is None else str(value))
        return by_id

    a, b = rows(before), rows(after)
    added, removed, changed = [], [], []
    for row_id in set(a) | set(b):
        old, new = a.get(row_id, []), b.get(row_id, [])
        changed += [row_id for x, y in zip(old, new, strict=False) if x != y]
        added += [row_id] * max(0, len(new) - len(old))
        removed += [row_id] * max(0, len(old) - len(new))
    first = lambda ids: sorted(set(ids))[:max_ids]  # noqa: E731
    return {"added": len(added), "removed": len(removed), "changed": len(changed), "added_ids": first(added),
            "removed_ids": first(removed), "changed_ids": first(changed),
            "before": Counter(v for values in a.values() for v in values), "after": Counter(v for values in b.values() for v in values)}


@pytest.mark.parametrize("match_rows", [1_000_000, 40], ids=["held", "in-buckets"])
def test_diff_equals_a_row_by_row_comparison_across_label_writes_deletes_moves_appends_and_compaction(
        tmp_path, monkeypatch, match_rows):
    """Every pair of seven versions, both ways: rows relabeled in place, deleted, moved by an update,
    appended (one with an id the table holds), compacted; an id held twice, nulls, an integer column.
    Moved rows matched in memory, and split into buckets in temporary files (removed after)."""
    import tempfile

    import lance

    import lance_io.diff
    from lance_io.columns import commit_values

    monkeypatch.setattr(lance_io.diff, "MATCH_ROWS", match_rows)
    buckets: list[int] = []

    class Counted(lance_io.diff._Moved):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            buckets.append(self.buckets)

    monkeypatch.setattr(lance_io.diff, "_Moved", Counted)
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))

    rng = random.Random(5)
    uri = str(tmp_path / "t.lance")
    ids = [f"r{n:03d}" for n in range(400)] + ["dup", "dup"]
    lance.write_dataset(pa.table({"id": ids, "label": [rng.choice(["a", "b", None]) for _ in ids],
                                  "score": pa.array([rng.choice([1, 2, None]) for _ in ids], pa.int64())}),
                        uri, max_rows_per_file=100)  # 1: five fragments, "dup" twice in the last
    relabeled = [f"r{n:03d}" for n in range(100, 160)]
    commit_values(uri, pa.table({"id": relabeled, "label": [rng.choice(["a", "c"]) for _ in relabeled]}), todo=None)  # 2
    lance.dataset(uri).delete("id IN ('r010', 'r011', 'r250', 'dup')")  # 3: deletion files
    lance.dataset(uri).update({"label": "'moved'"}, where="id >= 'r300' AND id < 'r320'")  # 4: rows move to a new fragment
    lance.write_dataset(pa.table({"id": ["n1", "n2", "r005"], "label": ["a", None, "b"],
                                  "score": pa.array([1, None, 2], pa.int64())}), uri, mode="append")  # 5: r005 twice now
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=250)  # 6: small fragments rewritten together
    versions = sorted(v["version"] for v in lance.dataset(uri).versions())
    assert len(versions) >= 6
    for before in versions:
        for after in versions:
            for column in ("label", "score"):
                diff = diff_versions(uri, before, after, column=column, max_ids=7)
                expected = _row_by_row(uri, before, after, column, 7)
                (result,) = diff.columns
                got = {"added": diff.added, "removed": diff.removed, "changed": diff.changed, "added_ids": diff.added_ids,
                       "removed_ids": diff.removed_ids, "changed_ids": diff.changed_ids, "before": result.before,
                       "after": result.after}
                assert got == expected, (before, after, column)
                assert result.changed == diff.changed and result.changed_ids == diff.changed_ids
    assert _row_by_row(uri, 1, 6, "label", 7)["changed"] > 7, "the cut at max_ids is exercised"
    assert (max(buckets) > 1) == (match_rows < 1000), "the compaction moves hundreds of rows: in buckets of at most 40"
    assert not list(spill.iterdir()), "the buckets' folder is removed"


def test_a_column_of_many_values_lists_those_most_rows_hold_with_exact_counts(tmp_path, monkeypatch):
    """A caption column holds a value per row: its distributions are cut to the values most rows hold in
    both versions together, each count exact on both sides, and the distinct values counted."""
    import lance

    import lance_io.diff

    before = ["x"] * 5 + ["y"] * 3 + ["z", "w"] + [None] * 2
    after = ["x"] + ["y"] * 4 + ["q"] * 6 + [None]
    uri = str(tmp_path / "t.lance")
    for mode, values in (("create", before), ("overwrite", after)):
        lance.write_dataset(pa.table({"id": [f"{mode}{n}" for n in range(len(values))], "cap": values}), uri, mode=mode)
    monkeypatch.setattr(lance_io.diff, "DIFF_VALUES", 3)
    (column,) = diff_versions(uri, 1, 2, column="cap").columns
    # rows in both together: y 7, x 6, q 6 (the tie by value), None 3, z 1, w 1
    assert list(column.before.items()) == [("x", 5), ("y", 3)]
    assert list(column.after.items()) == [("q", 6), ("y", 4), ("x", 1)]
    assert (column.values_before, column.values_after) == (5, 4)
    monkeypatch.setattr(lance_io.diff, "DIFF_VALUES", 100)
    (whole,) = diff_versions(uri, 1, 2, column="cap").columns
    assert whole.before == {"x": 5, "y": 3, None: 2, "w": 1, "z": 1} and list(whole.after) == ["q", "y", "x", None]
    captions = [f"caption {n}" for n in range(150)]
    lance.write_dataset(pa.table({"id": [str(n) for n in range(150)], "cap": captions}), uri, mode="overwrite")
    printed = subprocess.run([LANCETAG, "diff", uri, "2", "3", "--column", "cap"], capture_output=True, text=True, check=True)
    assert "cap: the 100 values most rows hold, of 4 before and 150 after" in printed.stdout
    # q (6 rows) and y (4), then the rows of one value each by value: 98 captions before x and the null
    assert printed.stdout.count("caption ") == 98 and "│ x " not in printed.stdout


def test_diff_of_a_table_without_ids_names_the_missing_column(tmp_path):
    import lance

    from lance_io.reasons import ReasonError

    uri = str(tmp_path / "t.lance")
    lance.write_dataset(pa.table({"x": [1, 2]}), uri)
    lance.write_dataset(pa.table({"x": [3]}), uri, mode="append")
    with pytest.raises(ReasonError) as refused:
        diff_versions(uri, 1, 2)
    assert refused.value.reason == "column_missing" and "no column id" in refused.value.message


def test_moved_rows_are_matched_by_sorted_id_hashes_and_two_ids_of_one_hash_are_told_apart(monkeypatch):
    import lance_io.diff

    a = pa.table({"id": ["x", "y", "z", "v"]})
    b = pa.table({"id": ["z", "w", "x", "u"]})
    pairs = lambda found: sorted(zip(*(positions.tolist() for positions in found), strict=True))  # noqa: E731
    assert pairs(lance_io.diff._matched_by_hash(a, b)) == [(0, 2), (2, 0)]
    # "w" only in b and "y" only in a share a hash, as do "u" and "v": neither pair is a match
    shared = {"x": 1, "y": 2, "z": 3, "w": 2, "v": -5, "u": -5}
    monkeypatch.setattr(lance_io.diff, "id_hashes", lambda ids: np.array([shared[i] for i in ids.to_pylist()], np.int64))
    assert pairs(lance_io.diff._matched_by_hash(a, b)) == [(0, 2), (2, 0)]
    assert lance_io.diff._matched_by_hash(pa.table({"id": ["x", "x"]}), b) is None, "an id held twice goes to the join"
    assert lance_io.diff._matched_by_hash(pa.table({"id": ["x", None]}), b) is None, "as does a null id"

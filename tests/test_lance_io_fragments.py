"""`lance_io.fragments`: rows written by workers are invisible until one commit; a cut rewrites a fragment.

Plain Lance on a local disk, no Ray: the write/commit protocol the ingest job runs across processes.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import lance
import pyarrow as pa

from lance_io import append_images, open_table
from lance_io.fragments import commit_fragments, fold_into_id_index, unindexed_rows, without_ids, write_rows
from lance_io.maintenance import maintain_table
from lance_io.samples import append_samples, open_samples, sample_rows
from lance_io.table import drop_concurrent_duplicates
from lance_io.versions import list_versions
from tests.table_fixtures import image_rows


def _data_files(uri: str) -> set[str]:
    return {p.name for p in (Path(uri) / "data").iterdir()}


def _referenced(uri: str) -> set[str]:
    return {Path(f.path).name for frag in open_table(uri).get_fragments() for f in frag.metadata.files}


def test_written_rows_are_invisible_until_the_commit_which_creates_the_table_with_its_index(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    rows = image_rows(range(10))
    written = write_rows(rows.to_batches(max_chunksize=4), uri, rows.schema, max_rows_per_file=6)

    assert [f.rows for f in written] == [6, 4]
    assert [i for f in written for i in f.ids] == rows.column("id").to_pylist()  # ids in file order
    assert not (Path(uri) / "_versions").exists(), "nothing is a table before the commit"

    ds = commit_fragments(uri, written, rows.schema, read_version=None, properties={"lancetag.job": "j1"})
    assert sorted(ds.to_table(columns=["id"])["id"].to_pylist()) == sorted(rows.column("id").to_pylist())
    assert unindexed_rows(ds) == 0, "a new table gets its id index"
    first = next(v for v in list_versions(uri) if v.properties.get("lancetag.operation") == "append_images")
    assert first.properties["lancetag.job"] == "j1"
    ds.validate()


def test_a_cut_rewrites_the_fragment_without_those_rows_and_leaves_no_file_behind(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(5)))
    ds = open_table(uri)
    schema = ds.schema
    more = image_rows(range(3, 9)).select(schema.names).cast(schema)  # 3 and 4 are in the table already
    [fragment] = write_rows(more.to_batches(), uri, schema)
    in_table = set(ds.to_table(columns=["id"])["id"].to_pylist()) & set(fragment.ids)
    assert len(in_table) == 2

    cut = without_ids(uri, fragment, in_table)
    assert cut is not None and set(cut.ids) == set(fragment.ids) - in_table
    committed = commit_fragments(uri, [cut], schema, read_version=ds.version)

    ids = committed.to_table(columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 9, "every content once"
    assert _data_files(uri) == _referenced(uri), "the cut fragment's old file is gone"
    assert without_ids(uri, cut, set(cut.ids)) is None, "cutting every row leaves no fragment"


def test_an_append_by_another_writer_meanwhile_is_rebased_not_lost(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(4)))
    read_version = open_table(uri).version
    schema = open_table(uri).schema
    mine = image_rows(range(10, 14)).select(schema.names).cast(schema)
    written = write_rows(mine.to_batches(), uri, schema)
    append_images(uri, image_rows(range(20, 23)))  # another writer commits first

    ds = commit_fragments(uri, written, schema, read_version=read_version)
    assert ds.count_rows() == 4 + 3 + 4
    ds.validate()


def test_files_of_a_writer_that_never_committed_are_reclaimed_by_maintenance(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(4)))
    schema = open_table(uri).schema
    write_rows(image_rows(range(50, 60)).select(schema.names).cast(schema).to_batches(), uri, schema)
    orphans = _data_files(uri) - _referenced(uri)
    assert len(orphans) == 1 and open_table(uri).count_rows() == 4, "written, not visible"

    young = maintain_table(uri, orphan_age=timedelta(hours=1))
    assert (young.orphan_files_removed, young.orphan_files_too_young) == (0, 1), "a writer's fresh file is safe"
    report = maintain_table(uri, orphan_age=timedelta(0))
    assert report.orphan_files_removed == 1
    assert _data_files(uri) == _referenced(uri)
    assert open_table(uri).count_rows() == 4


def test_the_id_index_is_folded_only_past_the_threshold(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(4)))
    append_images(uri, image_rows(range(4, 10)))
    assert unindexed_rows(lance.dataset(uri)) == 6
    assert fold_into_id_index(uri, min_rows=7) is None
    version = fold_into_id_index(uri, min_rows=6)
    assert version == open_table(uri).version and unindexed_rows(open_table(uri)) == 0
    assert pa.types.is_string(open_table(uri).schema.field("id").type)


def _ids_and_sources(uri: str) -> dict[str, list[str]]:
    by_id: dict[str, list[str]] = {}
    for row in open_table(uri).to_table(columns=["id", "source"]).to_pylist():
        by_id.setdefault(row["id"], []).append(row["source"])
    return by_id


def test_two_writers_that_checked_before_either_committed_leave_each_content_once(tmp_path) -> None:
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(4)))
    checked = open_table(uri).version
    schema = open_table(uri).schema

    def rows(seeds: range, writer: str) -> pa.Table:
        table = image_rows(seeds).select(schema.names).cast(schema)
        return table.set_column(schema.get_field_index("source"), "source", pa.array([writer] * len(seeds)))

    first = write_rows(rows(range(10, 14), "first").to_batches(), uri, schema)
    second = write_rows(rows(range(12, 16), "second").to_batches(), uri, schema, max_rows_per_file=2)  # [12 13] [14 15]
    first_ids = [i for f in first for i in f.ids]
    second_ids = [i for f in second for i in f.ids]

    v1 = commit_fragments(uri, first, schema, read_version=checked).version
    assert drop_concurrent_duplicates(uri, v1, checked, first_ids) == (set(), v1), "nobody committed in between"
    v2 = commit_fragments(uri, second, schema, read_version=checked).version
    assert len(open_table(uri).to_table(columns=["id"])) == 12, "the append rebased: 12 and 13 are there twice"

    removed, after = drop_concurrent_duplicates(uri, v2, checked, second_ids)

    assert removed == set(second_ids[:2]) and after == v2 + 1
    by_id = _ids_and_sources(uri)
    assert len(by_id) == 10 and all(len(s) == 1 for s in by_id.values()), "every content once"
    assert [by_id[i] for i in second_ids] == [["first"], ["first"], ["second"], ["second"]], "the first commit's copy stays"
    assert len(open_table(uri).get_fragments()) == 3, "the fragment that lost every row is gone"
    assert [v.properties.get("lancetag.operation") for v in list_versions(uri)][-1] == "drop_concurrent_duplicates"
    open_table(uri).validate()


def test_append_images_adds_nothing_twice_when_another_writer_commits_between_its_check_and_its_commit(
    tmp_path, monkeypatch
) -> None:
    import lance_io.table

    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(4)))
    check = lance_io.table.new_rows_of
    raced: list[int] = []

    def check_then_another_writer_commits(ids, ds):  # the gap between the lookup and the commit
        result = check(ids, ds)
        if not raced:
            raced.append(0)  # once: the other writer's own append passes through here too
            raced[0] = append_images(uri, image_rows(range(8, 12))).added
        return result

    monkeypatch.setattr(lance_io.table, "new_rows_of", check_then_another_writer_commits)
    result = append_images(uri, image_rows(range(2, 10)))  # 2 3 known, 8 9 committed by the other in the gap

    assert raced == [4]
    assert (result.added, len(result.duplicate_ids)) == (4, 4)
    assert result.version == open_table(uri).version
    by_id = _ids_and_sources(uri)
    assert len(by_id) == 12 and all(len(s) == 1 for s in by_id.values())
    open_table(uri).validate()


def test_append_samples_adds_nothing_twice_when_another_writer_commits_between_its_check_and_its_commit(
    tmp_path, monkeypatch
) -> None:
    import lance_io.samples

    uri = str(tmp_path / "t.lance")

    def samples(seeds: range) -> pa.Table:
        return sample_rows(
            [{"image_ids": [f"img-{n}"], "messages": [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": "a"}],
              "source": f"s{n}"} for n in seeds],
            job="t",
        )

    append_samples(uri, samples(range(4)), images_version=None)
    check = lance_io.samples.new_rows_of
    raced: list[int] = []

    def check_then_another_writer_commits(ids, ds):
        result = check(ids, ds)
        if not raced:
            raced.append(0)
            raced[0] = append_samples(uri, samples(range(8, 12)), images_version=None).added
        return result

    monkeypatch.setattr(lance_io.samples, "new_rows_of", check_then_another_writer_commits)
    result = append_samples(uri, samples(range(2, 10)), images_version=None)

    assert raced == [4] and (result.added, len(result.duplicate_ids)) == (4, 4)
    ids = open_samples(uri).to_table(columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 12


def test_creating_a_table_another_writer_created_meanwhile_puts_its_rows_back_and_fails_with_concurrent_write(tmp_path) -> None:
    import pytest

    from lance_io.reasons import ReasonError

    uri = str(tmp_path / "t.lance")
    rows = image_rows(range(4))
    mine = write_rows(rows.to_batches(), uri, rows.schema)  # this writer saw no table
    append_images(uri, image_rows(range(10, 13)))  # another one creates it first

    with pytest.raises(ReasonError) as failed:
        commit_fragments(uri, mine, rows.schema, read_version=None)

    assert failed.value.reason == "concurrent_write"
    ids = open_table(uri).to_table(columns=["id"])["id"].to_pylist()
    assert sorted(ids) == sorted(image_rows(range(10, 13)).column("id").to_pylist()), "the other writer's rows, only"
    open_table(uri).validate()

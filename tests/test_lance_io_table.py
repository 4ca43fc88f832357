"""Image tables: create, append with dedup, open at versions and tags, errors record."""

from __future__ import annotations

import pyarrow as pa
import pytest

from lance_io import ErrorRecord, append_images, errors_uri, open_table, read_errors, record_errors
from lance_io.scan import TableReadError
from lance_io.versions import tag_version
from tests.table_fixtures import image_page_bytes, image_rows


def test_appending_the_same_content_twice_adds_it_once_and_reports_duplicates(tmp_path):
    uri = str(tmp_path / "t.lance")
    first = append_images(uri, image_rows(range(10)))
    assert first.added == 10 and first.duplicate_ids == []

    again = append_images(uri, image_rows(range(5, 15)))
    assert again.added == 5
    assert sorted(again.duplicate_ids) == sorted(image_rows(range(5, 10)).column("id").to_pylist())
    assert open_table(uri).count_rows() == 15


def test_duplicates_within_one_append_are_written_once(tmp_path):
    uri = str(tmp_path / "t.lance")
    rows = pa.concat_tables([image_rows([1, 2]), image_rows([2, 3])])
    result = append_images(uri, rows)
    assert result.added == 3 and len(result.duplicate_ids) == 1
    assert open_table(uri).count_rows() == 3


def test_image_bytes_are_stored_unmodified(tmp_path):
    uri = str(tmp_path / "t.lance")
    rows = image_rows(range(3), padding=1000)
    append_images(uri, rows)
    stored = open_table(uri).to_table(columns=["id", "image"]).sort_by("id")
    assert stored.column("image").to_pylist() == rows.sort_by("id").column("image").to_pylist()


def test_append_refuses_rows_missing_required_columns_naming_them(tmp_path):
    rows = image_rows(range(2)).drop_columns(["sha256", "width"])
    with pytest.raises(ValueError, match="sha256, width"):
        append_images(str(tmp_path / "t.lance"), rows)


def test_open_at_version_and_tag_sees_that_version(tmp_path):
    uri = str(tmp_path / "t.lance")
    v1 = append_images(uri, image_rows(range(4))).version
    tag_version(uri, "first", v1)
    append_images(uri, image_rows(range(4, 8)))
    assert open_table(uri).count_rows() == 8
    assert open_table(uri, v1).count_rows() == 4
    assert open_table(uri, "first").count_rows() == 4
    with pytest.raises(ValueError, match="no version 'nope'"):
        open_table(uri, "nope")
    with pytest.raises(TableReadError, match="table_not_found: no Lance table at"):
        open_table(str(tmp_path / "missing.lance"))


def test_errors_are_recorded_next_to_the_table_with_source_reason_and_job(tmp_path):
    uri = str(tmp_path / "photos.lance")
    assert errors_uri(uri) == str(tmp_path / "photos.errors.lance")
    assert read_errors(uri).num_rows == 0
    record_errors(uri, [ErrorRecord("a.jpg", "image_decode_failed", "truncated JPEG", job="j1")])
    record_errors(uri, [ErrorRecord("b.jpg", "too_large", "3 GB > 50 MB", job="j2")])
    errors = read_errors(uri)
    assert errors.num_rows == 2
    only_j2 = read_errors(uri, job="j2").to_pylist()
    assert [(e["source"], e["reason"], e["stage"]) for e in only_j2] == [("b.jpg", "too_large", "ingest")]


def test_table_exists_is_false_for_a_missing_table_and_an_error_for_a_store_that_does_not_answer(tmp_path):
    from lance_io import table_exists
    from tests.ray_head import free_port

    assert table_exists(str(tmp_path / "none.lance")) is False
    append_images(str(tmp_path / "t.lance"), image_rows(range(2)))
    assert table_exists(str(tmp_path / "t.lance")) is True
    options = {"endpoint": f"http://127.0.0.1:{free_port()}", "allow_http": "true", "aws_access_key_id": "k",
               "aws_secret_access_key": "s", "region": "us-east-1", "client_max_retries": "0"}  # nothing listens there
    with pytest.raises(TableReadError) as refused:  # not False: an unreachable bucket is not an empty one
        table_exists("s3://bucket/t.lance", storage_options=options)
    assert refused.value.reason == "storage_unreachable"


@pytest.mark.parametrize(
    "where",
    [
        "id = 'x",  # unterminated string
        "no_such_fn(id) = 1",
        "width > 'wide'",  # a type the column cannot take
        "width / 0 > 1",  # fails only on the rows
        "truth = 'a'; truth = 'b'",  # Lance would keep the first statement alone
        "width > 1 ;x",
    ],
)
def test_a_predicate_lance_cannot_apply_or_would_cut_short_is_bad_where(tmp_path, where):
    from lance_io.inspect import query_table

    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(2)))
    with pytest.raises(TableReadError) as refused:
        query_table(uri, where=where)
    assert refused.value.reason == "bad_where"


def test_one_predicate_reads_semicolons_in_quotes_as_text_and_models_refuse_two_statements(tmp_path):
    from pydantic import ValidationError

    from lance_io.inspect import query_table
    from lance_io.scan import one_predicate
    from llamafactory_ext.source import LanceSource
    from ray_jobs.evaluation import evaluate_table
    from ray_jobs.label.job import LabelOptions

    for fine in ["truth = 'a;b'", 'truth = "x;y"', "truth = 'it''s; fine'", "width > 1;", "width > 1 ;  ", None]:
        assert one_predicate(fine) == fine
    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(4)))
    assert query_table(uri, where="truth = 'a;b' OR width > 1").num_rows == 4
    two = "width > 1; truth = 'x'"
    for build in (lambda: LabelOptions(task="digits", where=two), lambda: LanceSource(uri=uri, label_column="truth", where=two)):
        with pytest.raises(ValidationError) as refused:
            build()
        assert refused.value.errors()[0]["ctx"]["error"].reason == "bad_where"  # the CLI reports this reason
    for where, baseline_train in [(two, None), (None, two)]:
        with pytest.raises(TableReadError) as refused:
            evaluate_table(uri, "truth", "truth", where=where, baseline_train=baseline_train)
        assert refused.value.reason == "bad_where"


def test_show_counts_each_extra_column_s_non_null_rows_across_fragments_skipping_deleted_rows(tmp_path):
    """Coverage from one scan: nulls per column over several fragments, an empty list counted as a value, a
    deleted row not counted, and a column name SQL would need quoted."""
    import lance

    from lance_io.inspect import summarize_table

    uri = str(tmp_path / "t.lance")
    for start in (0, 10, 20):
        append_images(uri, image_rows(range(start, start + 10)))
    ids = open_table(uri).to_table(columns=["id"]).column("id").to_pylist()
    extra = pa.table({
        "id": ids,
        "label": [i if i % 3 else None for i in range(30)],
        "attr-v2": [[] if i % 2 else None for i in range(30)],
    })
    ds = lance.dataset(uri)
    ds.merge(extra, "id")
    lance.dataset(uri).delete(f"id = '{ids[1]}'")  # label 1, attr-v2 []: both counted before the delete
    shown = summarize_table(uri)
    expected = {"label": sum(1 for i in range(30) if i % 3 and i != 1), "attr-v2": sum(1 for i in range(30) if i % 2 and i != 1)}
    assert {k: shown.coverage[k] for k in expected} == expected
    assert shown.coverage["exif_orientation"] == 0  # a core column ingest leaves null without EXIF: counted, not "all"
    assert len(open_table(uri).get_fragments()) == 3 and shown.rows == 29


@pytest.mark.parametrize("stable", [False, True])
def test_rows_with_ids_reads_the_rows_of_the_ids_a_few_at_a_time(tmp_path, monkeypatch, stable):
    """The same rows as a filter on the ids, in parts of at most TAKE_ROWS rows, with their row addresses.

    Across lookups, after a deletion and a compaction (with stable row ids, a row's id then differs from its
    address), with an id two rows hold and a ``where``.
    """
    import lance

    from lance_io import scan

    n = 90
    ids = [f"id{k:03d}" for k in range(n)]
    ids[7] = ids[3]  # an id two rows hold
    uri = str(tmp_path / "t.lance")
    lance.write_dataset(pa.table({"id": ids, "image": [bytes([k]) * (k + 1) for k in range(n)], "k": list(range(n))}),
                        uri, max_rows_per_file=20, enable_stable_row_ids=stable)
    ds = lance.dataset(uri)
    ds.delete("k = 11")
    ds.optimize.compact_files(target_rows_per_fragment=50)
    ds = lance.dataset(uri)
    monkeypatch.setattr(scan, "ID_LOOKUP", 16)
    monkeypatch.setattr(scan, "TAKE_ROWS", 5)
    asked = [*ids[::2], "absent", ids[3]]
    parts = list(scan.rows_with_ids(ds, asked, ["id", "image", "k"], where="k < 80", with_row_address=True))
    assert parts and all(0 < p.num_rows <= 5 for p in parts)
    got = pa.concat_tables(parts)
    want = ds.to_table(columns=["id", "image", "k"], with_row_address=True, filter=f"id IN {tuple(asked)} AND k < 80")
    assert sorted(got.to_pylist(), key=lambda r: r["k"]) == sorted(want.to_pylist(), key=lambda r: r["k"])
    assert 3 in got.column("k").to_pylist() and 7 in got.column("k").to_pylist() and got.num_rows == len(set(got["k"].to_pylist()))
    both = ds.to_table(columns=["k"], with_row_id=True, with_row_address=True)
    assert stable == (not both.column("_rowid").equals(both.column("_rowaddr")))  # compacted: rows left their ids

    monkeypatch.setattr(ds, "_take_rows", lambda *a, **k: pytest.fail("took rows for the ids alone"))
    located = pa.concat_tables(scan.rows_with_ids(ds, asked, ["id", "_rowid"], where="k < 80", with_row_address=True))
    assert located.column_names == ["id", "_rowid", "_rowaddr"]
    expected = ds.to_table(columns=["id"], with_row_id=True, with_row_address=True, filter=f"id IN {tuple(asked)} AND k < 80")
    assert sorted(located.to_pylist(), key=lambda r: r["_rowid"]) == sorted(expected.to_pylist(), key=lambda r: r["_rowid"])


def test_images_are_written_in_pages_of_about_write_batch_bytes_however_they_arrive(tmp_path, monkeypatch):
    """Lance writes a batch it is given as one page (small ones it gathers), and a scan holds whole pages: a table
    of photos given in one piece is cut into batches of WRITE_BATCH_BYTES, by append_images and ingest's write_rows."""
    import lance

    from lance_io import table
    from lance_io.fragments import commit_fragments, write_rows

    monkeypatch.setattr(table, "WRITE_BATCH_BYTES", 2**20)
    rows = image_rows(range(120), padding=100_000)  # 12 MB of images in one chunk: one page of 12 MB uncut
    assert rows.column("image").num_chunks == 1
    append_images(str(tmp_path / "a.lance"), rows)
    uri = str(tmp_path / "b.lance")
    commit_fragments(uri, write_rows(rows.to_batches(), uri, rows.schema), rows.schema, read_version=None)
    for written in (str(tmp_path / "a.lance"), uri):
        pages = image_page_bytes(written)
        assert len(pages) > 3 and max(pages) <= 5 * 2**20  # Lance gathers up to a few batches in a page
        assert lance.dataset(written).to_table(columns=["id", "image"]).sort_by("id").equals(
            rows.select(["id", "image"]).sort_by("id"))
    small = image_rows(range(200, 320))  # small images: not cut into batches they do not need
    append_images(str(tmp_path / "c.lance"), small)
    assert len(image_page_bytes(str(tmp_path / "c.lance"))) == 1

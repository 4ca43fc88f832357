"""`lancetag diff --column C` for every task kind: C is a label prefix, each answer column is compared."""

from __future__ import annotations

import json
import subprocess

import pyarrow as pa
import pytest

from lance_io import append_images, ensure_columns, plan_fragments, write_fragment
from lance_io.diff import diff_versions
from lance_io.labels import answer_columns, label_schema
from lance_io.reasons import ReasonError
from lance_io.tasks import load_task
from lance_io.versions import tag_version
from tests.conftest import LANCETAG
from tests.table_fixtures import image_rows

FASHION = load_task("fashion")


def write_labels(uri: str, schema: pa.Schema, values: dict[str, dict[str, object]]) -> None:
    """Write the columns of ``schema`` for the given ids (id -> column -> value), as a label job commits them."""
    ensure_columns(uri, schema)

    def compute(batch: pa.RecordBatch) -> pa.RecordBatch:
        ids = batch.column("id").to_pylist()
        return pa.record_batch([pa.array([values[i].get(f.name) for i in ids], f.type) for f in schema], schema=schema)

    where = "id IN (" + ", ".join(f"'{i}'" for i in values) + ")"
    for frag in plan_fragments(uri, "true", where=where):
        write_fragment(uri, frag.fragment_id, compute, read_columns=[], output_schema=schema, todo="true", where=where)


def attribute_row(category: str, pattern: str, provenance: str) -> dict[str, object]:
    """One row's fashion labels under prefix ``attrs``: the given category and pattern, fixed other answers."""
    answers = {"category": category, "sleeve_length": "long", "fabric": "cotton", "collar": "round", "pattern": pattern}
    row: dict[str, object] = {column: answers[key] for key, column in answer_columns(FASHION, "attrs").items()}
    return row | {"attrs_confidence": 0.5, "attrs_provenance": provenance, "attrs_error": None}


@pytest.fixture
def relabeled(tmp_path):
    """6 rows labeled zero-shot with the fashion task, then relabeled: 2 categories and 2 patterns change
    (one row changes both), every provenance and confidence changes."""
    uri = str(tmp_path / "fashion.lance")
    ids = image_rows(range(6)).column("id").to_pylist()
    append_images(uri, image_rows(range(6)))
    schema = label_schema(FASHION, "attrs")
    write_labels(uri, schema, {i: attribute_row("top", "solid", "m||h") for i in ids})
    tag_version(uri, "zero-shot")
    after = {i: attribute_row("top", "solid", "m|lora|h") for i in ids}
    after[ids[0]] = attribute_row("dress", "solid", "m|lora|h")
    after[ids[1]] = attribute_row("dress", "striped", "m|lora|h")
    after[ids[2]] = attribute_row("top", "striped", "m|lora|h")
    write_labels(uri, schema, after)
    tag_version(uri, "fine-tuned")
    return uri, ids


def test_diff_of_an_attribute_prefix_compares_each_answer_column_not_the_metadata(relabeled):
    uri, ids = relabeled
    d = diff_versions(uri, "zero-shot", "fine-tuned", column="attrs")
    by_column = {c.column: c for c in d.columns}
    assert sorted(by_column) == sorted(answer_columns(FASHION, "attrs").values())  # no confidence/provenance/error
    assert by_column["attrs_category"].changed == 2 and set(by_column["attrs_category"].changed_ids) == {ids[0], ids[1]}
    assert by_column["attrs_category"].before == {"top": 6}
    assert by_column["attrs_category"].after == {"top": 4, "dress": 2}
    assert by_column["attrs_pattern"].changed == 2 and set(by_column["attrs_pattern"].changed_ids) == {ids[1], ids[2]}
    assert by_column["attrs_fabric"].changed == 0
    assert d.changed == 3 and set(d.changed_ids) == {ids[0], ids[1], ids[2]}  # a row counts once


def test_diff_of_a_single_answer_column_compares_that_column(relabeled):
    uri, ids = relabeled
    d = diff_versions(uri, "zero-shot", "fine-tuned", column="attrs_category")
    assert [c.column for c in d.columns] == ["attrs_category"]
    assert d.changed == 2 and set(d.changed_ids) == {ids[0], ids[1]}


def test_diff_of_a_prefix_labeled_only_in_the_later_version_compares_against_nulls(relabeled):
    uri, ids = relabeled
    caption = load_task("caption")
    tag_version(uri, "before-captions")
    write_labels(uri, label_schema(caption, "cap"), {ids[0]: {"cap": "a red dress", "cap_provenance": "m||h"}})
    d = diff_versions(uri, "before-captions", tag_version(uri, "captioned"), column="cap")
    (only,) = d.columns
    assert only.column == "cap" and only.before == {None: 6} and only.after == {None: 5, "a red dress": 1}
    assert d.changed == 1 and d.changed_ids == [ids[0]]


def test_diff_of_an_unknown_prefix_is_refused_with_column_missing(relabeled):
    uri, _ = relabeled
    with pytest.raises(ReasonError) as err:
        diff_versions(uri, "zero-shot", "fine-tuned", column="nope")
    assert err.value.reason == "column_missing" and "nope" in err.value.message


def test_cli_diff_of_an_attribute_prefix_prints_each_attribute_as_json(relabeled):
    uri, _ = relabeled
    proc = subprocess.run(
        [LANCETAG, "diff", uri, "zero-shot", "fine-tuned", "--column", "attrs", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    changed = {c["column"]: c["changed"] for c in out["columns"]}
    assert changed == {"attrs_category": 2, "attrs_collar": 0, "attrs_fabric": 0, "attrs_pattern": 2, "attrs_sleeve_length": 0}
    assert out["changed"] == 3

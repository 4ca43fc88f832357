"""`lancetag eval`: metrics on hand-built cases, a correct confusion image, a report a browser renders."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from lance_io import append_images, ensure_columns, plan_fragments, write_fragment
from ray_jobs.evaluation import evaluate, evaluate_table
from ray_jobs.evaluation.metrics import expected_calibration_error
from ray_jobs.evaluation.report import confusion_png, cost_per_1000
from tests.conftest import LANCETAG
from tests.table_fixtures import image_rows

TRUTH = ["cat", "cat", "cat", "cat", "dog", "dog", "bird", None]
PRED = ["cat", "cat", "cat", "dog", "dog", None, "bird", "cat"]
CONF = [0.9, 0.8, 0.7, 0.6, 0.9, None, 0.5, 0.9]
ERRS = [None, None, None, None, None, "invalid_answer: 'x'", None, None]


def test_metrics_on_a_hand_built_case():
    e = evaluate(TRUTH, PRED, CONF, ERRS)
    assert e.rows == 7 and e.labeled == 6 and e.invalid == 1
    assert e.accuracy == pytest.approx(5 / 7)
    assert e.classes == ["bird", "cat", "dog"]
    assert e.confusion == [[1, 0, 0], [0, 3, 1], [0, 0, 1]]  # the unlabeled dog row is in no column
    assert e.per_class["cat"].recall == pytest.approx(3 / 4) and e.per_class["cat"].precision == 1.0
    assert e.per_class["dog"].precision == pytest.approx(1 / 2) and e.per_class["dog"].recall == pytest.approx(1 / 2)
    assert e.mean_confidence == pytest.approx(np.mean([0.9, 0.8, 0.7, 0.6, 0.9, 0.5]))


def test_calibration_error_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    confidence = np.array([0.75] * 4)
    assert expected_calibration_error(confidence, np.array([1, 1, 1, 0])) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([0.99] * 4), np.array([0, 0, 0, 1])) == pytest.approx(0.74)


def test_cost_per_thousand_images_follows_throughput_and_price():
    # The article: 674 s per 1,000 images on a $1.006/h A10G is about $0.19 of GPU time.
    assert cost_per_1000(1000 / 674, 1.006) == pytest.approx(1.006 * 674 / 3600)


def test_confusion_image_shades_each_cell_by_its_count(tmp_path):
    e = evaluate(["a"] * 6 + ["b"] * 3, ["a"] * 6 + ["a", "b", "b"])  # [[6, 0], [1, 2]]
    assert e.confusion == [[6, 0], [1, 2]]
    cells = confusion_png(e, tmp_path / "c.png")
    image = np.asarray(Image.open(tmp_path / "c.png").convert("L"), dtype=float)

    def shade(i: int, j: int) -> float:  # mean brightness of the cell, away from its count text
        x, y, r = cells[(i, j)]
        return float(image[y - r + 2 : y - r // 2, x - r + 2 : x + r - 2].mean())

    assert shade(0, 0) < shade(1, 1) < shade(1, 0) < shade(0, 1), "darker means more rows"
    assert shade(0, 1) > 240, "an empty cell is (near) white"


def labeled_table(tmp_path) -> str:
    uri = str(tmp_path / "t.lance")
    rows = image_rows(range(30))  # truth = seed % 3
    append_images(uri, rows)
    schema = pa.schema([pa.field("label", pa.string()), pa.field("label_confidence", pa.float32())])
    ensure_columns(uri, schema)

    def predict(batch: pa.RecordBatch) -> pa.RecordBatch:
        truth = batch.column("truth").to_pylist()
        predicted = [t if k % 5 else "0" for k, t in enumerate(truth)]
        return pa.record_batch([pa.array(predicted), pa.array([0.8] * len(truth), pa.float32())], schema=schema)

    for frag in plan_fragments(uri, "label IS NULL"):
        write_fragment(uri, frag.fragment_id, predict, read_columns=["truth"], output_schema=schema, todo="label IS NULL")
    return uri


def test_eval_cli_writes_png_html_and_json(tmp_path):
    uri = labeled_table(tmp_path)
    out = subprocess.run(
        [LANCETAG, "eval", uri, "--column", "label", "--truth", "truth", "--report", str(tmp_path / "r"), "--json"],
        capture_output=True, text=True, check=True,
    ).stdout
    result = json.loads(out)
    expected = evaluate_table(uri, "label", "truth").accuracy
    assert result["accuracy"] == pytest.approx(expected) and 0.7 < expected < 1.0
    assert (tmp_path / "r" / "confusion.png").exists()
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["accuracy"] == pytest.approx(expected)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is installed by scripts/setup.sh")
def test_html_report_renders_in_headless_chromium(tmp_path):
    uri = labeled_table(tmp_path)
    report = evaluate_table(uri, "label", "truth", report_dir=tmp_path / "r").report
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", f"file://{report}"], capture_output=True, text=True, timeout=60).stdout
    assert 'id="accuracy"' in dom and "Per class" in dom and dom.count("<area") == 9
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1000,1400", f"file://{report}"],
                   capture_output=True, timeout=60, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    blue = (pixels[..., 2] > pixels[..., 0] + 60).sum()
    assert blue > 2000, "the confusion matrix image is drawn on the page"


def test_evaluating_rows_without_truth_is_no_rows_not_a_crash(tmp_path):
    from lance_io.reasons import ReasonError

    uri = str(tmp_path / "t.lance")
    append_images(uri, image_rows(range(3)))
    for where in ["truth = 'none'", "truth IS NULL"]:
        with pytest.raises(ReasonError) as refused:
            evaluate_table(uri, "truth", "truth", where=where)
        assert refused.value.reason == "no_rows" and where in refused.value.message
    assert evaluate_table(uri, "truth", "truth").evaluations["truth"].accuracy == 1.0


def test_counts_added_batch_by_batch_equal_scikit_learn_on_all_rows():
    """A Tally fed 97 rows at a time gives scikit-learn's figures on the whole list, nulls and odd types included."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from ray_jobs.evaluation.metrics import Tally

    rng = np.random.default_rng(7)
    rows = 5000
    truth = [None if rng.random() < 0.1 else int(rng.integers(12)) for _ in range(rows)]  # integers: classes are str(value)
    answer = [None if rng.random() < 0.1 else str(t if t is not None and rng.random() < 0.6 else rng.integers(14))
              for t in truth]  # 12 and 13 are answers no row is
    confidence = [None if rng.random() < 0.2 else float(rng.random()) for _ in range(rows)]
    errors = [None if a is not None or rng.random() < 0.5 else "invalid_answer" for a in answer]
    tally = Tally()
    columns = [pa.array(truth, pa.int64()), pa.array(answer, pa.string()), pa.array(confidence, pa.float32()),
               pa.array(errors, pa.string())]
    for start in range(0, rows, 97):
        tally.add(*(column.slice(start, 97) for column in columns))
    e = tally.evaluation()

    kept = [i for i in range(rows) if truth[i] is not None]
    t = [str(truth[i]) for i in kept]
    a = ["<none>" if answer[i] is None else answer[i] for i in kept]
    classes = sorted(set(t) | {x for x in a if x != "<none>"}, key=int)
    precision, recall, f1, support = precision_recall_fscore_support(t, a, labels=classes, zero_division=0)
    assert e.classes == classes and e.rows == len(kept)
    assert e.labeled == sum(x != "<none>" for x in a)
    assert e.invalid == sum(errors[i] is not None for i in kept) > 0
    assert e.accuracy == pytest.approx(np.mean([x == y for x, y in zip(t, a, strict=True)]))
    assert e.confusion == confusion_matrix(t, a, labels=classes).tolist()
    for k, c in enumerate(classes):
        got = e.per_class[c]
        assert (got.precision, got.recall, got.f1, got.support) == pytest.approx((precision[k], recall[k], f1[k], support[k]))
    assert e.macro_f1 == pytest.approx(np.mean([f for f, s in zip(f1, support, strict=True) if s]))
    scored = [n for n, i in enumerate(kept) if confidence[i] is not None]
    conf = np.array([confidence[kept[n]] for n in scored], dtype=np.float32).astype(float)
    right = np.array([t[n] == a[n] for n in scored], dtype=float)
    assert e.mean_confidence == pytest.approx(conf.mean())
    assert e.calibration_error == pytest.approx(expected_calibration_error(conf, right))
    from collections import Counter

    wrong = Counter((x, y) for x, y in zip(t, a, strict=True) if y not in (x, "<none>"))
    listed = {(x, y): n for x, y, n in e.most_confused}
    assert len(listed) == 20 and all(wrong[pair] == n for pair, n in listed.items())
    assert max(n for pair, n in wrong.items() if pair not in listed) <= min(listed.values()), "the commonest 20"


def test_more_classes_than_a_matrix_holds_report_their_commonest_confusions(tmp_path):
    """Past MATRIX_CLASSES classes (truth a near-unique key, say): no n-by-n matrix, the commonest wrong answers instead."""
    import lance

    from ray_jobs.evaluation.metrics import MATRIX_CLASSES

    rows = 3 * MATRIX_CLASSES
    truth = [str(i // 2) for i in range(rows)]  # 150 classes of 2 rows each
    answer = [t if i % 3 else "7" for i, t in enumerate(truth)]  # every third row answered "7"
    uri = str(tmp_path / "keys.lance")
    lance.write_dataset(pa.table({"id": [str(i) for i in range(rows)], "truth": truth, "label": answer}), uri)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "confusion.png").write_bytes(b"an earlier report's matrix")
    result = evaluate_table(uri, "label", "truth", report_dir=tmp_path / "r")
    e = result.evaluations["label"]
    assert len(e.classes) == rows // 2 > MATRIX_CLASSES and e.confusion == []
    assert any(str(MATRIX_CLASSES) in note for note in e.notes)
    assert e.accuracy == pytest.approx(sum(a == t for a, t in zip(answer, truth, strict=True)) / rows)
    assert all(answer == "7" and rows_ == 1 for _, answer, rows_ in e.most_confused) and len(e.most_confused) == 20
    page = (tmp_path / "r" / "report.html").read_text()
    assert not (tmp_path / "r" / "confusion.png").exists() and 'id="confusion"' not in page
    assert page.count("<tr><td>") >= 20 and 'id="most-confused"' in page
    printed = subprocess.run([LANCETAG, "eval", uri], capture_output=True, text=True, check=True).stdout
    assert f"label: {len(e.classes)} classes: no confusion matrix past {MATRIX_CLASSES}" in printed


def test_eval_reads_the_table_a_batch_at_a_time(tmp_path, monkeypatch):
    """The same figures whether eval reads the table whole or 4 rows at a time."""
    from dataclasses import asdict

    from ray_jobs.evaluation import job

    uri = labeled_table(tmp_path)
    whole = asdict(evaluate_table(uri, "label", "truth", where="truth != '2'").evaluations["label"])
    monkeypatch.setattr(job, "SCAN_BATCH", 4)
    assert asdict(evaluate_table(uri, "label", "truth", where="truth != '2'").evaluations["label"]) == whole
    assert whole["rows"] == 20 and whole["mean_confidence"] == pytest.approx(0.8)


def test_truth_of_any_arrow_type_is_compared_as_python_writes_it():
    """Integers, floats, booleans, lists and structs: a class is the value's ``str``, as before the counts went to Arrow."""
    from ray_jobs.evaluation.metrics import Tally

    for truth, answer in [([1, 2, None], ["1", "1", "2"]), ([1.5, 2.0, None], ["1.5", "2", "2.0"]),
                          ([True, False, None], ["True", "false", "x"]), ([[1, 2], [3], None], ["[1, 2]", "[3 ]", "[3]"]),
                          ([{"a": 1}, {"a": 2}, None], ["{'a': 1}", "{'a': 1}", "-"])]:
        tally = Tally()
        tally.add(pa.array(truth), pa.array(answer))
        e = tally.evaluation()
        assert e.rows == 2 and e.accuracy == 0.5, truth
        assert set(e.classes) >= {str(truth[0]), str(truth[1])}


def test_confidence_that_is_no_probability_is_left_out_of_the_calibration_and_said_so():
    e = evaluate(["a", "b", "a", "a", "b"], ["a", "a", "a", "b", "b"], [float("nan"), 1.5, 0.5, None, -0.1])
    assert e.mean_confidence == 0.5 and e.calibration_error == pytest.approx(0.5)  # the one row scored: right at 0.5
    assert e.notes == ["3 confidence value(s) NaN or outside [0, 1]: left out of the calibration"]
    assert json.loads(json.dumps(e.mean_confidence, allow_nan=False)) == 0.5

"""Classical baselines in `lancetag eval`: fitted on one filter's rows, scored on the evaluated rows."""

from __future__ import annotations

import io
import json
import math
import subprocess

import lance
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from bench.data import digit_images, image_rows
from lance_io.schema import content_hashes
from lance_io.splits import split_of
from tests.conftest import LANCETAG
from tests.table_fixtures import turned_photo


@pytest.fixture(scope="module")
def digits_table(tmp_path_factory) -> str:
    """300 digits with a train/test `split` column and a `label` column right on 4 rows of 5."""
    uri = str(tmp_path_factory.mktemp("baselines") / "digits.lance")
    images = digit_images(300)
    rows = image_rows(images)
    split = [split_of(content_hashes(data)[0], 0.3, held_out="test") for data, _ in images]
    label = [truth if i % 5 else str((int(truth) + 1) % 10) for i, (_, truth) in enumerate(images)]
    rows = rows.append_column("split", pa.array(split)).append_column("label", pa.array(label))
    lance.write_dataset(rows, uri)
    return uri


def _sklearn_predictions(uri: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The two baselines fitted here, independently of the product's code: (predictions, truth, labels) on the test rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    def pixels(table: pa.Table) -> np.ndarray:
        return np.stack([
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((16, 16), Image.Resampling.BOX), np.float32).ravel()
            / 255
            for b in table.column("image").to_pylist()
        ])

    ds = lance.dataset(uri)
    train = ds.to_table(columns=["image", "truth"], filter="split = 'train'")
    test = ds.to_table(columns=["image", "truth", "label"], filter="split = 'test'")
    out = {}
    for name, model in {
        "logistic": make_pipeline(StandardScaler(), LogisticRegression(tol=1e-6, max_iter=5000)),
        "svm": make_pipeline(StandardScaler(), SVC(kernel="rbf")),
    }.items():
        model.fit(pixels(train), train.column("truth").to_pylist())
        out[name] = model.predict(pixels(test))
    return out, np.asarray(test.column("truth").to_pylist()), np.asarray(test.column("label").to_pylist())


def _sklearn_accuracies(uri: str) -> dict[str, float]:
    predictions, truth, _ = _sklearn_predictions(uri)
    return {name: float(np.mean(predicted == truth)) for name, predicted in predictions.items()}


def test_baselines_are_fitted_on_the_train_filter_and_scored_on_the_evaluated_rows(digits_table, tmp_path):
    from ray_jobs.evaluation import evaluate_table

    result = evaluate_table(digits_table, "label", "truth", where="split = 'test'",
                            baseline_train="split = 'train'", report_dir=tmp_path / "r")
    evaluation = result.evaluations["label"]
    logistic, svm = result.baselines["label"]
    expected = _sklearn_accuracies(digits_table)
    test_rows = lance.dataset(digits_table).count_rows(filter="split = 'test'")
    for baseline, want in ((logistic, expected["logistic"]), (svm, expected["svm"])):
        assert baseline.rows == evaluation.rows == test_rows
        assert baseline.train_rows == 300 - test_rows and baseline.overlap == 0
        assert 0.0 <= baseline.accuracy <= 1.0 and baseline.accuracy == pytest.approx(want)
    assert "logistic regression" in logistic.name and "SVM" in svm.name
    assert svm.accuracy > 0.8  # raw pixels do tell these digits apart: the baseline is a real bar

    page = (tmp_path / "r" / "report.html").read_text()
    assert 'id="baselines"' in page and logistic.name in page and f"{100 * svm.accuracy:.1f}%" in page
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert [b["accuracy"] for b in metrics["baselines"]["label"]] == [logistic.accuracy, svm.accuracy]


def test_eval_cli_json_carries_the_baselines(digits_table):
    out = subprocess.run(
        [LANCETAG, "eval", digits_table, "--where", "split = 'test'", "--baseline-train", "split = 'train'", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = _sklearn_accuracies(digits_table)
    accuracies = [b["accuracy"] for b in result["baselines"]["label"]]
    assert accuracies == pytest.approx([expected["logistic"], expected["svm"]])
    predictions, truth, label = _sklearn_predictions(digits_table)
    for baseline, predicted in zip(result["baselines"]["label"], predictions.values(), strict=True):
        assert baseline["baseline_only"] == int(np.sum((predicted == truth) & (label != truth)))
        assert baseline["verdict"] in {"above", "level", "below"} and 0 < baseline["p_value"] <= 1
    test = lance.dataset(digits_table).to_table(columns=["label", "truth"], filter="split = 'test'").to_pydict()
    assert result["accuracy"] == pytest.approx(np.mean(np.array(test["label"]) == np.array(test["truth"])))


def test_baseline_rows_that_are_also_evaluated_are_counted(digits_table):
    from ray_jobs.evaluation import evaluate_table

    result = evaluate_table(digits_table, "label", "truth", where="split = 'test'", baseline_train="id IS NOT NULL")
    for baseline in result.baselines["label"]:
        assert baseline.overlap == baseline.rows == result.evaluations["label"].rows
        assert baseline.train_rows == 300


def test_a_baseline_filter_with_one_class_is_refused_with_its_reason(digits_table):
    from ray_jobs.evaluation import evaluate_table
    from ray_jobs.evaluation.baselines import BaselineError

    with pytest.raises(BaselineError) as err:
        evaluate_table(digits_table, "label", "truth", baseline_train="truth = '3'")
    assert err.value.reason == "baseline_needs_two_classes"


def test_the_report_shows_the_validation_curve_of_the_run_that_trained_the_labeling_model(digits_table, tmp_path):
    from ray_jobs.evaluation.job import EvalResult, training_record, write_report
    from ray_jobs.evaluation.metrics import evaluate

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    points = [
        {"step": 10, "epoch": 1.0, "validation_accuracy": 0.5, "train_loss": 2.0, "seconds": 1.0},
        {"step": 20, "epoch": 2.0, "validation_accuracy": 0.75, "train_loss": 1.0, "seconds": 1.0},
        {"step": 30, "epoch": 3.0, "validation_accuracy": 0.625, "train_loss": 0.5, "seconds": 1.0},
    ]
    validation = {"fraction": 0.1, "rows": 8, "points": points, "best": points[1], "stopped_early": False}
    (adapter / "lancetag_lineage.json").write_text(json.dumps({"validation": validation}))
    lineage = {"model": str(tmp_path / "base"), "adapter": str(adapter)}
    assert training_record(lineage) == validation
    assert training_record({"model": str(tmp_path / "base"), "adapter": ""}) is None

    result = EvalResult(digits_table, 1, "label", "truth", {"label": evaluate(["1", "2"], ["1", "1"])},
                        lineage=lineage, training=training_record(lineage))
    page = write_report(result, tmp_path / "r").read_text()
    assert 'id="training"' in page and "75.0%" in page and "20 (kept)" in page and "62.5%" in page
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["training"]["best"]["step"] == 20


def _exact_two_sided(k: int, n: int) -> float:
    """McNemar's exact p-value computed here from binomial coefficients, independently of the product's code."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize(("model_only", "baseline_only", "verdict"), [
    (15, 3, "above"), (3, 15, "below"), (10, 8, "level"), (9, 2, "level"), (0, 0, "level"), (7, 0, "above"),
])
def test_the_verdict_is_the_paired_test_not_the_gap_between_accuracies(model_only, baseline_only, verdict):
    from ray_jobs.evaluation.baselines import paired_verdict

    p_value, said = paired_verdict(model_only, baseline_only)
    assert said == verdict
    n = model_only + baseline_only
    assert p_value == pytest.approx(_exact_two_sided(model_only, n) if n else 1.0)


def test_each_baseline_is_compared_with_the_model_row_by_row(digits_table, tmp_path):
    """The label column is right on 4 rows of 5: counts of rows only one side gets right match an independent fit."""
    from ray_jobs.evaluation import evaluate_table

    result = evaluate_table(digits_table, "label", "truth", where="split = 'test'",
                            baseline_train="split = 'train'", report_dir=tmp_path / "r")
    predictions, truth, label = _sklearn_predictions(digits_table)
    model_right = label == truth
    for baseline, predicted in zip(result.baselines["label"], predictions.values(), strict=True):
        right = predicted == truth
        assert (baseline.model_only, baseline.baseline_only) == (
            int(np.sum(model_right & ~right)), int(np.sum(right & ~model_right)))
        n = baseline.model_only + baseline.baseline_only
        assert baseline.p_value == pytest.approx(_exact_two_sided(baseline.model_only, n))
    svm = result.baselines["label"][1]
    assert svm.baseline_only > 2 * svm.model_only and svm.verdict == "below"  # a 20% error rate on purpose
    page = (tmp_path / "r" / "report.html").read_text()
    assert 'id="verdict"' in page and "below it" in page and f"{svm.p_value:.3g}" in page
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert [b["verdict"] for b in metrics["baselines"]["label"]] == [b.verdict for b in result.baselines["label"]]


def test_the_same_accuracies_are_above_on_many_rows_and_level_on_four(tmp_path):
    """A model right on every row against a baseline that only knows 0 and 1: the number of rows decides."""
    from ray_jobs.evaluation import evaluate_table

    uri = str(tmp_path / "always-right.lance")
    images = digit_images(300)
    table = image_rows(images)
    split = [split_of(content_hashes(data)[0], 0.3, held_out="test") for data, _ in images]
    table = table.append_column("split", pa.array(split))
    lance.write_dataset(table.append_column("label", table.column("truth")), uri)
    twos = lance.dataset(uri).to_table(columns=["id"], filter="split = 'test' AND truth = '2'").column("id").to_pylist()
    knows_two_digits = "split = 'train' AND truth IN ('0', '1')"
    verdicts = {}
    for name, where in (("test split", "split = 'test' AND truth NOT IN ('0', '1')"),
                        ("four rows", "id IN ({})".format(", ".join(f"'{i}'" for i in twos[:4])))):
        result = evaluate_table(uri, "label", "truth", where=where, baseline_train=knows_two_digits)
        for baseline in result.baselines["label"]:
            assert baseline.accuracy == 0.0 and result.accuracy == 1.0
            assert (baseline.model_only, baseline.baseline_only) == (baseline.rows, 0)
            verdicts.setdefault(name, set()).add(baseline.verdict)
    assert verdicts == {"test split": {"above"}, "four rows": {"level"}}, verdicts


def test_a_table_past_the_caps_scores_the_baselines_on_rows_chosen_by_id_hash(digits_table, tmp_path, monkeypatch):
    """Caps of 100 training and 40 scored rows: exactly the ids the hash picks, the model scored on those same rows."""
    from lance_io.splits import id_bucket
    from ray_jobs.evaluation import baselines, evaluate_table

    monkeypatch.setattr(baselines, "MAX_TRAIN_ROWS", 100)
    monkeypatch.setattr(baselines, "MAX_SCORED_ROWS", 40)
    ds = lance.dataset(digits_table)
    test = ds.to_table(columns=["id", "label", "truth"], filter="split = 'test'").to_pydict()
    train_ids = ds.to_table(columns=["id"], filter="split = 'train'").column("id").to_pylist()
    chosen = [i for i, row_id in enumerate(test["id"]) if id_bucket(row_id, baselines.SALT) < 40 / len(test["id"])]
    trained = sum(id_bucket(row_id, baselines.SALT) < 100 / len(train_ids) for row_id in train_ids)
    assert 0 < len(chosen) < len(test["id"]) and 0 < trained < len(train_ids)

    result = evaluate_table(digits_table, "label", "truth", where="split = 'test'",
                            baseline_train="split = 'train'", report_dir=tmp_path / "r")
    model_right = [test["label"][i] == test["truth"][i] for i in chosen]
    for baseline in result.baselines["label"]:
        assert (baseline.rows, baseline.train_rows) == (len(chosen), trained)
        assert baseline.model_accuracy == pytest.approx(np.mean(model_right))
        assert baseline.model_only - baseline.baseline_only == round(
            (baseline.model_accuracy - baseline.accuracy) * baseline.rows)
    assert result.evaluations["label"].rows == len(test["id"])  # the model's own figures stay on every row
    page = (tmp_path / "r" / "report.html").read_text()
    assert f"{len(chosen)} of {len(test['id'])}, chosen by id hash" in page


def test_rows_sharing_an_id_are_scored_once_each_when_the_rows_are_chosen(tmp_path, monkeypatch):
    """Ingest keeps ids unique, but a table written by other tools may not: each row counts once, not per lookup."""
    from lance_io import scan
    from lance_io.splits import id_bucket
    from ray_jobs.evaluation import baselines, evaluate_table

    images = digit_images(120)
    table = image_rows(images)
    table = pa.concat_tables([table, table])  # every id on two rows
    split = ["test" if k % 3 == 0 else "train" for k in range(len(images))] * 2
    table = table.append_column("split", pa.array(split)).append_column("label", table.column("truth"))
    uri = str(tmp_path / "twice.lance")
    lance.write_dataset(table, uri)
    monkeypatch.setattr(baselines, "MAX_SCORED_ROWS", 30)
    monkeypatch.setattr(scan, "ID_LOOKUP", 3)
    test_ids = table.filter(pa.compute.equal(table.column("split"), "test")).column("id").to_pylist()
    chosen = {i for i in test_ids if id_bucket(i, baselines.SALT) < 30 / len(test_ids)}
    result = evaluate_table(uri, "label", "truth", where="split = 'test'", baseline_train="split = 'train'")
    assert 0 < len(chosen) < len(test_ids) / 2
    assert {b.rows for b in result.baselines["label"]} == {2 * len(chosen)}


def test_a_photo_gives_the_baselines_its_pixels_from_a_small_decode():
    """A JPEG is decoded at a fraction of its scale, which keeps 8x8 stored pixels behind each of the 16x16: a few levels off the whole decode."""
    import random

    from lance_io.image_size import DRAFT_PER_PIXEL, thumbnails
    from ray_jobs.evaluation.baselines import PIXELS

    rng = random.Random(3)
    photo = Image.frombytes("RGB", (80, 60), rng.randbytes(80 * 60 * 3)).resize((4000, 3000), Image.Resampling.BICUBIC)

    def encoded(fmt: str) -> bytes:
        buffer = io.BytesIO()
        photo.save(buffer, format=fmt)
        return buffer.getvalue()

    def pixels(data: bytes, draft: bool) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            if draft:
                image.draft("RGB", (DRAFT_PER_PIXEL * PIXELS,) * 2)
                assert image.size == (500, 375)  # 1/8 of the scale: what is decoded
            small = image.convert("RGB").resize((PIXELS, PIXELS), Image.Resampling.BOX)
        return np.asarray(small, np.float32).ravel() / 255

    jpeg, png = encoded("JPEG"), encoded("PNG")
    features, decoded = thumbnails([jpeg, png, b"not an image"], PIXELS)
    assert decoded.tolist() == [True, True, False]
    assert np.array_equal(features[0], pixels(jpeg, draft=True))
    whole = pixels(jpeg, draft=False)
    assert 0 < np.abs(features[0] - whole).max() <= 4 / 255  # not the whole decode, and a few levels from it
    assert np.array_equal(features[1], pixels(png, draft=False))  # a PNG has no smaller decode


def test_a_photo_turned_by_its_exif_gives_the_baselines_its_upright_pixels():
    """A phone's portrait photo is stored on its side; the baselines see it upright, as the model trains on it."""
    from lance_io.image_size import thumbnails
    from ray_jobs.evaluation.baselines import PIXELS

    photo, upright = turned_photo()
    features, decoded = thumbnails([photo], PIXELS)
    assert decoded.tolist() == [True]

    def pixels(image: Image.Image) -> np.ndarray:
        return np.asarray(image.resize((PIXELS, PIXELS), Image.Resampling.BOX), np.float32).ravel() / 255

    assert np.array_equal(features[0], pixels(upright))
    assert not np.allclose(features[0], pixels(Image.open(io.BytesIO(photo)).convert("RGB")), atol=0.1)


@pytest.mark.parametrize("cap", [1000, 12])
def test_the_baselines_hold_a_few_images_at_a_time_whether_or_not_rows_are_chosen(tmp_path, monkeypatch, cap):
    """A table of photos under the caps is read TAKE_ROWS rows at a time too, not in Lance's batches of thousands."""
    from lance_io import scan
    from ray_jobs.evaluation.baselines import _chosen_rows

    uri = str(tmp_path / "t.lance")
    lance.write_dataset(image_rows(digit_images(40)), uri)
    monkeypatch.setattr(scan, "TAKE_ROWS", 4)
    chunks = list(_chosen_rows(lance.dataset(uri), "truth IS NOT NULL", cap, ["id", "image", "truth"]))
    assert chunks and all(0 < len(chunk["id"]) <= 4 for chunk in chunks)
    ids = [i for chunk in chunks for i in chunk["id"]]
    assert len(ids) == len(set(ids)) and (len(ids) == 40 if cap > 40 else 0 < len(ids) < 40)


def test_the_same_training_rows_in_another_order_give_the_same_baselines():
    """A table written by parallel workers holds its rows in any order; the baselines depend on the rows alone.

    On these 1,000 digits scikit-learn's default tolerance stopped the logistic regression where each order
    of the rows gave a different accuracy.
    """
    from lance_io.image_size import thumbnails
    from ray_jobs.evaluation.baselines import PIXELS, PixelRows, fit_baselines

    images = digit_images(1797)
    features, decoded = thumbnails([data for data, _ in images], PIXELS)
    ids = [content_hashes(data)[0] for data, _ in images]
    truth = np.asarray([label for _, label in images], dtype=object)
    answers = [None] * len(images)

    def rows(order: np.ndarray) -> PixelRows:
        return PixelRows([ids[i] for i in order], features[order], decoded[order], truth[order], [answers[i] for i in order])

    scored = rows(np.arange(1000, 1797))
    results = [
        [(b.name, b.accuracy, b.baseline_only, b.train_rows) for b in fit_baselines(rows(order), scored)]
        for order in (np.arange(1000), np.random.default_rng(1).permutation(1000), np.arange(1000)[::-1])
    ]
    assert results[0][0][1] > 0.9 and results[0][0][3] == 1000
    assert results[1] == results[0] and results[2] == results[0]

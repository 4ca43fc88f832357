"""Classical baselines in `lancetag eval`: fitted on one filter's rows, scored on the evaluated rows."""

from __future__ import annotations

import io
import json
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


def _sklearn_accuracies(uri: str) -> dict[str, float]:
    """The two baselines fitted here, independently of the product's code, on the same rows."""
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
    test = ds.to_table(columns=["image", "truth"], filter="split = 'test'")
    out = {}
    for name, model in {
        "logistic": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "svm": make_pipeline(StandardScaler(), SVC(kernel="rbf")),
    }.items():
        model.fit(pixels(train), train.column("truth").to_pylist())
        out[name] = float(np.mean(model.predict(pixels(test)) == np.asarray(test.column("truth").to_pylist())))
    return out


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

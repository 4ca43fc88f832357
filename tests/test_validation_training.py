"""Validation inside training: held-back rows scored by the labeler's code, early stopping, the best weights kept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lance
import pytest
import yaml

from bench.data import digit_images, image_rows
from lance_io.schema import content_hashes
from lance_io.splits import split_of
from llamafactory_ext.register import register_dataset
from tests.conftest import REPO_ROOT

TINY_CONFIG = REPO_ROOT / "configs" / "train" / "tiny_qwen2_vl_cpu.yaml"
FRACTION = 0.25


def _held_back(data: bytes) -> bool:
    row_id, _ = content_hashes(data)
    return split_of(row_id, FRACTION, held_out="validation", salt="validation") == "validation"


def _config(model: Path, dataset_dir: Path, output_dir: Path, name: str, **args) -> dict:
    """The tiny LoRA test recipe on ``name``, run by epochs instead of its 3 steps."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config.pop("max_steps")
    config.update(model_name_or_path=str(model), dataset=name, dataset_dir=str(dataset_dir),
                  output_dir=str(output_dir), logging_steps=100, **args)
    return config


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """A dataset_dir with `digits`: 40 digits registered with the digits task (split all)."""
    root = tmp_path_factory.mktemp("validation-digits")
    lance.write_dataset(image_rows(digit_images(40)), str(root / "digits.lance"))
    register_dataset(str(root / "digits.lance"), "digits", root / "data", task="digits", label_column="truth")
    return root / "data"


def test_early_stopping_stops_before_max_epochs_when_validation_accuracy_plateaus(
    tiny_qwen2_vl, digits_dir, tmp_path
):
    from llamafactory_ext.train import run_training
    from ray_jobs.evaluation.in_training import transformers_labeler

    out = tmp_path / "out"
    config = _config(tiny_qwen2_vl, digits_dir, out, "digits", num_train_epochs=10, learning_rate=0.0,
                     per_device_train_batch_size=8)
    config["lancetag"]["validation"] = {"fraction": FRACTION, "every_epochs": 1, "patience": 2, "views": 3}
    result = run_training(config, labeler=transformers_labeler)

    # a learning rate of 0 cannot improve on the first evaluation: two more without gain, then stop
    curve = result.validation
    assert [p["epoch"] for p in curve["points"]] == [1.0, 2.0, 3.0]
    assert len({p["validation_accuracy"] for p in curve["points"]}) == 1
    assert curve["best"]["epoch"] == 1.0 and curve["stopped_early"] is True
    assert curve["views"]["count"] == 3 and curve["views"]["single_accuracy"] == curve["best"]["validation_accuracy"]
    assert (out / "lancetag_views.json").is_file() == curve["views"]["chosen"]
    assert all(0.0 <= p["validation_accuracy"] <= 1.0 and math.isfinite(p["train_loss"]) for p in curve["points"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["epoch"] == 3.0

    # the validation rows were held back: training saw only the other ids, 8 per step
    images = digit_images(40)
    held_back = sum(_held_back(data) for data, _ in images)
    assert curve["rows"] == held_back > 0
    assert state["global_step"] == 3 * math.ceil((len(images) - held_back) / 8)
    lineage = json.loads(Path(result.lineage_path).read_text())
    assert lineage["validation"]["points"] == curve["points"]
    (record,) = lineage["datasets"]
    assert record["split"] == "train" and record["val_fraction"] == FRACTION


def test_a_plateau_that_falls_on_the_last_epoch_is_not_an_early_stop(tiny_qwen2_vl, digits_dir, tmp_path):
    from llamafactory_ext.train import run_training
    from ray_jobs.evaluation.in_training import transformers_labeler

    config = _config(tiny_qwen2_vl, digits_dir, tmp_path / "out", "digits", num_train_epochs=3, learning_rate=0.0,
                     per_device_train_batch_size=8)
    config["lancetag"]["validation"] = {"fraction": FRACTION, "every_epochs": 1, "patience": 2}
    curve = run_training(config, labeler=transformers_labeler).validation

    assert [p["epoch"] for p in curve["points"]] == [1.0, 2.0, 3.0], "every epoch ran and was scored"
    assert curve["best"]["epoch"] == 1.0 and curve["stopped_early"] is False


@pytest.fixture(scope="module")
def turning_dir(tmp_path_factory) -> Path:
    """A table whose training rows first teach the validation answer, then the other one.

    Task `ab` (answers "a" or "b"); every validation row is "a"; the training rows, in table order,
    are 12 "a" then 24 "b". Trained in that order, validation accuracy rises and then falls.
    """
    root = tmp_path_factory.mktemp("validation-turning")
    validation, first, then = [], [], []
    for data, _ in digit_images(90):
        if _held_back(data):
            validation.append((data, "a"))
        elif len(first) < 12:
            first.append((data, "a"))
        elif len(then) < 24:
            then.append((data, "b"))
    task = root / "ab.yaml"
    task.write_text(yaml.safe_dump(
        {"kind": "classify", "name": "ab", "labels": ["a", "b"], "prompt": "Which: [{labels}]?", "answer_template": "{label}"}
    ))
    lance.write_dataset(image_rows(validation[:8] + first + then), str(root / "ab.lance"))
    register_dataset(str(root / "ab.lance"), "ab", root / "data", task=str(task), label_column="truth")
    return root / "data"


def test_the_saved_adapter_is_the_best_validation_step_not_the_last(tiny_qwen2_vl, turning_dir, tmp_path):
    from llamafactory_ext.train import run_training
    from llamafactory_ext.validation import validation_accuracy, validation_sources
    from ray_jobs.evaluation.in_training import transformers_labeler
    from serve_apps.backends.base import BackendConfig, create_backend

    out = tmp_path / "out"
    config = _config(tiny_qwen2_vl, turning_dir, out, "ab", num_train_epochs=1, learning_rate=1e-2,
                     per_device_train_batch_size=4, disable_shuffling=True)
    config["lancetag"]["validation"] = {"fraction": FRACTION, "every_steps": 1, "views": 4}
    config["lancetag"]["augment"] = {"rotate_degrees": 20, "scale": 0.2, "shift": 0.2}
    curve = run_training(config, labeler=transformers_labeler).validation

    points = curve["points"]
    assert [p["step"] for p in points] == list(range(1, 10))  # 36 rows, 4 per step, each step scored
    best, last = curve["best"], points[-1]
    assert best["validation_accuracy"] == max(p["validation_accuracy"] for p in points)
    assert last["validation_accuracy"] < best["validation_accuracy"] and best["step"] < last["step"]

    # the kept weights were scored on 4 views of each image too (half the training jitter); the
    # labeler is told to use them exactly when they answered more validation rows correctly
    views = curve["views"]
    assert views["count"] == 4 and views["single_accuracy"] == best["validation_accuracy"]
    assert views["chosen"] == (views["accuracy"] > best["validation_accuracy"])
    assert (out / "lancetag_views.json").is_file() == views["chosen"]
    # the views are asked only of images as unsure as the least sure one whose answer they changed
    if views["accuracy"] != views["single_accuracy"]:  # some answers changed: the least sure of them sets the bar
        assert 0.0 < views["unsure_at"] <= 1.0 and 0.0 < views["unsure_share"] <= 1.0

    # the labeler loading base model + saved adapter scores the validation rows as the kept choice did
    backend = create_backend(BackendConfig(model=str(tiny_qwen2_vl), adapter=str(out)))
    sources = validation_sources(out / "lancetag_dataset_info", ["ab"], FRACTION)
    accuracy, rows = validation_accuracy(backend.label, sources)
    assert rows == 8 and accuracy == (views["accuracy"] if views["chosen"] else best["validation_accuracy"])
    single = create_backend(BackendConfig(model=str(tiny_qwen2_vl), adapter=str(out), views=1))
    assert validation_accuracy(single.label, sources)[0] == best["validation_accuracy"]
    if views["chosen"]:
        assert backend.views.count == 4 and backend.views.augment.rotate_degrees == 10
        assert backend.views.unsure_at == views["unsure_at"]


@pytest.mark.slow
def test_on_two_ray_workers_rank_zero_decides_and_every_rank_stops(ray_cluster, tiny_qwen2_vl, digits_dir, tmp_path):
    from llamafactory_ext.train import run_training
    from ray_jobs.evaluation.in_training import transformers_labeler

    out = tmp_path / "out"
    config = _config(tiny_qwen2_vl, digits_dir, out, "digits", num_train_epochs=6, learning_rate=0.0,
                     per_device_train_batch_size=4, ddp_timeout=120)  # a rank left training fails fast
    config["lancetag"]["validation"] = {"fraction": FRACTION, "every_epochs": 1, "patience": 1}
    result = run_training(config, workers=2, storage=str(tmp_path / "ray"), labeler=transformers_labeler)

    assert result.workers == 2
    assert [p["epoch"] for p in result.validation["points"]] == [1.0, 2.0]
    assert result.validation["stopped_early"] is True
    assert json.loads((out / "trainer_state.json").read_text())["epoch"] == 2.0
    assert (Path(result.checkpoint) / "lancetag_validation.json").is_file()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"labeler": None}, "validation_needs_labeler"),
        ({"register": {"split": "train", "val_fraction": 0.5}}, "validation_split_conflict"),
        ({"register": {"task": "caption"}}, "validation_needs_closed_task"),
        ({"validation": {"every_epochs": 1, "every_steps": 5}}, "bad_lancetag_block"),
        ({"validation": {"fraction": 0.01}}, "validation_no_rows"),  # none of the 12 ids falls in 1%
    ],
)
def test_a_validation_the_run_cannot_honour_is_refused_before_training(tiny_qwen2_vl, tmp_path, change, reason):
    from lance_io.reasons import ReasonError
    from llamafactory_ext.train import run_training
    from ray_jobs.evaluation.in_training import transformers_labeler

    lance.write_dataset(image_rows(digit_images(12)), str(tmp_path / "t.lance"))
    register = {"task": "digits", **change.get("register", {})}
    register_dataset(str(tmp_path / "t.lance"), "t", tmp_path / "data", label_column="truth", **register)
    config = _config(tiny_qwen2_vl, tmp_path / "data", tmp_path / "out", "t")
    config["lancetag"]["validation"] = change.get("validation", {"fraction": FRACTION})
    labeler = change.get("labeler", transformers_labeler)
    with pytest.raises(ReasonError) as err:
        run_training(config, labeler=labeler)
    assert err.value.reason == reason
    assert not (tmp_path / "out" / "trainer_state.json").exists()
    if reason == "validation_no_rows":  # refused from the ids before training, not at its first evaluation
        assert "none of the 12 training rows" in str(err.value)


def test_a_large_table_holds_back_max_rows_and_an_evaluation_reads_those_rows_only(tmp_path):
    """Past ``max_rows`` the share held back shrinks to ``max_rows`` over the rows the entry keeps;
    an evaluation asks the labeler about exactly those rows, found by id before training."""
    from llamafactory_ext.validation import plan_validation, scored_rows
    from llamafactory_ext.validation_curve import ValidationOptions
    from ray_jobs.evaluation.in_training import transformers_labeler
    from serve_apps.results import LabelResult

    table = image_rows(digit_images(300))
    lance.write_dataset(table, str(tmp_path / "t.lance"))
    register_dataset(str(tmp_path / "t.lance"), "t", tmp_path / "data", task="digits", label_column="truth",
                     where="truth != '0'")
    ids, images, truth = (table.column(c).to_pylist() for c in ("id", "image", "truth"))
    kept = [n for n in range(300) if truth[n] != "0"]
    args = {"dataset": "t", "dataset_dir": str(tmp_path / "data"), "model_name_or_path": "m",
            "output_dir": str(tmp_path / "out")}

    plan, changed = plan_validation(args, ValidationOptions(fraction=0.5, max_rows=30), transformers_labeler)
    assert plan.fraction == 30 / len(kept) < 0.5
    assert changed == {"t": {"split": "train", "val_fraction": plan.fraction}}
    entry = json.loads((tmp_path / "data" / "dataset_info.json").read_text())["t"]["lance"]
    assert entry["split"] == "train" and entry["val_fraction"] == plan.fraction
    held = [n for n in kept if split_of(ids[n], plan.fraction, held_out="validation", salt="validation") == "validation"]
    (rows,) = plan.rows
    assert rows.ids == [ids[n] for n in held] and 10 <= len(held) <= 60  # about max_rows: a hash's share

    asked: list[bytes] = []

    def label(batch: list[bytes], task) -> list[LabelResult]:  # right on the first 10 rows it is asked
        asked.extend(batch)
        answers = [truth[images.index(image)] if len(asked) - len(batch) + k < 10 else "0"
                   for k, image in enumerate(batch)]
        return [LabelResult(task=task.name, kind="classify", label=a, confidence=0.9, model_id="m",
                            task_hash="h", backend="test") for a in answers]

    scored = list(scored_rows(label, plan.rows, batch_size=4))
    assert asked == [images[n] for n in held]
    assert sum(r.right for r in scored) == 10 and all(r.counted == 1 for r in scored)

    register_dataset(str(tmp_path / "t.lance"), "t", tmp_path / "data2", task="digits", label_column="truth")
    plan, _ = plan_validation(args | {"dataset_dir": str(tmp_path / "data2")},
                              ValidationOptions(fraction=0.5, max_rows=1000), transformers_labeler)
    assert plan.fraction == 0.5  # under max_rows the fraction stands

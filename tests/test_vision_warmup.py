"""Warming a vision tower trained from scratch: a classifier of the training rows, before the fine-tune."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import lance
import pyarrow as pa
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from bench.data import image_rows
from lance_io.splits import split_of
from llamafactory_ext.register import register_dataset
from tests.conftest import REPO_ROOT

TINY_CONFIG = REPO_ROOT / "configs" / "train" / "tiny_qwen2_vl_cpu.yaml"
FRACTION = 0.25


def _square(rng: random.Random, bright: bool) -> bytes:
    """A 56x56 noise image, dark or bright: two classes a classifier of the tower's features separates."""
    low, high = (170, 255) if bright else (0, 85)
    image = Image.frombytes("L", (56, 56), bytes(rng.randint(low, high) for _ in range(56 * 56))).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def shades_dir(tmp_path_factory) -> Path:
    """A dataset_dir with `shades`: 48 dark or bright images, task `shade` (labels dark, bright), split all."""
    root = tmp_path_factory.mktemp("warmup-shades")
    rng = random.Random(0)
    rows = [(_square(rng, n % 2 == 1), "bright" if n % 2 else "dark") for n in range(48)]
    task = root / "shade.yaml"
    task.write_text(yaml.safe_dump({"kind": "classify", "name": "shade", "labels": ["dark", "bright"]}))
    lance.write_dataset(image_rows(rows), str(root / "shades.lance"))
    register_dataset(str(root / "shades.lance"), "shades", root / "data", task=str(task), label_column="truth")
    return root / "data"


def _config(model: Path, dataset_dir: Path, output_dir: Path, **lancetag) -> dict:
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config.update(model_name_or_path=str(model), dataset="shades", dataset_dir=str(dataset_dir),
                  output_dir=str(output_dir), finetuning_type="full", freeze_vision_tower=False,
                  freeze_multi_modal_projector=False, max_steps=1, per_device_train_batch_size=8)
    config["lancetag"].update(lancetag)
    return config


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_the_tower_learns_the_training_rows_and_the_run_trains_from_it(tiny_qwen2_vl, shades_dir, tmp_path):
    from llamafactory_ext.train import run_training
    from ray_jobs.evaluation.in_training import transformers_labeler

    out = tmp_path / "out"
    config = _config(tiny_qwen2_vl, shades_dir, out, vision_warmup={"epochs": 6},
                     validation={"fraction": FRACTION, "every_epochs": 1, "views": 1})
    config["freeze_vision_tower"] = True  # as the recipe sets it beside vision_warmup
    result = run_training(config, labeler=transformers_labeler)

    lineage = json.loads(Path(result.lineage_path).read_text())
    warmup = lineage["vision_warmup"]
    warm = out / "lancetag_warm_start"
    assert lineage["model_name_or_path"] == warmup["to"] == str(warm), "LLaMA-Factory trained from the warmed tower"
    assert warmup["from"] == str(tiny_qwen2_vl) and warmup["epochs"] == 6
    # validation's rows were held back from the warm-up as from the fine-tune
    ids = lance.dataset(str(shades_dir.parent / "shades.lance")).to_table(columns=["id"]).column("id").to_pylist()
    held_back = sum(split_of(i, FRACTION, held_out="validation", salt="validation") == "validation" for i in ids)
    assert 0 < held_back < len(ids) and warmup["rows"] == warmup["training_rows"] == len(ids) - held_back
    assert warmup["classes"] == ["dark", "bright"]
    assert warmup["last_epoch_train_accuracy"] >= 0.9, warmup  # chance is 0.5: the tower tells the shades apart
    assert warmup["teacher_weight"] == 0.3 and warmup["teacher"]["accuracy"] >= 0.9, warmup  # the pixel SVM too
    assert warmup["teacher"]["fit_rows"] < warmup["rows"], "each image's probabilities come from the other folds"

    base, warmed = _weights(Path(tiny_qwen2_vl)), _weights(warm)
    assert base.keys() == warmed.keys()
    changed = {k for k in base if not torch.equal(base[k], warmed[k])}
    assert changed and all(".visual." in k or k.startswith("visual.") for k in changed), sorted(changed)[:5]
    assert any("merger" in k for k in changed), "the projector into the language model was trained too"
    assert (warm / "preprocessor_config.json").is_file() or (warm / "processor_config.json").is_file()

    # The fine-tune kept the warmed tower and trained the rest: merger and language model.
    tuned = _weights(Path(result.output_dir))
    moved = {k for k in warmed if not torch.equal(warmed[k], tuned[k])}
    assert moved and not any(".blocks." in k or "patch_embed" in k for k in moved), sorted(moved)[:5]
    assert any("merger" in k for k in moved) and any("visual" not in k for k in moved)


def test_a_warmup_the_run_cannot_do_is_refused_before_training(tiny_qwen2_vl, shades_dir, tmp_path):
    from lance_io.reasons import ReasonError
    from llamafactory_ext.train import run_training

    lora = _config(tiny_qwen2_vl, shades_dir, tmp_path / "lora", vision_warmup={"epochs": 1})
    lora["finetuning_type"] = "lora"
    with pytest.raises(ReasonError) as raised:
        run_training(lora)
    assert raised.value.reason == "vision_warmup_needs_full_finetune"
    assert not (tmp_path / "lora" / "lancetag_warm_start").exists()

    with pytest.raises(ReasonError) as raised:
        run_training(_config(tiny_qwen2_vl, shades_dir, tmp_path / "zero", vision_warmup={"epochs": 0}))
    assert raised.value.reason == "bad_lancetag_block"


def test_a_task_of_several_questions_cannot_warm_a_classifier(tiny_qwen2_vl, tmp_path):
    from lance_io.reasons import ReasonError
    from llamafactory_ext.train import run_training

    rng = random.Random(1)
    rows = image_rows([(_square(rng, n % 2 == 1), "x") for n in range(8)]).drop_columns(["truth"])
    rows = rows.append_column("truth_shade", pa.array(["dark", "bright"] * 4))
    rows = rows.append_column("truth_size", pa.array(["small"] * 8))
    lance.write_dataset(rows, str(tmp_path / "t.lance"))
    task = tmp_path / "two.yaml"
    task.write_text(yaml.safe_dump({
        "kind": "attributes", "name": "two",
        "attributes": {"shade": {"values": ["dark", "bright"]}, "size": {"values": ["small", "large"]}},
    }))
    register_dataset(str(tmp_path / "t.lance"), "shades", tmp_path / "data", task=str(task), label_column="truth")
    with pytest.raises(ReasonError) as raised:
        run_training(_config(tiny_qwen2_vl, tmp_path / "data", tmp_path / "out", vision_warmup={"epochs": 1}))
    assert raised.value.reason == "vision_warmup_needs_classify"


def test_a_llava_next_tower_and_projector_warm_through_the_same_path(tiny_llava_next, shades_dir, tmp_path):
    from llamafactory_ext.vision_warmup import VisionWarmup, warm_vision_tower

    args = {"model_name_or_path": str(tiny_llava_next), "template": "llava_next", "finetuning_type": "full",
            "dataset": "shades", "dataset_dir": str(shades_dir), "output_dir": str(tmp_path / "out")}
    folder, record = warm_vision_tower(args, VisionWarmup(epochs=6), None)

    assert record["rows"] == 48 and record["last_epoch_train_accuracy"] >= 0.9, record
    base, warmed = _weights(Path(tiny_llava_next)), _weights(Path(folder))
    changed = {k for k in base if not torch.equal(base[k], warmed[k])}
    assert any("vision_tower" in k for k in changed) and any("multi_modal_projector" in k for k in changed)
    assert not [k for k in changed if "language_model" in k or "lm_head" in k], "the language model is left as it was"


def test_the_pixel_teacher_enters_the_loss_and_weight_zero_leaves_the_labels_alone(tiny_qwen2_vl, shades_dir, tmp_path):
    from llamafactory_ext.vision_warmup import VisionWarmup, warm_vision_tower

    def warm(name: str, **settings) -> tuple[dict, dict[str, torch.Tensor]]:
        args = {"model_name_or_path": str(tiny_qwen2_vl), "template": "qwen2_vl", "finetuning_type": "full",
                "dataset": "shades", "dataset_dir": str(shades_dir), "output_dir": str(tmp_path / name)}
        folder, record = warm_vision_tower(args, VisionWarmup(epochs=1, **settings), None)
        return record, _weights(Path(folder))

    (alone, alone_weights), (again, again_weights) = warm("alone", teacher_weight=0), warm("again", teacher_weight=0)
    taught, taught_weights = warm("taught")
    assert alone["teacher"] is None is again["teacher"] and taught["teacher"]["accuracy"] >= 0.9, taught
    assert all(torch.equal(alone_weights[k], again_weights[k]) for k in alone_weights), "a warm-up repeats itself"
    assert any(not torch.equal(alone_weights[k], taught_weights[k]) for k in alone_weights), "the teacher moved the tower"


def test_the_warmup_reads_the_images_of_the_rows_it_keeps_only(tmp_path, monkeypatch):
    """Past ``MAX_ROWS`` the lowest rows by id hash are kept, in hash order, from ids and labels alone.

    The entry keys its rows by a column of its own (``row key``, not ``id``), holds a key twice, a row without a
    label and a row with a label outside the task; a ``where`` excludes a quarter of the rows.
    """
    from lance_io.splits import id_bucket
    from llamafactory_ext import vision_warmup

    def in_train(key: str) -> bool:
        return split_of(key, 0.2, held_out="validation", salt="validation") == "train"

    rng = random.Random(2)
    rows = image_rows([(_square(rng, n % 2 == 1), "bright" if n % 2 else "dark") for n in range(60)])
    keys = [f"k{n}" for n in range(60)]
    first = min((n for n in range(60) if n % 4 and in_train(keys[n])), key=lambda n: id_bucket(keys[n], "vision_warmup"))
    twin = 13 if first != 13 else 14
    keys[twin] = keys[first]  # the key that ranks first, held by two rows
    truth = rows.column("truth").to_pylist()
    unlabeled, stray = [n for n in range(60) if n % 4 and in_train(keys[n]) and n not in (first, twin)][:2]
    truth[unlabeled], truth[stray] = None, "grey"
    rows = rows.drop_columns(["truth"]).append_column("row key", pa.array(keys))
    rows = rows.append_column("truth", pa.array(truth)).append_column("part", pa.array([n % 4 for n in range(60)]))
    lance.write_dataset(rows, str(tmp_path / "t.lance"))
    task = tmp_path / "shade.yaml"
    task.write_text(yaml.safe_dump({"kind": "classify", "name": "shade", "labels": ["dark", "bright"]}))
    register_dataset(str(tmp_path / "t.lance"), "shades", tmp_path / "data", task=str(task), label_column="truth",
                     where="part > 0", split="train", val_fraction=0.2)
    info_path = tmp_path / "data" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["shades"]["lance"]["id_column"] = "row key"
    info_path.write_text(json.dumps(info))

    images = rows.column("image").to_pylist()
    training = [n for n in range(60) if n % 4 and in_train(keys[n]) and truth[n] in ("dark", "bright")]
    ranked = sorted(training, key=lambda n: id_bucket(keys[n], "vision_warmup"))  # stable: table order on a tie
    assert sorted(ranked[:2]) == sorted([first, twin]) and {unlabeled, stray}.isdisjoint(training)
    monkeypatch.setattr(vision_warmup, "MAX_ROWS", 12)
    got, labels, classes, total = vision_warmup._training_rows({"dataset_dir": str(tmp_path / "data"), "dataset": "shades"})
    assert classes == ["dark", "bright"] and total == len(training) > 12
    assert got == [images[n] for n in ranked[:12]]
    assert labels == [classes.index(truth[n]) for n in ranked[:12]]

    monkeypatch.setattr(vision_warmup, "MAX_ROWS", 1000)  # under the cap: every training row, each once
    got, _, _, total = vision_warmup._training_rows({"dataset_dir": str(tmp_path / "data"), "dataset": "shades"})
    assert got == [images[n] for n in ranked] and total == len(training)
    got, _, _, _ = vision_warmup._training_rows({"dataset_dir": str(tmp_path / "data"), "dataset": "shades"},
                                                 fit=lambda data: data[:8])  # each image through fit as it is read
    assert got == [images[n][:8] for n in ranked]

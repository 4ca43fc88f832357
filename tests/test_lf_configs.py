"""The training configs in configs/train are valid LLaMA-Factory arguments plus a valid `lancetag:` block."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "configs" / "train").glob("*.yaml"))


def _known_keys() -> set[str]:
    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
    from llamafactory.hparams.training_args import TrainingArguments

    classes = (ModelArguments, DataArguments, FinetuningArguments, GeneratingArguments, TrainingArguments)
    return {f.name for cls in classes for f in dataclasses.fields(cls)}


def test_the_documented_recipes_exist():
    names = {p.stem for p in CONFIGS}
    assert {
        "qwen2_vl_2b_lora",
        "qwen2_5_vl_7b_lora",
        "llava_v1_6_mistral_7b_article",
        "tiny_qwen2_vl_cpu",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_keys_templates_and_files_are_valid(path: Path):
    from llamafactory.data.template import TEMPLATES

    from llamafactory_ext.run_options import load_config

    args, options = load_config(path)
    unknown = set(args) - _known_keys()
    assert not unknown, f"{path.name}: not LLaMA-Factory arguments: {sorted(unknown)}"
    assert args["template"] in TEMPLATES
    assert path.read_text().lstrip().startswith("#"), (
        "each config starts with a comment saying what it is for"
    )
    if "deepspeed" in args:
        assert Path(args["deepspeed"]).is_file()
    block = yaml.safe_load(path.read_text()).get("lancetag") or {}
    assert options.model_dump(mode="json", exclude_unset=True) == block, "every lancetag: key reaches RunOptions"


@pytest.mark.parametrize(
    ("block", "wrong"),
    [({"workers": -1}, "workers"), ({"worker": 2}, "worker"), ({"augment": {"rotate": 10}}, "rotate")],
)
def test_a_wrong_lancetag_block_is_refused_with_its_reason_and_key(block: dict, wrong: str):
    from llamafactory_ext.run_options import TrainConfigError, load_config

    with pytest.raises(TrainConfigError, match=wrong) as refused:
        load_config({"model_name_or_path": "m", "template": "qwen2_vl", "lancetag": block})
    assert refused.value.reason == "bad_lancetag_block"


def test_the_article_run_keeps_the_article_settings():
    from llamafactory_ext.run_options import load_config

    args, _ = load_config(REPO_ROOT / "configs" / "train" / "llava_v1_6_mistral_7b_article.yaml")
    assert args["template"] == "llava_next_mistral" and args["bf16"] is True
    assert args["learning_rate"] == 2e-5 and args["num_train_epochs"] == 20
    assert args["per_device_train_batch_size"] == 1 and args["disable_gradient_checkpointing"] is False
    assert '"stage": 3' in Path(args["deepspeed"]).read_text()


def test_a_config_that_is_not_utf8_or_a_negative_workers_flag_is_refused_with_its_reason(tmp_path):
    from llamafactory_ext.run_options import TrainConfigError
    from llamafactory_ext.train import run_training

    (tmp_path / "latin1.yaml").write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(TrainConfigError) as refused:
        run_training(tmp_path / "latin1.yaml")
    assert refused.value.reason == "bad_yaml" and "not UTF-8" in refused.value.message
    config = {**yaml.safe_load((REPO_ROOT / "configs/train/tiny_qwen2_vl_cpu.yaml").read_text()), "output_dir": str(tmp_path / "o")}
    with pytest.raises(TrainConfigError) as refused:  # the flag bypassed the block's own check (workers >= 0)
        run_training(config, workers=-1)
    assert refused.value.reason == "bad_option" and "workers" in refused.value.message


@pytest.mark.parametrize(
    ("change", "reason", "says"),
    [
        ({"dataset": "nope"}, "dataset_not_found", "Undefined dataset nope"),
        ({"eval_dataset": "digits,nope"}, "dataset_not_found", "eval_dataset"),
        ({"dataset_dir": "/nonexistent"}, "dataset_not_found", "dataset_info.json"),
        ({"template": "qwen2vl"}, "bad_training_config", "did you mean qwen2_vl"),
        ({"learning_rate": "5e-5"}, "bad_training_config", "write 5.0e-05"),  # YAML 1.1 reads 5e-5 as text
        ({"per_device_train_batch_size": 2.5}, "bad_training_config", "must be an integer"),
        ({"num_train_epochs": True}, "bad_training_config", "must be a number"),
        # each of these was an internal error (a TypeError or AttributeError inside a lookup)
        ({"template": [1]}, "bad_training_config", "template must be text"),
        ({"dataset_dir": 5}, "bad_training_config", "dataset_dir must be text"),
        ({"dataset": 5}, "bad_training_config", "dataset must be text"),
        ({"dataset": [["digits"]]}, "bad_training_config", "dataset must be text"),
    ],
)
def test_a_training_config_llamafactory_would_fail_late_on_is_refused_before_any_work(tmp_path, change, reason, says):
    import json

    from llamafactory_ext.run_options import TrainConfigError
    from llamafactory_ext.train import run_training

    (tmp_path / "dataset_info.json").write_text(json.dumps({"digits": {"file_name": "digits.json"}}))
    config = {**yaml.safe_load((REPO_ROOT / "configs/train/tiny_qwen2_vl_cpu.yaml").read_text()),
              "dataset_dir": str(tmp_path), "output_dir": str(tmp_path / "out"), "dataset": "digits", **change}
    with pytest.raises(TrainConfigError) as refused:
        run_training(config)
    assert refused.value.reason == reason and says in refused.value.message, refused.value
    assert not (tmp_path / "out").exists()  # refused before anything was written

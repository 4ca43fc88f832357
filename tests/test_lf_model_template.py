"""`lancetag demo --model M` fine-tunes M with the template LLaMA-Factory knows it by, found from M itself."""

from __future__ import annotations

import json
import shutil

import pytest

from llamafactory_ext.model_template import template_for


@pytest.mark.parametrize(
    ("model", "template"),
    [
        ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl"),  # LLaMA-Factory's table, as its web UI reads it
        ("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next_mistral"),
        ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next"),
        ("llava-hf/llava-v1.6-34b-hf", "llava_next_yi"),
    ],
)
def test_a_hub_id_takes_the_template_of_llamafactorys_table(model, template):
    assert template_for(model) == template


def test_a_local_folder_takes_its_template_from_its_hub_name_or_its_own_config(tiny_qwen2_vl, tiny_llava_next, tmp_path):
    assert template_for(str(tiny_qwen2_vl)) == "qwen2_vl"  # config.json: the Qwen2-VL family
    assert template_for(str(tiny_llava_next)) == "llava_next"  # over llama, with Vicuna's chat template
    # a download kept under the hub's own name: the table, whatever its files say
    named = shutil.copytree(tiny_llava_next, tmp_path / "llava-v1.6-mistral-7b-hf")
    assert template_for(str(named)) == "llava_next_mistral"
    # over llama with another chat format (llama3's): no template is a safe guess
    other = shutil.copytree(tiny_llava_next, tmp_path / "my-llava")
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        path = other / name
        if path.is_file():
            path.write_text(path.read_text().replace("USER:", "<|start_header_id|>user"))
    with pytest.raises(Exception, match="template_unknown") as err:
        template_for(str(other))
    assert "model_type llava_next" in str(err.value)
    (other / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    with pytest.raises(Exception, match="template_unknown"):
        template_for(str(other))


def test_a_hub_id_outside_the_table_is_read_through_transformers_and_a_miss_is_model_not_found():
    """Offline (the test session is: conftest), a hub id LLaMA-Factory's table does not hold cannot be read: the CLI
    says model_not_found, as it does for any model it cannot load, not template_unknown."""
    from ray_jobs.cli.errors import expected_error

    with pytest.raises(OSError) as err:
        template_for("someone/their-qwen2-vl-finetune")
    assert expected_error(err.value).reason == "model_not_found"

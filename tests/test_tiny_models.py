"""The tiny offline models load with from_pretrained(path) and generate from an image prompt."""

from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from serve_apps.tiny_models import build_tiny_model
from tests.conftest import LANCETAG


def generates_from_an_image_prompt(path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[Image.new("RGB", (56, 56), (200, 10, 10))], return_tensors="pt")
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert (inputs["input_ids"] == image_token).sum() > 0, "the prompt carries image tokens"

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new_tokens) <= 4


@pytest.mark.parametrize("fixture", ["tiny_qwen2_vl", "tiny_llava_next"])
def test_tiny_model_loads_from_folder_and_generates_from_an_image_prompt(fixture, request):
    generates_from_an_image_prompt(request.getfixturevalue(fixture))


@pytest.mark.parametrize(("arch", "width_key", "heads_key", "head_size"), [
    ("qwen2_vl", "embed_dim", "num_heads", 32), ("llava_next", "hidden_size", "num_attention_heads", 16),
])
def test_vision_hidden_widens_the_vision_tower_and_keeps_its_head_size(arch, width_key, heads_key, head_size, tmp_path):
    default = json.loads((build_tiny_model(arch, tmp_path / "a") / "config.json").read_text())["vision_config"]
    wide_path = build_tiny_model(arch, tmp_path / "b", vision_hidden=2 * default[width_key])
    wide = json.loads((wide_path / "config.json").read_text())["vision_config"]
    assert wide[width_key] == 2 * default[width_key] and wide[heads_key] == 2 * default[heads_key]
    assert wide[width_key] // wide[heads_key] == head_size
    generates_from_an_image_prompt(wide_path)
    with pytest.raises(ValueError, match="multiple of"):
        build_tiny_model(arch, tmp_path / "c", vision_hidden=head_size + 1)


def test_same_seed_builds_identical_weights_and_other_seed_differs(tmp_path):
    from safetensors.numpy import load_file

    a = load_file(build_tiny_model("qwen2_vl", tmp_path / "a", seed=1) / "model.safetensors")
    b = load_file(build_tiny_model("qwen2_vl", tmp_path / "b", seed=1) / "model.safetensors")
    c = load_file(build_tiny_model("qwen2_vl", tmp_path / "c", seed=2) / "model.safetensors")
    name = next(k for k in a if "embed_tokens" in k)
    assert (a[name] == b[name]).all()
    assert not (a[name] == c[name]).all()


def test_unknown_arch_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="qwen2_vl, llava_next"):
        build_tiny_model("blip2", tmp_path)  # type: ignore[arg-type]


@pytest.mark.long  # the command in a subprocess (15 s); the function it calls builds every test's tiny models
def test_cli_builds_a_tiny_model_folder(tmp_path):
    out = tmp_path / "m"
    subprocess.run([LANCETAG, "dev", "tiny-model", "--arch", "qwen2_vl", "--out", str(out)], check=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_vl"
    assert (out / "tokenizer.json").exists()


# The vLLM environment loading the tiny Qwen2-VL and generating from an image prompt is covered
# (with every task kind, LoRA and Ray Serve) by tests/test_vllm_backend.py.

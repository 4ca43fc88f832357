"""A training example of a Lance entry is never cut to cutoff_len (llamafactory_ext.cutoff)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from bench.data import digit_images, write_native, write_table
from tests.conftest import LANCETAG, REPO_ROOT
from tests.test_lf_dataset import _lf_args, _preprocess

# 24 labels of several words: the prompt lists them all, as a task with dozens of classes does
LABELS = [f"category {word} of the long list" for word in (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo", "lima",
    "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray")]
VISUAL_TOKENS = 4  # the digits' 56x56 pixels: 2x2 merged patches of Qwen2-VL


@pytest.fixture(scope="module")
def long_task(tmp_path_factory) -> tuple[Path, Path, list[tuple[bytes, str]]]:
    """(dataset_dir with `long` registered, the task's YAML, the rows): 12 digits labeled with LABELS."""
    from llamafactory_ext.register import register_dataset

    root = tmp_path_factory.mktemp("cutoff")
    images = [(data, LABELS[int(digit) * 2]) for data, digit in digit_images(12)]
    write_table(root / "long.lance", images)
    task = root / "task.yaml"
    task.write_text(yaml.safe_dump({"name": "long", "kind": "classify", "labels": LABELS}))
    register_dataset(str(root / "long.lance"), "long", root / "data", task=str(task), label_column="truth")
    return root / "data", task, images


def _refused(model: Path, data: Path, tmp: Path, **extra) -> tuple[str, int]:
    from llamafactory_ext.cutoff import CutoffError

    with pytest.raises(CutoffError) as err:
        _preprocess(_lf_args(model, data, "long", tmp, **extra))
    assert err.value.reason == "cutoff_too_short"
    return err.value.message, int(re.search(r"the longest is (\d+)\)", err.value.message).group(1))


def test_cut_examples_are_refused_with_the_length_they_need(tiny_qwen2_vl, long_task, tmp_path):
    import llamafactory_ext

    llamafactory_ext.activate()
    data, _, images = long_task
    message, needed = _refused(tiny_qwen2_vl, data, tmp_path / "a", cutoff_len=128)
    assert message.startswith(f"{len(images)} of {len(images)} training examples are longer than cutoff_len (128 tokens")
    assert needed > 128
    # the figure is exact: one token short is refused, at the length itself nothing is cut
    message, longest = _refused(tiny_qwen2_vl, data, tmp_path / "b", cutoff_len=needed - 1)
    assert longest == needed and not message.startswith(f"{len(images)} of")  # the labels' lengths differ
    dataset, _ = _preprocess(_lf_args(tiny_qwen2_vl, data, "long", tmp_path / "c", cutoff_len=needed))
    assert max(len(ids) for ids in dataset["input_ids"]) == needed
    # streamed, the first cut example read stops the run
    with pytest.raises(Exception, match="cutoff_too_short"):
        streamed, _ = _preprocess(_lf_args(tiny_qwen2_vl, data, "long", tmp_path / "d", cutoff_len=128,
                                           streaming=True, max_steps=2))
        next(iter(streamed))


def test_cutoff_for_holds_the_longest_example_of_the_task(tiny_qwen2_vl, long_task, tmp_path):
    from transformers import AutoTokenizer

    import llamafactory_ext
    from lance_io.tasks import load_task
    from llamafactory_ext.cutoff import cutoff_for

    llamafactory_ext.activate()
    data, task, _ = long_task
    _, needed = _refused(tiny_qwen2_vl, data, tmp_path / "a", cutoff_len=128)
    cutoff = cutoff_for(load_task(str(task)), AutoTokenizer.from_pretrained(tiny_qwen2_vl), VISUAL_TOKENS)
    assert needed < cutoff <= needed + 128 and cutoff % 64 == 0
    dataset, _ = _preprocess(_lf_args(tiny_qwen2_vl, data, "long", tmp_path / "b", cutoff_len=cutoff))
    assert len(dataset) == 12


def test_a_file_dataset_keeps_llamafactorys_truncation(tiny_qwen2_vl, long_task, tmp_path):
    """Only a run that reads a Lance entry is checked: a JSON dataset is cut as LLaMA-Factory always has."""
    import llamafactory_ext
    from lance_io.tasks import load_task

    llamafactory_ext.activate()
    _, task, images = long_task
    question = load_task(str(task)).questions()[0]
    rows = [{"messages": [{"role": "user", "content": "<image>" + question.prompt},
                          {"role": "assistant", "content": f"this is a photo of {label}."}]} for _, label in images]
    write_native(tmp_path / "data", "native", rows, [data for data, _ in images])
    dataset, _ = _preprocess(_lf_args(tiny_qwen2_vl, tmp_path / "data", "native", tmp_path, cutoff_len=128))
    assert {len(ids) for ids in dataset["input_ids"]} == {128}


def test_a_run_with_a_short_cutoff_fails_before_training(tiny_qwen2_vl, long_task, tmp_path):
    from llamafactory_ext.cutoff import CutoffError
    from llamafactory_ext.train import run_training

    data, _, _ = long_task
    config = yaml.safe_load((REPO_ROOT / "configs" / "train" / "tiny_qwen2_vl_cpu.yaml").read_text())
    config.update(model_name_or_path=str(tiny_qwen2_vl), dataset="long", dataset_dir=str(data),
                  output_dir=str(tmp_path / "out"), cutoff_len=128)
    with pytest.raises(CutoffError, match="cutoff_too_short"):
        run_training(config)
    assert not (tmp_path / "out" / "trainer_state.json").exists()
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_on_a_ray_train_worker_the_cli_prints_the_reason(ray_cluster, tiny_qwen2_vl, long_task, tmp_path):
    data, _, _ = long_task
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    cmd = [LANCETAG, "train", str(REPO_ROOT / "configs" / "train" / "tiny_qwen2_vl_cpu.yaml"), "--workers", "1",
           "--storage", str(tmp_path / "ray"), "--json"]
    for key, value in {"model_name_or_path": tiny_qwen2_vl, "dataset": "long", "dataset_dir": data,
                       "output_dir": tmp_path / "out", "cutoff_len": 128}.items():
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode != 0
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: cutoff_too_short: 12 of 12 training examples are longer than cutoff_len (128")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["error"]["reason"] == "cutoff_too_short"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("fixture", "template"), [("tiny_qwen2_vl", "qwen2_vl"), ("tiny_llava_next", "llava_next")])
def test_image_tokens_is_the_most_llamafactory_gives_an_image_of_the_run(fixture, template, request, tmp_path):
    """Qwen2-VL's count grows with an image's area, LLaVA-NeXT's with its tiles: images as wide and as
    tall as the probes, preprocessed by LLaMA-Factory itself, carry as many image tokens at most."""
    import io

    from llamafactory.data.template import TEMPLATES
    from PIL import Image
    from transformers import AutoTokenizer

    import llamafactory_ext
    from lance_io.tasks import load_task
    from llamafactory_ext.cutoff import cutoff_for, image_tokens, probe_shapes, task_cutoff
    from llamafactory_ext.register import register_dataset

    llamafactory_ext.activate()
    model, pixels, strip = request.getfixturevalue(fixture), 56 * 56, 10.0  # a strip: wider than the default probes
    shapes = probe_shapes(pixels, [strip])
    images = []
    for n, size in enumerate(shapes):
        out = io.BytesIO()
        Image.effect_noise(size, 40 + n).convert("RGB").save(out, format="PNG")
        images.append((out.getvalue(), "a"))
    write_table(tmp_path / "shapes.lance", images)
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({"name": "ab", "kind": "classify", "labels": ["a", "b"]}))
    register_dataset(str(tmp_path / "shapes.lance"), "shapes", tmp_path / "data", task=str(tmp_path / "task.yaml"),
                     label_column="truth")
    args = _lf_args(model, tmp_path / "data", "shapes", tmp_path, template=template, cutoff_len=4096,
                    image_max_pixels=pixels, image_min_pixels=pixels)
    dataset, _ = _preprocess(args)
    token = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids(TEMPLATES[template].mm_plugin.image_token)
    counts = [ids.count(token) for ids in dataset["input_ids"]]
    assert len(counts) == len(shapes) and len(set(counts)) > 1, "the images' shapes change their tokens"
    assert shapes[0][1] / shapes[0][0] > 2.9 and shapes[-1][0] / shapes[-1][1] > 9.5, "from 3:1 tall to the strip"
    assert image_tokens(str(model), template, pixels, pixels, ratios=[strip]) == max(counts)
    task = load_task("digits")  # the processor's own tokenizer counts the text as the model's does
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert task_cutoff(task, str(model), template, pixels, pixels, [strip]) == cutoff_for(task, tokenizer, max(counts))


def test_aspect_ratios_are_the_widest_and_tallest_of_the_rows_selected(tmp_path):
    import lance
    import pyarrow as pa

    from bench.data import image_rows
    from ray_jobs.demo import aspect_ratios

    rows = image_rows([(bytes([n]), label) for n, label in enumerate("aabbb")])
    sizes = {"width": [80, 40, 30, 90, 50], "height": [20, 40, 30, 30, 50], "exif_orientation": [None, None, None, 6, 1]}
    for name, values in sizes.items():
        rows = rows.set_column(rows.schema.get_field_index(name), rows.schema.field(name), [pa.array(values, rows.schema.field(name).type)])
    lance.write_dataset(rows, str(tmp_path / "t.lance"), max_rows_per_file=2)
    assert aspect_ratios(str(tmp_path / "t.lance"), 1, "truth = 'a'") == (4.0, 1.0)
    # the 90x30 row is turned upright by its EXIF orientation (6): 30 wide, 90 tall, not 3:1 wide
    assert aspect_ratios(str(tmp_path / "t.lance"), 1, "truth = 'b'") == (1.0, 1 / 3)


def test_the_demo_config_takes_the_cutoff_its_task_and_images_need(tiny_qwen2_vl, long_task, tmp_path):
    import llamafactory_ext
    from lance_io.tasks import load_task
    from llamafactory_ext.recipe import Recipe
    from ray_jobs.demo import _fit_cutoff, _training_config

    llamafactory_ext.activate()
    data, task, _ = long_task
    recipe = Recipe(side=56, visual_tokens=4, flip=False, jitter=False, fill=0, epochs=5, validation={"fraction": 0.1})
    config = _training_config(str(tiny_qwen2_vl), True, data, tmp_path / "o", None, recipe)
    configured = config["cutoff_len"]
    assert _fit_cutoff(config, load_task("digits"))["cutoff_len"] == configured, "ten short labels fit the YAML's"
    fitted = _fit_cutoff(config, load_task(str(task)))["cutoff_len"]
    _, needed = _refused(tiny_qwen2_vl, data, tmp_path / "a", cutoff_len=128, image_max_pixels=56 * 56, image_min_pixels=56 * 56)
    assert fitted > configured and needed <= fitted

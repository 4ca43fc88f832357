"""The image size a model was trained at: LLaMA-Factory's resize rule, a JPEG decoded small, the lineage it is read from."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from lance_io.image_size import ImagePixels, read_image_pixels
from serve_apps.backends.base import decode_image


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _photo(size: tuple[int, int]) -> Image.Image:
    """A smooth picture with some detail: a radial gradient, a ramp and a few bars."""
    grey = np.asarray(Image.radial_gradient("L").resize(size), dtype=np.float32)
    ramp = np.linspace(0, 255, size[0], dtype=np.float32)[None, :].repeat(size[1], 0)
    bars = ((np.arange(size[0]) // max(1, size[0] // 16)) % 2 * 60)[None, :].repeat(size[1], 0)
    rgb = np.stack([grey, ramp, np.clip(grey * 0.5 + bars, 0, 255)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("size", [(1600, 1200), (300, 300), (30, 20), (5000, 40), (64, 48), (7, 900), (2, 900), (9000, 30)])
@pytest.mark.parametrize("bounds", [(56 * 56, 32 * 32), (84 * 84, 84 * 84), (768 * 768, 32 * 32)])
@pytest.mark.parametrize("template", ["qwen2_vl", "llava_next"])
def test_fit_resizes_as_llamafactory_resizes_a_training_image(size, bounds, template):
    """Every template's rule (``MMPluginMixin``), and Qwen2-VL's after it: a thin side stretched, a long strip squeezed."""
    from llamafactory.data.template import TEMPLATES

    from llamafactory_ext.image_fit import trained_pixels

    image = _photo(size)
    expected = TEMPLATES[template].mm_plugin._preprocess_image(image, image_max_pixels=bounds[0], image_min_pixels=bounds[1])
    pixels = trained_pixels({"template": template, "image_max_pixels": bounds[0], "image_min_pixels": bounds[1]})
    assert pixels == ImagePixels(*bounds, qwen2_vl=template == "qwen2_vl")
    fitted = pixels.fit(image)
    assert fitted.size == expected.size and fitted.tobytes() == expected.tobytes()


def test_a_large_jpeg_is_decoded_small_and_lands_at_the_trained_size_within_a_few_grey_levels():
    photo = _encoded(_photo((1600, 1200)), "JPEG")
    pixels = ImagePixels(max=112 * 112, min=32 * 32)
    with Image.open(io.BytesIO(photo)) as image:
        pixels.draft(image)
        assert image.size == (200, 150)  # 1/8 of the scale: still more than 112x112 pixels
    small = decode_image(photo, fit=pixels)
    whole = pixels.fit(decode_image(photo))  # decoded whole, then resized
    assert small.size == whole.size == (129, 96)
    difference = np.abs(np.asarray(small, dtype=int) - np.asarray(whole, dtype=int))
    assert 0 < difference.mean() < 2 and difference.max() <= 24, (difference.mean(), difference.max())
    png = _encoded(_photo((1600, 1200)), "PNG")  # a PNG has no smaller decode: exactly LLaMA-Factory's resize
    assert decode_image(png, fit=pixels).tobytes() == pixels.fit(Image.open(io.BytesIO(png)).convert("RGB")).tobytes()


def test_a_jpeg_is_decoded_whole_when_a_smaller_scale_would_hold_fewer_pixels_than_trained():
    photo = _encoded(_photo((300, 200)), "JPEG")
    with Image.open(io.BytesIO(photo)) as image:
        ImagePixels(max=200 * 120, min=1).draft(image)  # half of each side holds 15,000 pixels: too few
        assert image.size == (300, 200)


def test_the_bounds_come_from_the_adapter_s_lineage_then_the_model_s(tmp_path):
    adapter, model, broken = tmp_path / "adapter", tmp_path / "model", tmp_path / "broken"
    for folder in (adapter, model, broken):
        folder.mkdir()
    (model / "lancetag_lineage.json").write_text(json.dumps({"image_pixels": {"max": 7056, "min": 7056}}))
    assert read_image_pixels(str(adapter), str(model)) == ImagePixels(7056, 7056)
    (adapter / "lancetag_lineage.json").write_text(json.dumps({"image_pixels": {"max": 262144, "min": 1024}}))
    assert read_image_pixels(str(adapter), str(model)) == ImagePixels(262144, 1024)
    (adapter / "lancetag_lineage.json").write_text(json.dumps({"image_pixels": {"max": 3136, "min": 3136, "qwen2_vl": True}}))
    assert read_image_pixels(str(adapter), str(model)) == ImagePixels(3136, 3136, qwen2_vl=True)
    (broken / "lancetag_lineage.json").write_text("{not json")
    assert read_image_pixels(str(broken), None, "Qwen/Qwen2-VL-2B-Instruct") is None  # a hub id: its processor's own
    (broken / "lancetag_lineage.json").write_text(json.dumps({"datasets": []}))  # a run before the bounds were recorded
    assert read_image_pixels(str(broken)) is None
    assert ImagePixels.of_run({"image_max_pixels": "262144"}) == ImagePixels(262144, 32 * 32)  # --set gives text
    assert ImagePixels.of_run({}) == ImagePixels(768 * 768, 32 * 32)  # LLaMA-Factory's defaults
    assert not ImagePixels.of_run({}).qwen2_vl


def test_validation_inside_training_resizes_as_the_run_trains(tiny_qwen2_vl):
    from transformers import AutoModelForImageTextToText

    from lance_io.tasks import load_task
    from ray_jobs.evaluation.in_training import transformers_labeler

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl).eval()
    task, pixels = load_task("digits"), ImagePixels(max=56 * 56, min=32 * 32)
    photo = _photo((224, 168))
    label = transformers_labeler(model, str(tiny_qwen2_vl), 4, None, pixels)
    (sized,) = label([_encoded(photo, "PNG")], task)
    (as_trained,) = transformers_labeler(model, str(tiny_qwen2_vl), 4)([_encoded(pixels.fit(photo), "PNG")], task)
    (whole,) = transformers_labeler(model, str(tiny_qwen2_vl), 4)([_encoded(photo, "PNG")], task)
    assert sized.probabilities == pytest.approx(as_trained.probabilities, abs=1e-6)
    assert whole.probabilities != pytest.approx(sized.probabilities, abs=1e-4)

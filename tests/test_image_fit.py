"""Training images held at their training size: decoded and resized once, the same tensors every epoch."""

from __future__ import annotations

import io
import random

import pytest
import torch
from PIL import Image

from llamafactory_ext.image_fit import fit_image, training_fit
from tests.table_fixtures import turned_photo

SIDE = 84


def _encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("template,model", [("qwen2_vl", "tiny_qwen2_vl"), ("llava_next", "tiny_llava_next")])
def test_an_image_is_held_at_its_training_size_only_where_that_gives_the_same_tensors_in_fewer_bytes(
    template, model, request
):
    from llamafactory.data.template import TEMPLATES
    from transformers import AutoProcessor

    rng = random.Random(3)
    noise = Image.frombytes("RGB", (640, 480), rng.randbytes(640 * 480 * 3))
    photo, strip, small, palette = (
        _encoded(noise, "JPEG"),
        _encoded(noise.crop((0, 0, 600, 20)), "PNG"),  # resized twice, it would not be the strip resized once
        _encoded(noise.resize((56, 56)).convert("LA"), "PNG"),  # its training size takes more bytes
        _encoded(noise.resize((300, 200)).quantize(64), "PNG"),  # LLaMA-Factory resizes a palette image nearest
    )
    plugin = TEMPLATES[template].mm_plugin
    processor = AutoProcessor.from_pretrained(request.getfixturevalue(model))
    processor.image_max_pixels = processor.image_min_pixels = SIDE * SIDE  # what a run sets
    held = {data: fit_image(plugin, data, max_pixels=SIDE * SIDE, min_pixels=SIDE * SIDE)
            for data in (photo, strip, small, palette)}
    for data, kept in held.items():  # what LLaMA-Factory computes from either, as its collator opens them
        before = plugin._get_mm_inputs([Image.open(io.BytesIO(data))], [], [], processor)
        after = plugin._get_mm_inputs([Image.open(io.BytesIO(kept))], [], [], processor)
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(torch.as_tensor(before[key]), torch.as_tensor(after[key])), key
    for data in (photo, palette):
        with Image.open(io.BytesIO(held[data])) as image:
            assert image.format == "PNG" and image.width * image.height <= SIDE * SIDE and len(held[data]) < len(data)
    assert len(held[photo]) < len(photo) / 10
    assert held[strip] == strip and held[small] == small
    truncated = photo[: len(photo) // 2]
    assert fit_image(plugin, truncated, max_pixels=SIDE * SIDE, min_pixels=SIDE * SIDE) == truncated


def test_the_jitter_stays_out_of_the_held_image():
    """Fitted while the run's jitter is installed, an image is the plain resize: the jitter is drawn per epoch."""
    from llamafactory.data.template import TEMPLATES

    from llamafactory_ext.augment import ImageAugment, install

    photo = _encoded(Image.frombytes("RGB", (640, 480), random.Random(4).randbytes(640 * 480 * 3)), "JPEG")
    plain = training_fit("qwen2_vl", SIDE * SIDE, SIDE * SIDE)(photo)
    install(ImageAugment(rotate_degrees=30, scale=0.2, shift=0.1))
    try:
        assert training_fit("qwen2_vl", SIDE * SIDE, SIDE * SIDE)(photo) == plain != photo
        plugin = TEMPLATES["qwen2_vl"].mm_plugin
        jittered = plugin._preprocess_image(Image.open(io.BytesIO(photo)), image_max_pixels=SIDE**2, image_min_pixels=SIDE**2)
        assert jittered.tobytes() != Image.open(io.BytesIO(plain)).tobytes()  # the jitter is on outside the fit
    finally:
        install(None)
    assert training_fit("no_such_template", SIDE * SIDE, SIDE * SIDE) is None


@pytest.mark.parametrize("side", [SIDE, 448])  # resized, and small enough to keep its size
def test_a_photo_turned_by_its_exif_is_trained_on_upright_as_the_labeler_sees_it(side):
    from lance_io.image_size import ImagePixels
    from serve_apps.backends.base import decode_image

    photo, upright = turned_photo()
    held = training_fit("qwen2_vl", side * side, 32 * 32)(photo)
    with Image.open(io.BytesIO(held)) as image:
        assert image.format == "PNG" and image.height > image.width  # upright: 90 wide, 120 high, or less
        trained = image.convert("RGB")
    labeled = decode_image(photo, fit=ImagePixels(max=side * side, min=32 * 32))
    assert trained.size == labeled.size and trained.tobytes() == labeled.tobytes()  # the same pixels, both ways
    if side == 448:
        assert trained.tobytes() == upright.tobytes()
    plain = _encoded(Image.open(io.BytesIO(photo)), "JPEG")  # no EXIF: small, kept as it is
    assert training_fit("qwen2_vl", side * side, 32 * 32)(plain) == plain


def test_a_stream_trains_on_a_turned_photo_upright_too(tmp_path):
    from bench.data import image_rows
    from lance_io import append_images
    from llamafactory_ext import reader
    from llamafactory_ext.source import LanceSource

    photo, upright = turned_photo()
    uri = str(tmp_path / "t.lance")
    other = _encoded(Image.new("RGB", (40, 30), (9, 9, 9)), "PNG")
    append_images(uri, image_rows([(photo, "a"), (other, "b")]))
    source = reader.resolve(LanceSource(uri=uri, version=1, label_column="truth"))
    streamed = {row["images"][0] for row in reader.stream_rows(source, fit=("qwen2_vl", 448 * 448, 32 * 32))}
    assert other in streamed and photo not in streamed  # the PNG as stored, the photo turned
    (turned,) = streamed - {other}
    assert Image.open(io.BytesIO(turned)).convert("RGB").tobytes() == upright.tobytes()
    assert {row["images"][0] for row in reader.stream_rows(source)} == {photo, other}  # no fit: as stored

"""Training images held at their training size: decoded and resized once, the same tensors every epoch."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from llamafactory_ext.image_fit import fit_image, training_fit
from tests.table_fixtures import turned_photo

SIDE = 84


def _encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _mpo(image: Image.Image) -> bytes:
    """A camera's multi-picture JPEG (MPO) of two frames, small enough to be kept as it is if read alike."""
    out = io.BytesIO()
    image.save(out, format="MPO", save_all=True, append_images=[image.rotate(90)], quality=20)
    return out.getvalue()


def _transparent(noise: Image.Image) -> Image.Image:
    """RGBA whose transparent half stores the noise's colours (what a cut-out's hidden pixels hold is arbitrary)."""
    alpha = Image.new("L", noise.size, 255)
    alpha.paste(0, (0, 0, noise.width // 2, noise.height))
    rgba = noise.convert("RGBA")
    rgba.putalpha(alpha)
    return rgba


@pytest.mark.parametrize("template", ["qwen2_vl", "llava_next"])
def test_an_image_is_trained_on_as_the_labeler_sees_it_and_kept_as_stored_where_that_is_the_same(template):
    from llamafactory.data.template import TEMPLATES

    from lance_io.image_size import ImagePixels
    from serve_apps.backends.base import decode_image

    rng = random.Random(3)
    noise = Image.frombytes("RGB", (640, 480), rng.randbytes(640 * 480 * 3))
    images = {
        "photo": _encoded(noise, "JPEG"),  # the labeler decodes it at 1/4 of its scale
        "small photo": _encoded(noise.resize((120, 90)), "JPEG"),
        "camera's small photo": _mpo(noise.resize((200, 150))),  # decoded at 1/2 of its scale by the labeler
        "strip": _encoded(noise.crop((0, 0, 600, 20)), "PNG"),  # resized twice, it would not be the strip resized once
        "small": _encoded(noise.resize((56, 56)), "PNG"),  # its training size takes more bytes
        "grey": _encoded(noise.resize((300, 200)).convert("L"), "PNG"),
        "phone photo": _encoded(noise.resize((300, 200)), "HEIF"),  # HEIC: pillow-heif, as the labeler reads it
        "palette": _encoded(noise.resize((300, 200)).quantize(64), "PNG"),  # LLaMA-Factory alone: resized nearest
        "gif": _encoded(noise.resize((300, 200)).quantize(64), "GIF"),
        "transparent": _encoded(_transparent(noise.resize((300, 200))), "PNG"),  # LLaMA-Factory alone: over black
        "small transparent": _encoded(_transparent(noise.resize((56, 56))).convert("LA"), "PNG"),  # ... over its noise
        "cut-out to enlarge": _encoded(_transparent(noise.resize((20, 47))), "PNG"),  # enlarged 54x128, again 54x129
    }
    plugin = TEMPLATES[template].mm_plugin
    bounds = {"image_max_pixels": SIDE * SIDE, "image_min_pixels": SIDE * SIDE}  # what a run sets
    fit = ImagePixels(max=SIDE * SIDE, min=SIDE * SIDE, qwen2_vl=template == "qwen2_vl")
    held = {name: fit_image(plugin, data, max_pixels=SIDE * SIDE, min_pixels=SIDE * SIDE) for name, data in images.items()}

    def trained_on(data: bytes) -> Image.Image:  # what LLaMA-Factory hands its processor for an image it holds
        return plugin._regularize_images([Image.open(io.BytesIO(data))], **bounds)["images"][0]

    for name, data in images.items():  # the labeler hands the processor what decode_image returns
        trained, labeled = trained_on(held[name]), decode_image(data, fit=fit)
        assert trained.mode == labeled.mode == "RGB" and trained.size == labeled.size, name
        assert trained.tobytes() == labeled.tobytes(), name
    for name in ("photo", "palette", "gif", "transparent", "small transparent", "cut-out to enlarge"):
        with Image.open(io.BytesIO(held[name])) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.width * image.height <= SIDE * SIDE, name
        assert trained_on(images[name]).tobytes() != trained_on(held[name]).tobytes(), name  # not what the file gives
    assert len(held["photo"]) < len(images["photo"]) / 10
    for name in ("strip", "small", "small photo"):  # LLaMA-Factory reads them as the labeler does, in no more bytes
        assert held[name] == images[name], name
    truncated = images["photo"][: len(images["photo"]) // 2]
    assert fit_image(plugin, truncated, max_pixels=SIDE * SIDE, min_pixels=SIDE * SIDE) == truncated


def test_the_labeler_sees_a_transparent_image_over_white_whatever_its_hidden_pixels_store():
    from lance_io.image_size import ImagePixels
    from serve_apps.backends.base import decode_image

    cut_out = Image.new("RGBA", (200, 100), (0, 0, 0, 0))  # hidden pixels black, as most of Tux Paint's stamps
    cut_out.paste((200, 30, 30, 255), (100, 0, 200, 100))
    hidden_white = cut_out.copy()
    hidden_white.paste((255, 255, 255, 0), (0, 0, 100, 100))
    palette = cut_out.convert("RGB").quantize(4)
    palette.info["transparency"] = palette.getpixel((0, 0))
    for image in (cut_out, hidden_white, cut_out.convert("LA"), palette):
        for fit in (None, ImagePixels(max=50 * 25, min=32)):
            seen = decode_image(_encoded(image, "PNG"), fit=fit)
            assert seen.mode == "RGB" and seen.getpixel((1, 1)) == (255, 255, 255), (image.mode, fit)


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


def _wide_grey(grey: Image.Image, fmt: str, mode: str) -> bytes:
    """``grey`` (8-bit) stored as a 16-bit PNG or TIFF (``I;16``), a 32-bit integer TIFF (``I``) or a 0-1 float TIFF (``F``)."""
    import numpy as np

    values = np.asarray(grey, dtype=np.float64)
    wide = {"I;16": (values * 257).astype(np.uint16), "I": (values * 257).astype(np.int32),
            "F": (values / 255).astype(np.float32)}[mode]
    image = Image.fromarray(wide)
    assert image.mode == mode
    return _encoded(image, fmt)


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I"), ("TIFF", "F")])
def test_a_grey_image_of_more_than_8_bits_is_seen_scaled_to_8_not_clipped_at_255(fmt, mode):
    """Pillow alone turns a 16-bit grey image white wherever it is brighter than 255 of 65,535 (and a 0-1 float
    image black): the labeler, training and the pixel baselines see the 8-bit image it holds."""
    import numpy as np

    from lance_io.image_size import ImagePixels, thumbnails
    from serve_apps.backends.base import decode_image

    grey = Image.frombytes("L", (300, 200), random.Random(5).randbytes(300 * 200))
    eight, wide = _encoded(grey, "PNG"), _wide_grey(grey, fmt, mode)
    with Image.open(io.BytesIO(wide)) as pillow_alone:
        assert len(np.unique(pillow_alone.convert("RGB"))) <= 2  # what the fix is for: 256 greys clipped to two
    fit = ImagePixels(max=SIDE * SIDE, min=SIDE * SIDE, qwen2_vl=True)
    for size in (None, fit):
        assert decode_image(wide, fit=size).tobytes() == decode_image(eight, fit=size).tobytes()
    assert np.array_equal(thumbnails([wide], 16)[0], thumbnails([eight], 16)[0])
    held = training_fit("qwen2_vl", SIDE * SIDE, SIDE * SIDE)
    with Image.open(io.BytesIO(held(wide))) as trained, Image.open(io.BytesIO(held(eight))) as trained_eight:
        assert trained.convert("RGB").tobytes() == trained_eight.convert("RGB").tobytes()


def test_a_16_bit_grey_png_keeps_its_transparent_grey_and_reaches_an_endpoint_as_8_bits():
    import base64

    import numpy as np

    from serve_apps.backends.base import decode_image
    from serve_apps.backends.openai_backend import data_url

    values = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)
    wide = _encoded(Image.fromarray(values), "PNG")
    out = io.BytesIO()
    Image.fromarray(values).save(out, format="PNG", transparency=5 * 257)
    seen = np.asarray(decode_image(out.getvalue()))[..., 0].reshape(-1)
    assert seen[5] == 255 and np.array_equal(np.delete(seen, 5), np.delete(np.arange(256), 5))  # over white
    url = data_url(wide)
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as sent:
        assert sent.mode == "RGB" and np.array_equal(np.asarray(sent)[..., 0].reshape(-1), np.arange(256))
    small = _encoded(Image.fromarray(values.astype(np.uint8)), "PNG")  # 8 bits: sent as it is
    assert base64.b64decode(data_url(small).split(",", 1)[1]) == small

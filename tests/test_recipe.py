"""The training recipe chosen from the data (llamafactory_ext.recipe), on real images.

Digits must never be mirrored and need no more than 4 visual tokens; a few objects placed anywhere
keep the mirror even where chance costs a classifier skill; solar cells (ELPV) look the same
mirrored and hold detail a 56-pixel image loses; the epochs follow the step budget; the chosen side
reaches the processor the labeler and training use.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from bench.real_datasets import class_counts, write_elpv
from llamafactory_ext.augment import ImageAugment, augment_image
from llamafactory_ext.recipe import (
    BATCH,
    EPOCHS,
    SIGNIFICANCE,
    SKILL_LOST,
    STEP_BUDGET,
    choose_epochs,
    choose_recipe,
    set_processor_side,
)
from llamafactory_ext.validation_curve import Curve, CurvePoint
from ray_jobs.demo import write_digits
from tests.table_fixtures import turned_photo


def _rows(folder: Path, keep: float = 1.0) -> tuple[list[str], list[bytes], list[str]]:
    files = [
        f
        for f in sorted(folder.rglob("*.png"))
        if int(hashlib.sha256(f.name.encode()).hexdigest()[:8], 16) / 16**8 < keep
    ]
    ids = [f"{f.parent.name}/{f.name}" for f in files]  # the same split whatever the temporary folder
    return ids, [f.read_bytes() for f in files], [f.parent.name for f in files]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"))


def test_digits_are_never_mirrored_and_keep_four_visual_tokens(digits: Path) -> None:
    recipe = choose_recipe(*_rows(digits))
    assert recipe.flip is False  # a mirrored 2, 3 or 7 is not that digit
    assert recipe.evidence["flip_check"]["skill_lost"] > 0.5 and recipe.evidence["flip_check"]["p_value"] < 1e-6
    assert (recipe.side, recipe.visual_tokens) == (56, 4)  # 8x8 digits: a bigger image adds no detail
    assert recipe.fill == 0  # black background: the jitter fills with black
    check = recipe.evidence["jitter_check"]
    assert check["with_jittered_copies"] > check["accuracy"]  # jittered copies teach a pixel SVM digits
    assert recipe.jitter is True and recipe.augment().rotate_degrees > 0


def test_a_training_split_past_the_profile_is_profiled_over_every_fold(digits: Path) -> None:
    """9,000 training rows: the 2,000 profiled must spread over the folds, or the mirror check scores nothing."""
    from llamafactory_ext.recipe import FOLDS, MAX_PROFILE_ROWS, _bucket, profiled_ids

    ids, images, labels = _rows(digits)
    copies = 9000 // len(ids) + 1  # the same digits under other ids, as a bigger table would hold them
    ids = [f"{k}/{i}" for k in range(copies) for i in ids]
    images, labels = images * copies, labels * copies
    profiled = profiled_ids(ids)
    folds = {k: sum(int(_bucket(i) * FOLDS) == k for i in profiled) for k in range(FOLDS)}
    assert len(profiled) == MAX_PROFILE_ROWS and min(folds.values()) > MAX_PROFILE_ROWS / FOLDS / 2, folds

    recipe = choose_recipe(ids, images, labels)
    assert recipe.evidence["rows"] == len(ids) and recipe.evidence["profiled_rows"] == MAX_PROFILE_ROWS
    assert recipe.flip is False and recipe.evidence["flip_check"]["accuracy"] > 0.8  # scored, and still not mirrored
    order = {row_id: k for k, row_id in enumerate(profiled)}  # the rows a table's reader fetches, in this order
    rows = sorted((r for r in zip(ids, images, labels, strict=True) if r[0] in order), key=lambda r: order[r[0]])
    fetched = choose_recipe(*map(list, zip(*rows, strict=True)), rows=len(ids))
    assert fetched.as_dict() == recipe.as_dict()


def test_the_from_scratch_rules_reach_the_tiny_model_only(digits: Path, tmp_path: Path) -> None:
    import yaml

    from ray_jobs.demo import LORA_CONFIG, _training_config

    recipe = choose_recipe(*_rows(digits, keep=0.3))
    tiny = _training_config("tiny", True, tmp_path, tmp_path / "out", None, recipe)
    # the random tower is warmed for the fine-tune's epochs, then kept as warmed; the projector trains
    assert tiny["lancetag"]["vision_warmup"] == {"epochs": recipe.epochs} and tiny["num_train_epochs"] == recipe.epochs
    assert tiny["freeze_vision_tower"] is True and tiny["freeze_multi_modal_projector"] is False
    assert tiny["image_max_pixels"] == recipe.side**2 and tiny["lancetag"]["augment"]["flip"] is False
    hub = _training_config("Qwen/Qwen2-VL-2B-Instruct", False, tmp_path, tmp_path / "out", None, recipe)
    assert "vision_warmup" not in hub["lancetag"] and hub["finetuning_type"] == "lora"
    lora = yaml.safe_load(LORA_CONFIG.read_text())
    assert hub["num_train_epochs"] == lora["num_train_epochs"] and hub["freeze_vision_tower"] is lora["freeze_vision_tower"]
    assert hub["image_max_pixels"] == recipe.side**2  # the data rules apply to any model
    assert hub["lancetag"]["gpus_per_worker"] == lora["lancetag"]["gpus_per_worker"], "a joined cluster: the YAML's workers"
    # on the demo's own cluster, one worker sized to it: a CPU machine trains on its CPUs, in fp32
    cpu = _training_config("llava-hf/llava-v1.6-mistral-7b-hf", False, tmp_path, tmp_path / "out", None, recipe, {"CPU": 2.0})
    assert cpu["template"] == "llava_next_mistral" and cpu["bf16"] is False
    assert {k: cpu["lancetag"][k] for k in ("workers", "gpus_per_worker", "cpus_per_worker")} == {
        "workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 2.0}
    gpus = _training_config("Qwen/Qwen2-VL-2B-Instruct", False, tmp_path, tmp_path / "out", None, recipe, {"CPU": 16.0, "GPU": 2.0})
    assert gpus["bf16"] is True and (gpus["lancetag"]["workers"], gpus["lancetag"]["gpus_per_worker"]) == (2, 1)  # data parallel
    assert gpus["lancetag"]["cpus_per_worker"] == lora["lancetag"]["cpus_per_worker"]
    few_cpus = _training_config("Qwen/Qwen2-VL-2B-Instruct", False, tmp_path, tmp_path / "out", None, recipe, {"CPU": 4.0, "GPU": 2.0})
    assert few_cpus["lancetag"]["cpus_per_worker"] == 2.0, "the node's CPUs shared by its GPU workers"


def test_solar_cells_are_mirrored_and_get_more_visual_tokens(tmp_path: Path) -> None:
    cells = write_elpv(tmp_path / "elpv")
    assert class_counts(cells) == {"defective": 715, "functional": 1508}
    recipe = choose_recipe(*_rows(cells, keep=0.4))  # ~900 cells: enough to measure, quicker
    assert recipe.flip is True  # a cracked cell mirrored is still cracked
    assert recipe.evidence["flip_check"]["skill_lost"] < 0.25
    assert recipe.side > 56 and recipe.visual_tokens > 4  # 300x300 cells lose detail at 56 pixels
    assert recipe.evidence["detail_kept"][56] < recipe.evidence["detail_kept"][recipe.side]
    check = recipe.evidence["jitter_check"]
    assert check["with_jittered_copies"] < check["accuracy"]  # aligned cells: the jitter only adds variance
    augment = recipe.augment()
    assert recipe.jitter is False and (augment.rotate_degrees, augment.scale, augment.shift) == (0, 0, 0)
    assert augment.flip is True and recipe.validation["views"] > 1  # the views are mirrors


def _noise(rng: random.Random, brightest: int) -> Image.Image:
    """A 64x64 grey image of uniform noise darker than ``brightest``."""
    image = Image.new("L", (64, 64))
    image.putdata([rng.randrange(0, brightest) for _ in range(64 * 64)])
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_class_that_is_a_position_is_neither_jittered_nor_mirrored() -> None:
    """A dot a few pixels left or right of the centre: shifting or mirroring the image changes its class."""
    rng = random.Random(0)
    ids, images, labels = [], [], []
    for n in range(400):
        label = rng.choice(["left", "right"])
        image = _noise(rng, 100)
        x = 29 if label == "left" else 33  # a shift of up to 5 pixels moves one onto the other
        for dx in range(-1, 2):
            for dy in range(-1, 2):
                image.putpixel((x + dx, 30 + dy), 200)
        ids.append(f"dot-{n}")
        images.append(_png(image))
        labels.append(label)
    recipe = choose_recipe(ids, images, labels)
    assert recipe.evidence["flip_check"]["accuracy"] > 0.9  # the position alone tells the classes apart
    check = recipe.evidence["jitter_check"]
    assert check["with_jittered_copies"] < check["accuracy"]
    assert recipe.flip is False and recipe.jitter is False
    assert recipe.validation["views"] == 1  # every view would be the image itself


def _objects(seed: int, rows: int = 48) -> tuple[list[str], list[bytes], list[str]]:
    """A disc or a ring anywhere on noise: mirrored, each is still what it was."""
    rng = random.Random(seed)
    ids, images, labels = [], [], []
    for n in range(rows):
        label = rng.choice(["disc", "ring"])
        image = _noise(rng, 120)
        x, y = rng.randrange(10, 54), rng.randrange(10, 54)
        box = (x - 8, y - 8, x + 8, y + 8)
        if label == "disc":
            ImageDraw.Draw(image).ellipse(box, fill=230)
        else:
            ImageDraw.Draw(image).ellipse(box, outline=230, width=2)
        ids.append(f"object-{n}")
        images.append(_png(image))
        labels.append(label)
    return ids, images, labels


def test_a_few_objects_keep_the_mirror_when_a_classifier_loses_skill_by_chance() -> None:
    """48 images: a classifier that memorised where the discs sat loses accuracy mirrored, but not beyond chance."""
    checks = []
    for seed in range(8):
        recipe = choose_recipe(*_objects(seed))
        assert recipe.flip is True, recipe.evidence["flip_check"]
        checks.append(recipe.evidence["flip_check"])
    # chance alone cost the classifier more than SKILL_LOST of its skill in some sets: the sign test kept the mirror
    lossy = [c for c in checks if c["skill_lost"] > SKILL_LOST]
    assert lossy and all(c["p_value"] >= SIGNIFICANCE for c in lossy)


def test_epochs_give_small_sets_more_passes_within_bounds() -> None:
    digits_epochs, validation = choose_epochs(1423)
    assert digits_epochs == 15  # the step budget is the digits recipe's 15 epochs
    assert validation["fraction"] * 1423 == pytest.approx(100, abs=1) and validation["patience"] >= 1
    assert choose_epochs(400)[0] > digits_epochs > choose_epochs(3000)[0]
    assert choose_epochs(10)[0] == EPOCHS[1] and choose_epochs(10**6)[0] == EPOCHS[0]
    rows = 2000
    assert choose_epochs(rows)[0] * -(-rows // BATCH) == pytest.approx(STEP_BUDGET, rel=0.1)


def test_a_later_evaluation_within_one_standard_error_of_the_best_is_kept() -> None:
    curve = Curve(fraction=0.1, rows=100)
    accuracies = [0.90, 0.95, 0.93, 0.95, 0.91]  # one standard error at 0.95 on 100 rows: about 0.024
    decisions = [curve.add(CurvePoint(k, k, a, None, 0.0), tolerance=1.0) for k, a in enumerate(accuracies)]
    assert decisions == [True, True, True, True, False]
    assert curve.best is not None and curve.best.step == 3  # 0.95 again, later: trained longer
    strict = Curve(fraction=0.1, rows=100)
    for k, a in enumerate(accuracies):
        strict.add(CurvePoint(k, k, a, None, 0.0))
    assert strict.best is not None and strict.best.step == 1  # without tolerance ties keep the earlier


def test_patience_counts_only_the_evaluations_validation_can_tell_below_the_best() -> None:
    """A curve flat within its noise trains on; only points below the tolerance count toward a stop.

    The first curve is a real demo run's on its 109 cells (2026-12-06): before, patience 2 stopped it
    after epoch 6 of 12 (84.4%, 83.5%, 83.5%: no better point) and kept epoch 6's weights, mid-schedule.
    """
    flat = Curve(fraction=0.056, rows=109)
    for k, accuracy in enumerate([0.844, 0.835, 0.835]):
        flat.add(CurvePoint(k, 2 * k + 2, accuracy, None, 0.0), tolerance=1.0)
    assert flat.since_kept() == 0 and flat.best is flat.points[-1]  # within one standard error: kept, no stop
    falling = Curve(fraction=0.056, rows=109)
    for k, accuracy in enumerate([0.844, 0.862, 0.78, 0.771]):
        falling.add(CurvePoint(k, 2 * k + 2, accuracy, None, 0.0), tolerance=1.0)
    assert falling.since_kept() == 2 and falling.best is falling.points[1]  # two real drops: patience 2 stops
    strict = Curve(fraction=0.056, rows=109)
    for k, accuracy in enumerate([0.844, 0.835, 0.835]):
        strict.add(CurvePoint(k, 2 * k + 2, accuracy, None, 0.0))
    assert strict.since_kept() == 2  # without tolerance, a point no better is not kept and counts
    assert Curve(fraction=0.1, rows=100).since_kept() == 0


def test_the_tolerance_shrinks_as_the_validation_set_grows() -> None:
    small, large = Curve(fraction=0.1, rows=100), Curve(fraction=0.1, rows=1000)
    for curve in (small, large):
        curve.add(CurvePoint(0, 0, 0.95, None, 0.0), tolerance=1.0)
    assert small.add(CurvePoint(1, 1, 0.93, None, 0.0), tolerance=1.0)  # noise on 100 rows
    assert not large.add(CurvePoint(1, 1, 0.93, None, 0.0), tolerance=1.0)  # a real drop on 1,000
    assert large.standard_error(0.95) < small.standard_error(0.95) / 3


def test_a_perfect_validation_score_still_has_the_noise_of_its_rows() -> None:
    rows = 96
    one_below, three_below = Curve(fraction=0.1, rows=rows), Curve(fraction=0.1, rows=rows)
    for curve in (one_below, three_below):
        curve.add(CurvePoint(0, 0, 1.0, None, 0.0), tolerance=1.0)
    assert 0 < one_below.standard_error(1.0) < 2 / rows
    assert one_below.add(CurvePoint(1, 1, 1 - 1 / rows, None, 0.0), tolerance=1.0)
    assert not three_below.add(CurvePoint(1, 1, 1 - 3 / rows, None, 0.0), tolerance=1.0)


def test_flip_mirrors_half_of_the_draws() -> None:
    image = Image.new("L", (20, 20), 0)
    image.paste(255, (0, 0, 5, 20))  # a bar on the left
    rng = random.Random(1)
    lefts = [
        augment_image(image, ImageAugment(flip=True), rng).getpixel((2, 10))[0] > 127 for _ in range(200)
    ]
    assert 70 < sum(lefts) < 130  # about half stay, half are mirrored to the right


def test_chosen_side_reaches_the_processor(tmp_path: Path) -> None:
    from transformers import AutoProcessor

    from serve_apps.tiny_models import build_tiny_model

    model = build_tiny_model("qwen2_vl", tmp_path / "m")
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300), "gray").save(buffer, format="PNG")
    image = Image.open(buffer)

    def tokens() -> int:
        grid = AutoProcessor.from_pretrained(model).image_processor(images=[image])["image_grid_thw"][0]
        return int(grid.prod()) // 4  # 2x2 merge

    assert set_processor_side(model, 84) is True
    assert tokens() == 9  # 84x84 pixels: 3x3 merged 28-pixel patches
    assert set_processor_side(model, 56) is True and tokens() == 4
    image = Image.new("RGB", (20, 12), "gray")  # a tiny image is scaled up to the side
    assert tokens() == 4
    assert set_processor_side(tmp_path, 56) is False  # no processor there: nothing changed


def test_the_demo_sizes_its_labeler_to_its_own_cluster_only() -> None:
    """Its own cluster: every CPU but the row readers' share, and a GPU if any; a joined one: the defaults."""
    from ray_jobs.demo import LABEL_UNITS, labeler_resources

    readers = 0.25 * LABEL_UNITS
    assert labeler_resources({"CPU": 2.0}) == {"concurrency": LABEL_UNITS, "labeler_num_cpus": 2.0 - readers}
    assert labeler_resources({"CPU": 1.0}) == {"concurrency": LABEL_UNITS, "labeler_num_cpus": 1.0}
    on_gpu = labeler_resources({"CPU": 16.0, "GPU": 2.0})
    assert on_gpu["labeler_num_gpus"] == 1.0 and on_gpu["labeler_num_cpus"] == 16.0 - readers
    assert labeler_resources(None) == {}


def test_a_photo_turned_by_its_exif_is_profiled_upright() -> None:
    """The recipe's rules (mirror, jitter, side) look at a phone's portrait photo as training does: upright."""
    from llamafactory_ext.recipe import _decode

    photo, upright = turned_photo()
    image, size = _decode(photo)
    assert size == (120, 90)  # as stored
    assert image.size == (90, 120) and image.tobytes() == upright.tobytes()


def test_a_photo_is_profiled_from_a_small_decode_that_keeps_its_stored_size() -> None:
    """The rules look at 224 pixels at most: a 12-megapixel photo is not held whole, a small image is held as it is."""
    from llamafactory_ext.recipe import DETAIL_REFERENCE, _decode

    rng = random.Random(5)
    photo = Image.frombytes("RGB", (80, 60), rng.randbytes(80 * 60 * 3)).resize((4000, 3000), Image.Resampling.BICUBIC)
    for fmt in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        photo.save(buffer, format=fmt)
        image, size = _decode(buffer.getvalue())
        assert size == (4000, 3000) and image.mode == "RGB"
        assert DETAIL_REFERENCE <= min(image.size) < 2 * DETAIL_REFERENCE and image.width * 3 == image.height * 4
    small = _noise(rng, 256).resize((300, 300))
    image, size = _decode(_png(small))
    assert size == (300, 300) and image.tobytes() == small.convert("RGB").tobytes()

    ids = [f"p{n}" for n in range(24)]
    images = [_png(_noise(rng, 100 if n % 2 else 250).resize((1000, 750))) for n in range(24)]
    recipe = choose_recipe(ids, images, ["dark" if n % 2 else "light" for n in range(24)])
    assert recipe.evidence["median_size"] == 1000  # the stored size, not the decoded one


def test_the_same_rows_in_another_order_get_the_same_recipe(digits: Path) -> None:
    """Ingest's workers store rows in any order: the checks' folds, fits and jitters follow the rows' ids, not their places."""
    ids, images, labels = _rows(digits, keep=0.5)
    rows = list(zip(ids, images, labels, strict=True))
    recipes = []
    for seed in (1, 2):
        random.Random(seed).shuffle(rows)
        recipes.append(choose_recipe(*map(list, zip(*rows, strict=True))))
    assert recipes[0].evidence["jitter_check"]["folds"] > 1
    assert recipes[0].as_dict() == recipes[1].as_dict()

"""The transformers backend on tiny Qwen2-VL and LLaVA-NeXT: every task kind, closed sets stay closed."""

from __future__ import annotations

import io
import math

import pytest
from PIL import Image

from lance_io.tasks import load_task
from serve_apps.backends import BackendConfig, ChatMessage, create_backend
from serve_apps.backends.base import label_images

ARCH_FIXTURES = ["tiny_qwen2_vl", "tiny_llava_next"]


def png(size=(56, 56), color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(size=(64, 48), color=(10, 120, 240)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module", params=ARCH_FIXTURES)
def backend(request):
    path = request.getfixturevalue(request.param)
    backend = create_backend(BackendConfig(kind="transformers", model=str(path), batch_size=4))
    yield backend
    backend.close()


IMAGES = [png(), jpeg(), png((112, 56), (0, 200, 0)), png((56, 84), (9, 9, 9)), jpeg((30, 30), (250, 250, 0))]


@pytest.mark.parametrize("task_name", ["digits", "hotel", "quality"])
def test_closed_set_answers_are_always_in_the_set_with_probabilities_summing_to_one(backend, task_name):
    task = load_task(task_name)
    (question,) = task.questions()
    results = backend.label(IMAGES, task)
    assert len(results) == len(IMAGES)
    for r in results:
        assert r.ok, r.error_message
        answer = r.label if task.kind == "classify" else str(r.score)
        assert answer in question.values
        assert set(r.probabilities) == set(question.values)
        assert math.isclose(sum(r.probabilities.values()), 1.0, abs_tol=1e-4)
        assert r.confidence == pytest.approx(max(r.probabilities.values()))
        assert r.probabilities[answer] == r.confidence
        assert r.raw_text in question.choices
        assert r.task_hash == task.prompt_hash() and r.backend == "transformers" and r.latency_ms > 0


def test_attributes_get_one_in_set_value_and_distribution_per_attribute(backend):
    task = load_task("fashion")
    results = backend.label(IMAGES[:3], task)
    for r in results:
        assert r.ok and r.label is None
        assert set(r.attributes) == set(task.attributes)
        for name, value in r.attributes.items():
            assert value in task.attributes[name].values
            assert math.isclose(sum(r.attribute_probabilities[name].values()), 1.0, abs_tol=1e-4)
        assert r.confidence == pytest.approx(math.prod(r.attribute_confidence.values()))


def test_caption_is_free_text_with_a_token_confidence(backend):
    results = backend.label(IMAGES[:2], load_task("caption"))
    assert len(results) == 2
    for r in results:
        assert r.ok and isinstance(r.caption, str) and r.probabilities is None
        assert r.confidence is not None and 0 < r.confidence <= 1  # mean token probability, even of an empty caption


def test_a_bad_image_gets_an_error_record_and_the_others_are_answered_in_order(backend):
    task = load_task("digits")
    results = backend.label([png(), b"not an image", b"", jpeg()], task)
    assert [r.ok for r in results] == [True, False, False, True]
    assert (
        results[1].error == "image_decode_failed"
        and "not a recognised image format" in results[1].error_message
    )
    assert results[1].label is None and results[2].error == "image_decode_failed"
    assert results[0].label in task.labels and results[3].label in task.labels


def test_a_model_that_fails_every_call_gives_each_usable_image_its_reason_and_bad_images_keep_theirs(backend):
    task = load_task("fashion")  # several questions: the first is answered, the second always raises
    asked = []

    def answer(question, images):
        asked.append((question.key, len(images)))
        if question.key != task.questions()[0].key:
            raise RuntimeError("out of memory")
        return backend._answer(question, images)

    results = label_images([png(), b"not an image", jpeg(), png((28, 84))], task, backend.provenance(task), answer)
    assert [r.error for r in results] == ["backend_failed", "image_decode_failed", "backend_failed", "backend_failed"]
    assert all("RuntimeError: out of memory" in results[i].error_message for i in (0, 2, 3))
    assert results[0].attributes is None and results[2].attributes is None
    failing = [n for key, n in asked if key != task.questions()[0].key]
    assert sorted(failing) == [1, 1, 1, 2, 3], "the 3 usable images, halved down to single images (2 * 3 - 1 calls)"


def test_a_batch_the_model_fails_is_halved_until_the_failure_is_the_image_s_own(backend):
    """The model refuses one image of a batch: it alone gets backend_failed; the others get the answers they get alone."""
    task = load_task("fashion")
    images = [png(), jpeg(), png((112, 56), (0, 200, 0)), png((56, 84), (9, 9, 9)), jpeg((30, 30), (250, 250, 0))]
    refused = Image.open(io.BytesIO(images[3])).size
    calls = []

    def answer(question, batch):
        calls.append(len(batch))
        if any(image.size == refused for image in batch):
            raise ValueError(f"cannot take an image of {refused}")
        return backend._answer(question, batch)

    results = label_images(images, task, backend.provenance(task), answer)
    assert [r.error for r in results] == [None, None, None, "backend_failed", None]
    assert "ValueError: cannot take an image of (56, 84)" in results[3].error_message
    alone = [backend.label([image], task)[0] for image in images]
    for i in (0, 1, 2, 4):
        assert results[i].attributes == alone[i].attributes
    # 5 refused, [0, 1] answered, [2, 3, 4] refused, [2] answered, [3, 4] refused, [3] refused, [4] answered
    assert len(calls) == 3 * len(task.questions()) + 4


def test_batched_scores_equal_one_image_at_a_time_despite_left_padding(backend):
    task = load_task("digits")
    batched = backend.label(IMAGES, task)
    for image, together in zip(IMAGES, batched, strict=True):
        (alone,) = backend.label([image], task)
        assert alone.label == together.label
        for label, p in alone.probabilities.items():
            assert together.probabilities[label] == pytest.approx(p, abs=1e-4)


@pytest.mark.parametrize("task_name, starts_alike", [("digits", True), ("quality", False)])
def test_shared_prefix_scoring_equals_scoring_each_full_sequence(backend, task_name, starts_alike):
    """The KV-cache path gives the same distribution as one full forward per candidate, whether
    the candidates start alike ("this is a photo of 7.": read once with the prefix) or not."""
    import torch

    from serve_apps.backends.base import decode_image
    from serve_apps.backends.transformers_backend import _shared_start

    task = load_task(task_name)
    (question,) = task.questions()
    image = IMAGES[2]
    (fast,) = backend.label([image], task)
    prompt = backend._prompt_text(question)
    ids, mask = backend._candidate_ids(question)
    assert (_shared_start(ids, mask) > 0) == starts_alike
    totals = []
    for row, row_mask in zip(ids, mask, strict=True):
        candidate = row[row_mask.bool()]
        inputs = backend.processor(text=[prompt], images=[decode_image(image)], return_tensors="pt")
        prefix_len = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], candidate[None]], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros_like(candidate[None])], 1
            )
        with torch.no_grad():
            logp = torch.log_softmax(backend.model(**inputs).logits.float(), -1)[0]
        totals.append(sum(float(logp[prefix_len - 1 + j, t]) for j, t in enumerate(candidate.tolist())))
    slow = torch.softmax(torch.tensor(totals), -1).tolist()
    assert fast.probabilities == pytest.approx(dict(zip(question.values, slow, strict=True)), abs=1e-4)


def test_shared_start_leaves_every_candidate_a_token_of_its_own():
    import torch

    def shared(rows):
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return _shared_start(ids, mask)

    from serve_apps.backends.transformers_backend import _shared_start

    assert shared([[5, 6, 7, 1], [5, 6, 8, 1]]) == 2
    assert shared([[5, 6, 7, 1], [4, 6, 7, 1]]) == 0
    assert shared([[5, 6], [5, 6, 0, 1]]) == 1  # the pad after [5, 6] equals the other's 0, yet no match
    assert shared([[5, 6], [5, 6, 7, 1]]) == 1  # one candidate starts the other
    assert shared([[5, 6, 7], [5, 6, 7]]) == 2
    assert shared([[5, 1]]) == 1  # a single candidate keeps its last token


def test_chat_answers_a_free_form_question_about_an_image(backend):
    from serve_apps.backends.base import decode_image

    reply = backend.chat(
        [ChatMessage("user", [decode_image(png()), "What is in this picture?"])], max_tokens=4
    )
    assert isinstance(reply.text, str) and 1 <= reply.completion_tokens <= 4 and reply.prompt_tokens > 0


def test_lora_adapter_is_applied_and_recorded(tiny_qwen2_vl, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    task = load_task("digits")
    plain = create_backend(BackendConfig(model=str(tiny_qwen2_vl)))
    tuned = create_backend(BackendConfig(model=str(tiny_qwen2_vl), adapter=str(tmp_path / "adapter")))
    before, after = plain.label([png()], task)[0], tuned.label([png()], task)[0]
    assert after.adapter_id == str(tmp_path / "adapter") and before.adapter_id is None
    assert after.probabilities != pytest.approx(before.probabilities, abs=1e-6)
    assert tuned.info()["adapter"] == str(tmp_path / "adapter")


def test_images_are_resized_as_the_adapter_s_training_resized_them(tiny_qwen2_vl, tmp_path):
    """A hub processor keeps its own bounds (Qwen2-VL's: 12.8 million pixels); the run's lineage says what
    LLaMA-Factory resized the training images to, and the labeler resizes to that, before the processor."""
    import json

    from llamafactory.data.mm_plugin import MMPluginMixin
    from llamafactory.data.template import TEMPLATES
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter = tmp_path / "adapter"
    get_peft_model(model, lora).save_pretrained(adapter)
    task = load_task("digits")
    photo = Image.radial_gradient("L").resize((224, 168)).convert("RGB")  # the processor alone keeps it at 224x168
    buffer = io.BytesIO()
    photo.save(buffer, "PNG")
    unrecorded = create_backend(BackendConfig(model=str(tiny_qwen2_vl), adapter=str(adapter)))
    assert unrecorded.info()["image_pixels"] is None
    (adapter / "lancetag_lineage.json").write_text(json.dumps({"image_pixels": {"max": 56 * 56, "min": 32 * 32}}))
    recorded = create_backend(BackendConfig(model=str(tiny_qwen2_vl), adapter=str(adapter)))
    assert recorded.info()["image_pixels"] == {"max": 56 * 56, "min": 32 * 32, "qwen2_vl": False}

    as_trained = MMPluginMixin._preprocess_image(TEMPLATES["qwen2_vl"].mm_plugin, photo, image_max_pixels=56 * 56,
                                                 image_min_pixels=32 * 32)
    assert as_trained.size == (64, 48)  # LLaMA-Factory's own resize, which training applied
    answered = recorded.label([buffer.getvalue()], task)[0]
    expected = unrecorded.label([_png_of(as_trained)], task)[0]
    assert answered.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
    full = unrecorded.label([buffer.getvalue()], task)[0]
    assert full.probabilities != pytest.approx(answered.probabilities, abs=1e-4)  # the size reached the model
    reply = recorded.chat([ChatMessage("user", [photo, "What digit is this?"])], max_tokens=3)
    assert reply.prompt_tokens == recorded.chat([ChatMessage("user", [as_trained, "What digit is this?"])],
                                                max_tokens=3).prompt_tokens  # free-form chat sees the same size


def test_a_strip_qwen2_vl_refuses_is_labeled_as_llamafactory_trained_on_it(tiny_qwen2_vl, tmp_path):
    """LLaMA-Factory's Qwen2-VL template stretches a side under 28 px and squeezes a strip over 200:1 before the
    processor (which refuses over 200:1); a model trained through it labels such an image as trained on it."""
    import json
    import shutil

    from llamafactory.data.template import TEMPLATES

    trained = tmp_path / "trained"
    shutil.copytree(tiny_qwen2_vl, trained)
    bounds = {"max": 56 * 56, "min": 32 * 32}
    (trained / "lancetag_lineage.json").write_text(json.dumps({"image_pixels": {**bounds, "qwen2_vl": True}}))
    task, strip = load_task("digits"), png((1, 600))
    as_trained = TEMPLATES["qwen2_vl"].mm_plugin._preprocess_image(
        Image.open(io.BytesIO(strip)), image_max_pixels=bounds["max"], image_min_pixels=bounds["min"])
    assert as_trained.size == (28, 783)  # 1x783 within the bounds, then the side stretched
    (labeled,) = create_backend(BackendConfig(model=str(trained))).label([strip], task)
    base = create_backend(BackendConfig(model=str(tiny_qwen2_vl)))
    (expected,) = base.label([_png_of(as_trained)], task)
    assert labeled.ok and labeled.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
    (refused,) = base.label([strip], task)  # without the run's record: the processor's own limit
    assert refused.error == "backend_failed" and "aspect ratio" in refused.error_message


def _png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_unknown_backend_name_lists_the_choices():
    with pytest.raises(ValueError, match="openai, random, transformers, vllm"):
        create_backend(BackendConfig(kind="nope", model="m"))


def _png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_views_average_the_probabilities_of_each_images_views_and_captions_use_the_image_alone(tiny_qwen2_vl):
    from bench.data import digit_images
    from lance_io.augment import ImageAugment, ImageViews
    from serve_apps.backends.base import decode_image

    views = ImageViews(count=3, augment=ImageAugment(rotate_degrees=8, scale=0.1, shift=0.1))
    task = load_task("digits")
    (question,) = task.questions()
    single = create_backend(BackendConfig(model=str(tiny_qwen2_vl), views=1))
    viewed = create_backend(BackendConfig(model=str(tiny_qwen2_vl)))
    viewed.views = views
    digits = [data for data, _ in digit_images(4)]
    got = viewed.label(digits, task)
    for data, result in zip(digits, got, strict=True):
        each = single.label([_png_of(v) for v in views.of(decode_image(data))], task)
        mean = {v: sum(r.probabilities[v] for r in each) / 3 for v in question.values}
        assert result.probabilities == pytest.approx(mean, abs=1e-5)
        assert result.label == max(mean, key=mean.get) and result.confidence == pytest.approx(max(mean.values()))
    # the views differ from the image (else the average would prove nothing), and a caption is not averaged
    assert single.label(digits[:1], task)[0].probabilities != pytest.approx(got[0].probabilities, abs=1e-4)
    caption = load_task("caption")
    assert viewed.label(digits[:1], caption)[0].caption == single.label(digits[:1], caption)[0].caption
    # each record says how many views its answer averaged: the caption's is the image alone
    assert {r.views for r in got} == {3} and single.label(digits[:1], task)[0].views == 1
    assert viewed.label(digits[:1], caption)[0].views == 1


def test_views_come_from_the_model_folder_unless_the_config_says_otherwise(tiny_qwen2_vl, tmp_path):
    import shutil

    from lance_io.augment import ImageAugment, ImageViews, read_views, write_views
    from serve_apps.backends.base import resolve_views

    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen2_vl, folder)
    assert resolve_views(BackendConfig(model=str(folder))) is None
    described = ImageViews(count=5, augment=ImageAugment(rotate_degrees=4, fill=255))
    write_views(folder, described)
    assert read_views(folder) == described
    assert resolve_views(BackendConfig(model=str(folder))) == described
    assert resolve_views(BackendConfig(model=str(folder), views=1)) is None
    assert resolve_views(BackendConfig(model=str(folder), views=2)) == described.model_copy(update={"count": 2})
    assert resolve_views(BackendConfig(model="org/hub-model", views=3)) == ImageViews(count=3)
    backend = create_backend(BackendConfig(model=str(folder)))
    assert backend.views == described and backend.info()["views"] == 5
    # what a label job computes before it starts the labeler equals what the labeler's records say
    from serve_apps.backends.base import views_for

    assert views_for(BackendConfig(model=str(folder)), load_task("digits")) == 5
    assert views_for(BackendConfig(model=str(folder), views=1), load_task("digits")) == 1
    assert views_for(BackendConfig(model=str(folder)), load_task("caption")) == 1
    assert views_for(BackendConfig(kind="random", model=str(folder)), load_task("digits")) == 1, "random averages none"


def test_the_views_of_an_image_are_fixed_and_start_with_the_image():
    from lance_io.augment import ImageViews

    image = Image.new("RGB", (56, 56), (0, 0, 0))
    image.paste((255, 255, 255), (20, 10, 36, 46))
    views = ImageViews(count=4)
    first, again = views.of(image), views.of(image.copy())
    assert len(first) == 4 and first[0] is image
    assert [v.tobytes() for v in first] == [v.tobytes() for v in again]  # the same jitters every call
    assert len({v.tobytes() for v in first}) == 4  # each view differs
    assert all(v.getpixel((0, 0)) == (0, 0, 0) for v in first)  # filled with the image's border grey


def test_a_replica_computes_on_its_cpus_rounded_up_unless_omp_threads_are_set(ray_cluster):
    """Ray gives a 1.5-CPU worker OMP_NUM_THREADS=1; the model runs on 2. A value of one's own wins."""
    ray = ray_cluster

    @ray.remote
    def threads() -> tuple[str | None, int | None]:
        import os

        from serve_apps.backends.transformers_backend import _threads_of_replica

        return os.environ.get("OMP_NUM_THREADS"), _threads_of_replica()

    assert ray.get(threads.options(num_cpus=1.5).remote()) == ("1", 2)
    assert ray.get(threads.options(num_cpus=1).remote()) == ("1", 1)
    own = {"env_vars": {"OMP_NUM_THREADS": "1"}}
    assert ray.get(threads.options(num_cpus=2.5, runtime_env=own).remote()) == ("1", None)
    from serve_apps.backends.transformers_backend import _threads_of_replica

    assert _threads_of_replica() is None  # the driver is no Ray worker: torch's own default


def test_views_with_unsure_at_are_asked_only_of_images_the_image_alone_leaves_unsure(tiny_qwen2_vl):
    from bench.data import digit_images
    from lance_io.augment import ImageAugment, ImageViews

    task = load_task("digits")
    single = create_backend(BackendConfig(model=str(tiny_qwen2_vl), views=1))
    viewed = create_backend(BackendConfig(model=str(tiny_qwen2_vl)))
    digits = [data for data, _ in digit_images(6)]
    alone = single.label(digits, task)
    every = ImageViews(count=3, augment=ImageAugment(rotate_degrees=8, scale=0.1, shift=0.1))
    viewed.views = every
    averaged = viewed.label(digits, task)
    confidences = sorted(r.confidence for r in alone)
    assert confidences[0] < confidences[-1], "the images differ in how sure the model is"
    unsure_at = confidences[len(confidences) // 2 - 1]
    viewed.views = every.model_copy(update={"unsure_at": unsure_at})

    got = viewed.label(digits, task)
    asked = [r.confidence <= unsure_at for r in alone]
    assert 0 < sum(asked) < len(digits)
    for result, by_itself, with_views, unsure in zip(got, alone, averaged, asked, strict=True):
        expected = with_views if unsure else by_itself  # an unsure image gets every view's average
        assert result.probabilities == pytest.approx(expected.probabilities, abs=1e-5)
        assert result.label == expected.label
    assert every.unsure([None]) and not every.model_copy(update={"unsure_at": 0.5}).unsure([0.6, 0.9])


def test_qwen2_vl_s_refusal_of_an_extreme_aspect_ratio_fails_that_image_alone(tiny_qwen2_vl):
    """Qwen2-VL's processor refuses an image over 200:1; the rest of its batch is labeled, its record names why."""
    backend = create_backend(BackendConfig(kind="transformers", model=str(tiny_qwen2_vl), batch_size=8))
    try:
        task = load_task("digits")
        images = [png(), png((1, 600)), jpeg(), png((56, 84), (9, 9, 9))]
        results = backend.label(images, task)
        assert [r.ok for r in results] == [True, False, True, True]
        assert results[1].error == "backend_failed" and "aspect ratio" in results[1].error_message
        assert results[1].error_message.count("backend_failed") == 1
        assert [r.label for i, r in enumerate(results) if i != 1] == [backend.label([images[i]], task)[0].label for i in (0, 2, 3)]
    finally:
        backend.close()

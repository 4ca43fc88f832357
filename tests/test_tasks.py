"""Task configs: shipped YAML loads, invalid configs name the field, hashes track what the model sees."""

from __future__ import annotations

import base64
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lance_io.tasks import (
    ClassifyTask,
    ScoreTask,
    TaskConfigError,
    available_tasks,
    load_task,
    task_from_dict,
)
from serve_apps.app import Limits, RequestError, parse_label_request


def test_shipped_tasks_load_by_name_and_hotel_has_at_least_30_categories():
    assert {"hotel", "fashion", "caption", "quality", "digits"} <= set(available_tasks())
    hotel = load_task("hotel")
    assert hotel.kind == "classify" and len(hotel.labels) >= 30
    assert {"Room", "Bathroom", "Lobby", "Pool", "Bar", "Exterior", "Gym", "Spa"} <= set(hotel.labels)
    assert load_task("digits").labels == [str(d) for d in range(10)]
    assert load_task("quality").questions()[0].values == tuple(str(s) for s in range(60, 101))


def test_classify_answers_take_the_article_shape_and_prompt_lists_the_labels():
    (question,) = load_task("hotel").questions()
    assert question.choices[0] == "this is a photo of Room."
    assert "[Room, Bedroom, Bathroom" in question.prompt and "{}" in question.prompt


def test_attributes_ask_one_closed_question_per_attribute():
    fashion = load_task("fashion")
    questions = fashion.questions()
    assert [q.key for q in questions] == list(fashion.attributes)
    assert all(q.closed and len(q.choices) == len(q.values) >= 2 for q in questions)
    assert "sleeve length" in questions[1].prompt


def test_load_task_from_a_path(tmp_path):
    path = tmp_path / "shoes.yaml"
    path.write_text("kind: classify\nlabels: [boot, sandal]\n")
    task = load_task(path)
    assert task.name == "shoes" and task.labels == ["boot", "sandal"]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"kind": "classify", "name": "x", "labels": ["a"]}, "labels"),
        ({"kind": "classify", "name": "x", "labels": ["a", "A"]}, "labels"),
        ({"kind": "classify", "name": "x", "labels": ["a", "b"], "prompt": "{label}"}, "prompt"),
        (
            {"kind": "classify", "name": "x", "labels": ["a", "b"], "answer_template": "it is"},
            "answer_template",
        ),
        ({"kind": "classify", "name": "x", "labels": ["a", "b"], "descriptions": {"c": "?"}}, "descriptions"),
        ({"kind": "classify", "name": "x", "labels": ["a", "b"], "colour": 1}, "colour"),
        ({"kind": "score", "name": "x", "min_score": 5, "max_score": 5}, "max_score"),
        ({"kind": "caption", "name": "x", "max_tokens": 0}, "max_tokens"),
        (
            {"kind": "attributes", "name": "x", "attributes": {"bad name": {"values": ["a", "b"]}}},
            "attributes",
        ),
        ({"kind": "tagging", "name": "x"}, "kind"),
    ],
)
def test_invalid_config_fails_at_load_naming_the_field(data, field):
    with pytest.raises(TaskConfigError, match=rf"\b{field}\b"):
        task_from_dict(data)


def test_unknown_task_name_lists_the_available_ones():
    with pytest.raises(TaskConfigError, match="hotel"):
        load_task("no-such-task")


def test_prompt_hash_ignores_name_and_description_but_tracks_prompt_and_labels():
    base = ClassifyTask(name="a", labels=["x", "y"])
    assert base.prompt_hash() == ClassifyTask(name="b", description="d", labels=["x", "y"]).prompt_hash()
    assert base.prompt_hash() != ClassifyTask(name="a", labels=["x", "z"]).prompt_hash()
    assert (
        base.prompt_hash()
        != ClassifyTask(name="a", labels=["x", "y"], answer_template="{label}").prompt_hash()
    )


def test_match_accepts_the_choice_or_bare_value_and_coerces_nothing_else():
    (question,) = ClassifyTask(name="t", labels=["Pool", "Bar"]).questions()
    assert question.match("this is a photo of Pool.") == "Pool"
    assert question.match("  bar ") == "Bar"
    assert question.match("this is a photo of a pool") is None
    assert question.match("Pool or Bar") is None


labels_strategy = st.lists(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(
        lambda s: s.strip() and "{" not in s
    ),
    min_size=2,
    max_size=12,
    unique_by=lambda s: " ".join(s.strip().rstrip(".").split()).casefold(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=labels_strategy)
def test_any_valid_label_set_round_trips_and_every_choice_matches_its_own_label(labels):
    task = task_from_dict({"kind": "classify", "name": "p", "labels": labels})
    (question,) = task.questions()
    assert list(question.values) == labels
    for choice, value in zip(question.choices, question.values, strict=True):
        assert question.match(choice) == value
    assert task_from_dict(task.model_dump()).prompt_hash() == task.prompt_hash()


@settings(max_examples=60, deadline=None)
@given(low=st.integers(-50, 50), span=st.integers(1, 200))
def test_score_tasks_offer_every_integer_of_the_range(low, span):
    task = ScoreTask(name="s", min_score=low, max_score=low + span)
    (question,) = task.questions()
    assert [int(v) for v in question.values] == list(range(low, low + span + 1))


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


@settings(max_examples=80, deadline=None)
@given(
    body=st.binary(max_size=200),
    kind=st.sampled_from(["application/json", "multipart/form-data; boundary=x"]),
)
def test_label_request_parsing_refuses_garbage_with_a_4xx_never_a_crash(body, kind):
    try:
        images, _ = parse_label_request(kind, body, Limits())
    except RequestError as exc:
        assert 400 <= exc.status < 500 and exc.message
    else:
        assert images and all(isinstance(i, bytes) for i in images)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), noise=st.sampled_from(["", "\n", " "]))
def test_label_request_parsing_returns_the_images_sent_in_order(n, noise):
    import json

    images = [_png() + bytes([i]) for i in range(n)]
    body = json.dumps({"images": [base64.b64encode(i).decode() + noise for i in images]}).encode()
    assert parse_label_request("application/json", body, Limits())[0] == images


def test_label_request_limits_give_413_and_unknown_content_type_415():
    body = ('{"images": ["' + base64.b64encode(b"x" * 100).decode() + '"]}').encode()
    with pytest.raises(RequestError) as too_large:
        parse_label_request("application/json", body, Limits(max_image_bytes=10))
    assert too_large.value.status == 413
    many = ('{"images": [' + ",".join(['"AA=="'] * 5) + "]}").encode()
    with pytest.raises(RequestError) as too_many:
        parse_label_request("application/json", many, Limits(max_images=4))
    assert too_many.value.status == 413
    with pytest.raises(RequestError) as wrong:
        parse_label_request("text/plain", b"hi", Limits())
    assert wrong.value.status == 415


def test_an_image_too_large_to_decode_is_named_so_not_called_a_non_image():
    from serve_apps.http_requests import check_images
    from tests.ingest_fixtures import png_declaring

    with pytest.raises(RequestError, match=r"images\[1\]: image_too_large") as refused:
        check_images([_png(), png_declaring(100_000, 100_000)])
    assert refused.value.status == 413
    with pytest.raises(RequestError, match=r"not an image Pillow can open: images\[0\]") as refused:
        check_images([b"hello", _png()])
    assert refused.value.status == 422


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


parts = st.lists(  # content parts as clients build them, with any value where a value goes
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "input_image"])},
        optional={"text": json_values, "image_url": json_values | st.fixed_dictionaries({"url": json_values})},
    ),
    max_size=3,
)


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool"]), "content": json_values | parts}),
        max_size=3,
    )
    | json_values
)
def test_chat_message_parsing_refuses_garbage_with_a_4xx_never_a_crash(messages):
    """The bounds check runs on the raw request first (a string ``image_url`` once made it a 500)."""
    from serve_apps.app import parse_chat_messages
    from serve_apps.chat import ChatBounds, ChatRequestError, check_bounds

    try:
        check_bounds(messages, ChatBounds())
        parsed = parse_chat_messages(messages)
    except (RequestError, ChatRequestError) as exc:
        assert 400 <= exc.status < 500 and exc.message
    else:
        assert all(m.role in ("system", "user", "assistant") for m in parsed)
        assert all(m.parts for m in parsed if m.role == "user")


def test_an_image_url_given_as_a_bare_string_is_read_as_its_url():
    """OpenAI sends ``{"image_url": {"url": U}}``; some clients send ``{"image_url": U}``."""
    from serve_apps.app import parse_chat_messages
    from serve_apps.chat import ChatBounds, check_bounds

    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    for image_url in (url, {"url": url}):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": image_url}, {"type": "text", "text": "Which?"}]}]
        check_bounds(messages, ChatBounds())
        image, text = parse_chat_messages(messages)[0].parts
        assert isinstance(image, Image.Image) and image.size == Image.open(io.BytesIO(_png())).size and text == "Which?"


def test_lancetag_serve_refuses_an_invalid_task_before_starting_ray(tmp_path):
    import subprocess

    from tests.conftest import LANCETAG

    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: classify\nlabels: [only-one]\n")
    done = subprocess.run(
        [LANCETAG, "serve", "--task", str(bad), "--model", "m", "--no-blocking"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "labels" in done.stderr

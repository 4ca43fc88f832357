"""A conversation about an image on the labeler's /v1/chat/completions, driven by the official ``openai`` client.

A real Serve app (tiny random Qwen2-VL, transformers backend) serves ``hotel`` and may route
chat questions to ``digits`` and ``quality`` too. The ``openai`` package lives in the vLLM
environment, so the client runs there in a subprocess (``CLIENT``) and prints one JSON line
per reply or refusal.

A random tiny model has no opinion about questions: it picks one route whatever is asked. The
one these tests serve (``router_model``: seed 0, the 320-token vocabulary) picks ``hotel`` with
p > 0.99 (the 512-token default picks ``question``, free text). So the first turn checks the
model's routing contract (a real route, the router's most probable one, the same result
``/label`` gives), and the later turns pin their route (``lancetag.route``, as a UI button
would) to reach a second task and a free question.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import textwrap

import httpx
import pytest
from PIL import Image

from lance_io.tasks import load_task
from serve_apps.app import ChatTable, LabelerConfig, build_app, run_labeler
from serve_apps.backends import BackendConfig
from serve_apps.chat import ChatBounds, ChatRequestError, chat_routes, check_bounds, route_task

TOKEN = "chat-test-token-not-a-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_MESSAGES = 6
MAX_TEXT = 500
MAX_IMAGE_BYTES = 60_000


def png(color=(200, 30, 30), size=(56, 56), noise: bool = False) -> bytes:
    image = Image.new("RGB", size, color)
    if noise:
        image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# ----------------------------------------------------------------------------- without a model


def test_the_router_chooses_among_every_task_and_free_questions_with_their_descriptions():
    routes = chat_routes([load_task("hotel"), load_task("quality")])
    router = route_task(routes, "Is {this} the lobby?", ["first question", "second", "third"])
    (question,) = router.questions()
    assert question.values == ("hotel", "quality", "question")
    assert "- hotel: Which part of a hotel a photo shows." in question.prompt
    assert "- question: any other question about the image" in question.prompt
    assert '"Is (this) the lobby?"' in question.prompt  # the user's braces are text, not placeholders
    assert "first question" not in question.prompt and '"third"' in question.prompt  # the last two earlier turns


def test_a_generate_task_or_a_duplicate_name_cannot_be_a_chat_route():
    with pytest.raises(ValueError, match="generates text from table columns"):
        chat_routes([load_task("hotel"), load_task("fashion_description")])
    with pytest.raises(ValueError, match="two routes named 'hotel'"):
        chat_routes([load_task("hotel"), load_task("hotel")])
    with pytest.raises(ValueError, match="it is not served"):
        build_app(LabelerConfig(task="fashion_description", backend=BackendConfig(model="m")))


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ([{"role": "user", "content": "hi"}] * 4, "too many messages: 4 > 3"),
        ([{"role": "user", "content": "x" * 11}], "11 characters exceeds 10"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 200}}]}], "exceeds 100"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}] * 3}], "3 images exceed 2"),
    ],
)
def test_bounds_are_checked_on_the_raw_request_with_a_413(messages, says):
    with pytest.raises(ChatRequestError) as refused:
        check_bounds(messages, ChatBounds(max_messages=3, max_text_chars=10, max_images=2, max_image_bytes=100))
    assert refused.value.status == 413 and says in refused.value.message


# ----------------------------------------------------------------------------- a real Serve app


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """A small image table (not labeled yet) whose rows the chat may name as ``photos``."""
    from lance_io import append_images
    from tests.table_fixtures import image_rows

    uri = str(tmp_path_factory.mktemp("chat-table") / "photos.lance")
    append_images(uri, image_rows(range(4)))
    return uri


@pytest.fixture(scope="module")
def router_model(tmp_path_factory) -> str:
    """A tiny random Qwen2-VL whose router prefers a labeling task (``hotel``), see the module docstring."""
    from serve_apps.tiny_models import build_tiny_model

    return str(build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("router-model"), vocab_size=320))


@pytest.fixture(scope="module")
def chat_url(ray_cluster, router_model, photos):
    from ray import serve

    from ray_jobs.chat_rows import read_row

    os.environ["LANCETAG_CHAT_TOKEN"] = TOKEN
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = LabelerConfig(
        task="hotel", chat_tasks=["digits", "quality"], backend=BackendConfig(model=router_model),
        port=port, num_cpus=0, app_name="chat", route_prefix="/chat", token_env="LANCETAG_CHAT_TOKEN",
        max_chat_messages=MAX_MESSAGES, max_chat_text_chars=MAX_TEXT, max_image_bytes=MAX_IMAGE_BYTES,
        chat_tables={"photos": ChatTable(uri=photos, columns={"hotel": "room"})},
    )  # fmt: skip
    yield run_labeler(config, row_reader=read_row)
    serve.delete("chat")


CLIENT = textwrap.dedent(
    """
    import json, sys, time
    import openai

    url, token, image, big = sys.argv[1:5]
    client = openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0, timeout=300)

    def ask(messages, **extra):
        started = time.perf_counter()
        reply = client.chat.completions.create(model="lancetag", messages=messages, max_tokens=8, **extra)
        out = reply.model_dump()
        out["seconds"] = round(time.perf_counter() - started, 3)
        print(json.dumps(out), flush=True)
        return reply.choices[0].message.content

    def refused(what, messages, **extra):
        try:
            client.chat.completions.create(model="lancetag", messages=messages, max_tokens=8, **extra)
            print(json.dumps({"refusal": what, "status": 200}), flush=True)
        except openai.APIStatusError as exc:
            print(json.dumps({"refusal": what, "status": exc.status_code, "body": exc.body}), flush=True)

    picture = {"type": "image_url", "image_url": {"url": image}}
    history = [{"role": "user", "content": [picture, {"type": "text", "text": "Which part of the hotel is this?"}]}]
    history.append({"role": "assistant", "content": ask(history)})
    history.append({"role": "user", "content": "How good is the quality of this photo?"})
    history.append({"role": "assistant", "content": ask(history, extra_body={"lancetag": {"route": "quality"}})})
    history.append({"role": "user", "content": "What would a guest think of it?"})
    ask(history, extra_body={"lancetag": {"route": "question"}})
    ask([{"role": "user", "content": "What would a guest think of it?"}])  # the same words, alone, no image
    chunks = client.chat.completions.create(model="lancetag", messages=history[:1], max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = [chunk.model_dump() for chunk in chunks]
    print(json.dumps({"stream": chunks, "said": "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])}))

    text = lambda t: {"role": "user", "content": t}
    refused("remote image", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}])
    refused("not base64", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}])
    refused("not an image", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}])
    refused("bad role", [{"role": "wizard", "content": "hi"}])
    refused("assistant last", [text("hi"), {"role": "assistant", "content": "hello"}])
    refused("unknown route", [text("hi")], extra_body={"lancetag": {"route": "weather"}})
    refused("too many turns", [text("hi")] * 7)
    refused("long text", [text("x" * 501)])
    refused("big image", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}])
    refused("two answers", [text("hi")], n=2)
    refused("json mode", [text("hi")], response_format={"type": "json_object"})
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    try:
        bad.chat.completions.create(model="lancetag", messages=[text("hi")], max_tokens=4)
    except openai.APIStatusError as exc:
        print(json.dumps({"refusal": "wrong token", "status": exc.status_code}), flush=True)
    """
)


@pytest.fixture(scope="module")
def conversation(chat_url, vllm_python, tmp_path_factory):
    """Replies (dicts, as the openai client parsed them) and refusals of CLIENT's run against the app."""
    script = tmp_path_factory.mktemp("client") / "client.py"
    script.write_text(CLIENT)
    image = data_url(png())
    big = data_url(png(size=(160, 160), noise=True))  # ~77 KB of noise: over MAX_IMAGE_BYTES
    run = subprocess.run(
        [str(vllm_python), str(script), chat_url, TOKEN, image, big],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NO_PROXY": "127.0.0.1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    replies = [line for line in lines if "choices" in line]
    refusals = {line["refusal"]: line for line in lines if "refusal" in line}
    print("\nseconds per turn:", [r["seconds"] for r in replies])
    (stream,) = [line for line in lines if "stream" in line]
    return {"replies": replies, "refusals": refusals, "image": png(), "stream": stream}


@pytest.mark.slow
def test_first_turn_is_routed_by_the_model_to_its_most_probable_task_with_the_labels_answer(conversation, chat_url):
    first = conversation["replies"][0]
    routed = first["lancetag"]
    assert routed["route"] in {"hotel", "digits", "quality", "question"}
    probabilities = routed["route_probabilities"]
    assert set(probabilities) == {"hotel", "digits", "quality", "question"}
    assert routed["route"] == max(probabilities, key=probabilities.get)
    assert routed["route_confidence"] == pytest.approx(probabilities[routed["route"]])
    assert routed["route"] == "hotel"  # what the random tiny model prefers (see the module docstring)
    label = httpx.post(
        f"{chat_url}/label", json={"images": [base64.b64encode(conversation["image"]).decode()]}, headers=AUTH, timeout=120
    ).json()["results"][0]
    assert routed["source"] == "model"
    assert routed["result"]["label"] == label["label"]
    assert routed["result"]["confidence"] == pytest.approx(label["confidence"], abs=1e-5)
    assert first["choices"][0]["message"]["content"] == f"hotel: {label['label']} (confidence {label['confidence']:.2f})"


@pytest.mark.slow
def test_a_pinned_route_runs_another_task_on_the_image_of_an_earlier_turn(conversation):
    second = conversation["replies"][1]["lancetag"]
    assert second["route"] == "quality" and second["route_probabilities"] is None
    assert 60 <= second["result"]["score"] <= 100 and 0 < second["result"]["confidence"] <= 1
    assert conversation["replies"][1]["choices"][0]["message"]["content"].startswith(f"quality: {second['result']['score']}")


@pytest.mark.slow
def test_a_free_question_is_answered_in_words_with_the_earlier_turns_and_image_in_context(conversation):
    third, alone = conversation["replies"][2], conversation["replies"][3]
    assert third["lancetag"]["route"] == "question" and third["lancetag"]["result"] is None
    assert isinstance(third["choices"][0]["message"]["content"], str)
    assert 1 <= third["usage"]["completion_tokens"] <= 8
    # the same words alone: no image, no route; the conversation's prompt holds the image and five turns more
    assert alone["lancetag"] is None
    assert third["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"] + 20


@pytest.mark.slow
@pytest.mark.parametrize(
    ("what", "status", "says"),
    [
        ("remote image", 400, "data: URLs"),
        ("not base64", 400, "not valid base64"),
        ("not an image", 422, "image_decode_failed"),
        ("bad role", 400, "role of system, user or assistant"),
        ("assistant last", 400, "last message must be the user's"),
        ("unknown route", 400, "not one of: hotel, digits, quality, question"),
        ("too many turns", 413, f"7 > {MAX_MESSAGES}"),
        ("long text", 413, f"exceeds {MAX_TEXT}"),
        ("big image", 413, f"exceeds {MAX_IMAGE_BYTES}"),
        ("two answers", 400, "not supported by this server: n"),
        ("json mode", 400, "not supported by this server: response_format"),
        ("wrong token", 401, None),
    ],
)
def test_malformed_and_oversized_requests_are_refused_with_a_4xx_saying_what_to_change(conversation, what, status, says):
    refusal = conversation["refusals"][what]
    assert refusal["status"] == status, refusal
    if says is not None:
        assert says in json.dumps(refusal["body"]), refusal


@pytest.mark.slow
def test_the_official_client_streams_the_first_turns_answer(conversation):
    stream, first = conversation["stream"], conversation["replies"][0]
    assert stream["said"] == first["choices"][0]["message"]["content"]  # greedy: the same answer, as server-sent events
    assert stream["stream"][-1]["usage"]["total_tokens"] == first["usage"]["total_tokens"]
    assert stream["stream"][0]["lancetag"]["route"] == first["lancetag"]["route"]


@pytest.mark.slow
def test_a_request_body_that_is_not_json_is_a_400(chat_url):
    r = httpx.post(f"{chat_url}/v1/chat/completions", content=b"{nope", headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


@pytest.mark.slow
def test_a_named_table_row_answers_from_its_stored_labels_and_runs_the_model_only_for_the_rest(chat_url, photos, router_model):
    import lance

    from lance_io.tasks import load_task
    from ray_jobs.label import LabelOptions, label_table

    summary = label_table(
        photos, LabelOptions(task="hotel", column="room", app="chat"), progress=False  # in-cluster handle: no token
    )
    assert summary.labeled == 4
    row_id = lance.dataset(photos).to_table(columns=["id"]).column(0)[1].as_py()
    # an answer the model would not give: only a stored label can say "Reception" with confidence 0.25
    lance.dataset(photos).update({"room": "'Reception'", "room_confidence": "0.25"}, where=f"id = '{row_id}'")
    row = {"lancetag": {"row": {"table": "photos", "id": row_id}}}
    history = [{"role": "user", "content": "Which part of the hotel is this?"}]
    first = httpx.post(f"{chat_url}/v1/chat/completions", json={"messages": history, **row}, headers=AUTH, timeout=120)
    assert first.status_code == 200, first.text
    routed = first.json()["lancetag"]
    assert routed["route"] == "hotel" and routed["source"] == "stored"
    assert routed["result"]["label"] == "Reception" and routed["result"]["confidence"] == 0.25
    assert routed["result"]["provenance"] == f"{router_model}||{load_task('hotel').prompt_hash()}"
    assert first.json()["choices"][0]["message"]["content"] == "hotel: Reception (confidence 0.25)"

    history += [first.json()["choices"][0]["message"], {"role": "user", "content": "And its quality?"}]
    pinned = {"lancetag": {"row": {"table": "photos", "id": row_id}, "route": "quality"}}
    second = httpx.post(f"{chat_url}/v1/chat/completions", json={"messages": history, **pinned}, headers=AUTH, timeout=120)
    assert second.status_code == 200, second.text
    quality = second.json()["lancetag"]
    assert quality["source"] == "model" and 60 <= quality["result"]["score"] <= 100  # no stored quality column

    missing = {"lancetag": {"row": {"table": "photos", "id": "no-such-row"}}}
    r = httpx.post(f"{chat_url}/v1/chat/completions", json={"messages": history[:1], **missing}, headers=AUTH, timeout=60)
    assert r.status_code == 404 and "no row with id" in r.json()["error"]
    other = {"lancetag": {"row": {"table": "elsewhere", "id": row_id}}}
    r = httpx.post(f"{chat_url}/v1/chat/completions", json={"messages": history[:1], **other}, headers=AUTH, timeout=60)
    assert r.status_code == 404 and "tables: photos" in r.json()["error"]


@pytest.mark.slow
def test_the_labelers_own_vlm_writes_generated_text_from_columns_and_the_image(chat_url):
    """A generate task with ``image: true`` through the labeler's chat route: free text, never a routed label."""
    from lance_io.tasks import task_from_dict
    from ray_jobs.label.generate import ChatEndpoint, chat_base, generate_records, served_model

    task = task_from_dict(
        {"kind": "generate", "name": "room_note", "inputs": {"digit": "truth"}, "image": True, "max_tokens": 6,
         "prompt": "Write a note about this photo of the digit {digit}."}
    )  # fmt: skip
    model, labeler = served_model(chat_url, "LANCETAG_CHAT_TOKEN")
    assert labeler, "a labeler says so in /v1/models (owned_by)"
    endpoint = ChatEndpoint(
        url=chat_base(chat_url), model=model, token_env="LANCETAG_CHAT_TOKEN", extra_body=(("lancetag", {"route": "question"}),)
    )
    rows = [{"id": "a", "truth": "7", "image": png()}, {"id": "b", "truth": "3", "image": png((0, 0, 200))}]
    records = generate_records(task, rows, ["id", "truth", "image"], endpoint)
    assert [r.error for r in records] == [None, None]
    assert all(isinstance(r.text, str) and not r.text.startswith("hotel:") for r in records)
    assert [r.inputs for r in records] == ["7", "3"]  # no provenance column for truth: its values only
    from ray_jobs.evaluation.faithfulness import missing_values

    assert [r.missing for r in records] == [missing_values(r.text, {"digit": row["truth"]}) for r, row in zip(records, rows, strict=True)]
    unpinned = generate_records(task, rows[:1], ["id", "truth", "image"], ChatEndpoint(chat_base(chat_url), model, "LANCETAG_CHAT_TOKEN"))
    assert unpinned[0].text.startswith("hotel:"), "without the pin the labeler routes an image question to a task"

"""The openai backend: request shape, answer parsing, never-coerced invalid answers, retries, timeouts."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from lance_io.tasks import load_task
from serve_apps.backends import BackendConfig, create_backend


def png(color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buffer, "PNG")
    return buffer.getvalue()


class FakeChatServer:
    """Test double of an OpenAI-compatible endpoint (no real model can run remotely here).

    It records every request body and headers, and answers from a script: each entry is either
    ``(status, body_dict)`` or the string ``"sleep"`` (answer after the client's timeout).
    When the script runs out, it repeats the last entry.
    """

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                step = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                if step == "sleep":
                    import time

                    time.sleep(1.5)
                    step = (200, reply("too late"))
                status, payload = step(body) if callable(step) else step
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def reply(text: str, logprobs: list[float] | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": "t", "logprob": lp} for lp in logprobs]}
    return {"choices": [choice], "usage": {"prompt_tokens": 10, "completion_tokens": len(logprobs or [1])}}


def backend_for(server: FakeChatServer, **kw):
    return create_backend(BackendConfig(kind="openai", model="served-model", base_url=server.url, **kw))


def test_request_carries_the_image_as_a_data_url_the_prompt_and_asks_for_logprobs():
    with FakeChatServer([(200, reply("this is a photo of 7.", [-0.1, -0.2]))]) as server:
        (result,) = backend_for(server).label([png()], load_task("digits"))
    body = server.requests[0]
    assert body["model"] == "served-model" and body["temperature"] == 0 and body["logprobs"] is True
    image_part, text_part = body["messages"][0]["content"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert "select from [0, 1, 2" in text_part["text"]
    assert result.ok and result.label == "7" and result.raw_text == "this is a photo of 7."
    assert result.confidence == pytest.approx(0.7408, abs=1e-3)
    assert result.probabilities is None and result.backend == "openai" and result.model_id == "served-model"


def test_an_answer_outside_the_set_is_invalid_with_its_raw_text_never_coerced():
    with FakeChatServer([(200, reply("this is a photo of 7 or maybe 1"))]) as server:
        (result,) = backend_for(server).label([png()], load_task("digits"))
    assert not result.ok and result.error == "invalid_answer" and result.label is None
    assert result.raw_text == "this is a photo of 7 or maybe 1"
    assert "not one of" in result.error_message


def test_transient_errors_are_retried_and_a_refusal_is_not():
    script = [(503, {"error": "busy"}), (429, {"error": "slow down"}), (200, reply("3"))]
    with FakeChatServer(script) as server:
        (ok,) = backend_for(server, retries=3).label([png()], load_task("digits"))
    assert ok.label == "3" and len(server.requests) == 3
    with FakeChatServer([(400, {"error": "bad model"})]) as server:
        (refused,) = backend_for(server, retries=3).label([png()], load_task("digits"))
    assert refused.error == "backend_failed" and "400" in refused.error_message and len(server.requests) == 1


def test_a_slow_endpoint_gives_a_timeout_record_after_the_retries():
    with FakeChatServer(["sleep"]) as server:
        (result,) = backend_for(server, timeout_s=0.3, retries=1).label([png()], load_task("digits"))
    assert result.error == "timeout" and len(server.requests) == 2


def test_an_endpoint_that_refuses_logprobs_is_asked_again_without_them():
    def answer(body):
        if body.get("logprobs"):
            return 400, {"error": "logprobs are not supported"}
        return 200, reply("5")

    with FakeChatServer([answer]) as server:
        backend = backend_for(server)
        results = backend.label([png(), png((0, 0, 9))], load_task("digits"))
    assert [r.label for r in results] == ["5", "5"] and backend.use_logprobs is False


def test_bad_images_and_attribute_tasks_produce_one_record_per_image_in_order():
    task = load_task("fashion")
    values = {name: attribute.values[1] for name, attribute in task.attributes.items()}

    def answer(body):
        prompt = body["messages"][0]["content"][1]["text"]
        name = next(n for n in values if (task.attributes[n].description or n.replace("_", " ")) in prompt)
        return 200, reply(values[name])

    with FakeChatServer([answer]) as server:
        results = backend_for(server).label([png(), b"junk", png((1, 1, 1))], task)
    assert [r.ok for r in results] == [True, False, True]
    assert results[0].attributes == values and results[1].error == "image_decode_failed"


def test_api_key_comes_from_the_named_env_var_and_is_never_in_info(monkeypatch):
    monkeypatch.setenv("FAKE_LABELER_KEY", "sk-test-123")
    with FakeChatServer([(200, reply("1"))]) as server:
        backend = backend_for(server, api_key_env="FAKE_LABELER_KEY")
        backend.label([png()], load_task("digits"))
    assert server.headers[0]["Authorization"] == "Bearer sk-test-123"
    assert "sk-test-123" not in json.dumps(backend.info())
    monkeypatch.delenv("FAKE_LABELER_KEY")
    with pytest.raises(ValueError, match="FAKE_LABELER_KEY"):
        backend_for(server, api_key_env="FAKE_LABELER_KEY")


def test_choice_constraint_option_sends_the_allowed_answers():
    with FakeChatServer([(200, reply("this is a photo of 2."))]) as server:
        backend_for(server, options={"choice_constraint": "structured_outputs"}).label(
            [png()], load_task("digits")
        )
    assert server.requests[0]["structured_outputs"]["choice"][2] == "this is a photo of 2."


def _with_logprob(value) -> dict:
    return {"choices": [{"message": {"content": "7"}, "logprobs": {"content": [{"token": "7", "logprob": value}]}}]}


MALFORMED_REPLIES = {
    "a list": [],
    "a string": "ok",
    "null": None,
    "an error object with status 200": {"error": {"message": "quota exceeded", "type": "insufficient_quota"}},
    "no choice": {"choices": []},
    "choices as text": {"choices": "7"},
    "a message as text": {"choices": [{"message": "7"}]},
    "content as a number": {"choices": [{"message": {"content": 7}}]},
    "a log-probability of null": _with_logprob(None),
    "a log-probability as text": _with_logprob("high"),
    "logprobs as a list": {"choices": [{"message": {"content": "7"}, "logprobs": [-0.1]}]},
}


@pytest.mark.parametrize("body", MALFORMED_REPLIES.values(), ids=MALFORMED_REPLIES.keys())
def test_a_reply_that_is_not_a_chat_completion_is_a_backend_failed_record_for_that_image_only(body):
    from serve_apps.backends.openai_backend import data_url

    images = [png(), png((0, 0, 9)), png((5, 90, 5))]
    broken_for = data_url(images[1])

    def answer(request):
        if request["messages"][0]["content"][0]["image_url"]["url"] == broken_for:
            return 200, body
        return 200, reply("this is a photo of 3.", [-0.1])

    with FakeChatServer([answer]) as server:
        results = backend_for(server, retries=3).label(images, load_task("digits"))
    assert [r.label for r in results] == ["3", None, "3"]
    failed = results[1]
    assert failed.error == "backend_failed" and "not a chat completion" in failed.error_message
    assert len(server.requests) == 3, "a malformed reply is neither retried nor read as a refusal of logprobs"


def test_content_parts_and_a_rounded_positive_log_probability_are_read_and_a_redirect_is_refused():
    parts = {"choices": [{"message": {"content": [{"type": "text", "text": "this is a photo "}, {"type": "text", "text": "of 4."}]},
                          "logprobs": {"content": [{"token": "4", "logprob": 1e-7}]}}]}
    with FakeChatServer([(200, parts)]) as server:
        (result,) = backend_for(server).label([png()], load_task("digits"))
    assert result.label == "4" and result.confidence == 1.0
    with FakeChatServer([(307, {"moved": True})]) as server:
        (moved,) = backend_for(server, retries=3).label([png()], load_task("digits"))
    assert moved.error == "backend_failed" and "redirects (307)" in moved.error_message and len(server.requests) == 1

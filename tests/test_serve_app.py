"""The labeler on real Ray Serve over HTTP on 127.0.0.1 (tiny models): API, auth, limits, overload, handle."""

from __future__ import annotations

import base64
import io
import json
import math
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from lance_io.tasks import load_task, task_from_dict
from serve_apps.app import LabelerConfig, build_app, run_labeler, token_sha256
from serve_apps.backends import BackendConfig, create_backend
from serve_apps.client import LabelerClient
from serve_apps.http_requests import MiB

pytestmark = pytest.mark.slow  # four Serve apps start side by side in the module fixture

TOKEN = "test-token-not-a-secret"


def png(color=(200, 10, 10), size=(56, 56)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def apps(ray_cluster, tiny_qwen2_vl, tiny_llava_next):
    """Four labeler apps on one Serve instance: every task kind, both architectures."""
    import os

    from ray import serve
    from ray.serve.context import _get_global_client

    os.environ["LANCETAG_TEST_TOKEN"] = TOKEN
    port = _free_port()
    common = {"port": port, "num_cpus": 0}
    qwen = BackendConfig(model=str(tiny_qwen2_vl))
    llava = BackendConfig(model=str(tiny_llava_next))
    specs = {
        "qwen-digits": LabelerConfig(task="digits", backend=qwen, token_env="LANCETAG_TEST_TOKEN", **common),
        "llava-fashion": LabelerConfig(task="fashion", backend=llava, max_images_per_request=8, max_request_bytes=MiB, **common),
        "qwen-quality": LabelerConfig(task="quality", backend=qwen, **common),
        "llava-caption": LabelerConfig(
            task="caption",
            backend=llava,
            max_ongoing_requests=1,
            max_queued_requests=1,
            max_batch_size=4,
            retry_after_s=2,
            **common,
        ),
    }
    # One Serve call deploys the four apps, so their replicas start (import torch, load) side by side;
    # run_labeler (one app a call) is what the other modules' fixtures and the failure tests below use.
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    configs = {name: config.model_copy(update={"app_name": name, "route_prefix": f"/{name}"}) for name, config in specs.items()}
    serve.run_many([serve.RunTarget(build_app(c, token_sha256=token_sha256(c.token_env)), name=n, route_prefix=c.route_prefix)
                    for n, c in configs.items()])
    http = _get_global_client().http_config  # the port of whoever started Serve first in this cluster
    yield {name: c.model_copy(update={"port": http.port}).url() for name, c in configs.items()}
    for name in specs:
        serve.delete(name)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_label_returns_one_in_set_record_per_image_with_probabilities(apps):
    images = [png(), png((0, 0, 255)), png((9, 9, 9), (112, 56))]
    r = httpx.post(f"{apps['qwen-digits']}/label", json={"images": [b64(i) for i in images]}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "digits" and body["task_hash"] == load_task("digits").prompt_hash()
    assert len(body["results"]) == 3
    for record in body["results"]:
        assert record["label"] in [str(d) for d in range(10)]
        assert math.isclose(sum(record["probabilities"].values()), 1.0, abs_tol=1e-4)


def test_every_task_kind_is_served_for_both_architectures(apps):
    images = {"images": [b64(png()), b64(png((1, 200, 1)))]}
    fashion = httpx.post(f"{apps['llava-fashion']}/label", json=images).json()["results"]
    task = load_task("fashion")
    assert len(fashion) == 2
    assert all(r["attributes"][n] in a.values for r in fashion for n, a in task.attributes.items())
    quality = httpx.post(f"{apps['qwen-quality']}/label", json=images).json()["results"]
    assert len(quality) == 2
    assert all(60 <= r["score"] <= 100 and 0 < r["confidence"] <= 1 for r in quality)
    caption = httpx.post(f"{apps['llava-caption']}/label", json=images, timeout=60).json()["results"]
    assert len(caption) == 2
    assert all(isinstance(r["caption"], str) and r["error"] is None for r in caption)


def test_multipart_upload_labels_each_file(apps):
    files = [("images", (f"{i}.png", png((i * 40, 0, 0)), "image/png")) for i in range(3)]
    r = httpx.post(f"{apps['llava-fashion']}/label", files=files)
    assert r.status_code == 200 and len(r.json()["results"]) == 3


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"json": {"images": ["not base64!"]}}, 400, "images[0]: not valid base64"),
        ({"json": {"images": [b64(b"GIF89a but not really")]}}, 422, "images[0]"),
        ({"json": {"pictures": []}}, 400, '"images"'),
        ({"json": {"images": []}}, 400, "no images"),
        ({"json": {"images": [b64(png())] * 9}}, 413, "too many images: 9 > 8"),
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported content type"),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ({"json": {"images": [b64(bytes(MiB))]}}, 413, "exceeds 1048576"),
        ({"content": iter([bytes(64 * 1024)] * 20), "headers": {"Content-Type": "application/json"}}, 413,
         "sent without a length"),  # chunked: no Content-Length to check first
    ],
    ids=["base64", "not-an-image", "no-images-key", "no-images", "too-many", "text", "not-json", "declared-too-long", "chunked-too-long"],
)
def test_malformed_requests_get_a_4xx_with_a_message(apps, kwargs, status, message):
    r = httpx.post(f"{apps['llava-fashion']}/label", **kwargs)
    assert r.status_code == status and message in r.json()["error"]


def test_the_chat_route_bounds_a_body_sent_without_a_length_too(apps):
    r = httpx.post(f"{apps['llava-fashion']}/v1/chat/completions", content=iter([b" " * 65536] * 20),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "sent without a length" in r.json()["error"]


def test_on_invalid_record_returns_error_records_for_bad_images_and_labels_the_rest(apps):
    body = {"images": [b64(png()), b64(b"\x89PNG truncated"), b64(png((3, 3, 3)))], "on_invalid": "record"}
    results = httpx.post(f"{apps['llava-fashion']}/label", json=body).json()["results"]
    assert [r["error"] for r in results] == [None, "image_decode_failed", None]
    assert results[1]["attributes"] is None and "image_decode_failed" in results[1]["error_message"]


def test_auth_on_refuses_missing_or_wrong_tokens_and_health_stays_open(apps):
    url = apps["qwen-digits"]
    body = {"images": [b64(png())]}
    missing = httpx.post(f"{url}/label", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{url}/label", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/info").status_code == 401
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.post(f"{url}/label", json=body, headers=AUTH).status_code == 200


def test_auth_off_serves_without_a_token_and_info_names_task_model_backend_versions(apps):
    info = httpx.get(f"{apps['llava-fashion']}/info").json()
    assert info["task"]["name"] == "fashion" and info["task"]["kind"] == "attributes"
    assert info["backend"]["backend"] == "transformers" and info["backend"]["model"].endswith(
        "tiny-llava-next0"
    )
    assert {"ray", "transformers", "torch", "python"} <= set(info["versions"])


def test_overload_gets_503_with_retry_after_not_500(apps):
    url = apps["llava-caption"]
    body = {"images": [b64(png((i, 0, 0))) for i in range(4)]}

    def post(_):
        return httpx.post(f"{url}/label", json=body, timeout=120)

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(post, range(12)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses, statuses
    assert all(r.headers.get("retry-after") == "2" for r in responses if r.status_code == 503)


def test_client_retries_overload_and_gets_every_record(apps):
    url = apps["llava-caption"]
    client = LabelerClient.over_http(url, timeout_s=120)
    with ThreadPoolExecutor(max_workers=6) as pool:
        batches = list(pool.map(lambda i: client.label([png((i, 9, 9)), b"bad bytes"]), range(6)))
    assert all(len(b) == 2 and b[0].ok and b[1].error == "image_decode_failed" for b in batches)


def test_handle_and_http_give_the_same_records(apps):
    images = [png(), png((0, 90, 0))]
    over_http = LabelerClient.over_http(apps["qwen-digits"], token=TOKEN).label(images)
    over_handle = LabelerClient.over_handle("qwen-digits").label(images)
    assert [r.label for r in over_http] == [r.label for r in over_handle]
    assert over_handle[0].probabilities == pytest.approx(over_http[0].probabilities, abs=1e-6)


def test_openai_compatible_chat_route_answers_about_an_image(apps):
    url = apps["qwen-digits"]
    message = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(png())}"}},
            {"type": "text", "text": "What is in this picture?"},
        ],
    }
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [message], "max_tokens": 5}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 5
    remote = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}],
    }
    refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": [remote]}, headers=AUTH)
    assert refused.status_code == 400 and "data: URLs" in refused.json()["error"]


def test_chat_route_streams_cuts_at_stop_and_refuses_what_it_would_drop(apps):
    """What OpenAI clients send besides messages: stream (server-sent events), stop, and options it cannot honour."""
    url = apps["qwen-digits"]
    question = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(png())}"}},
                                            {"type": "text", "text": "Describe it"}]}
    ask = {"messages": [question], "max_tokens": 8, "lancetag": {"route": "question"}}
    plain = httpx.post(f"{url}/v1/chat/completions", json=ask, headers=AUTH).json()
    said = plain["choices"][0]["message"]["content"]
    streamed = httpx.post(f"{url}/v1/chat/completions", json={**ask, "stream": True, "stream_options": {"include_usage": True}},
                          headers=AUTH)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == said  # greedy: the same text
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"] and chunks[-1]["usage"] == plain["usage"]
    if len(said) > 1:  # a stop string cuts the answer before it
        cut = httpx.post(f"{url}/v1/chat/completions", json={**ask, "stop": [said[1:]]}, headers=AUTH).json()
        assert cut["choices"][0]["message"]["content"] == said[:1] and cut["choices"][0]["finish_reason"] == "stop"
    defaults = {"n": 1, "logprobs": False, "tools": [], "response_format": {"type": "text"}, "temperature": 0.7, "seed": 3}
    assert httpx.post(f"{url}/v1/chat/completions", json={**ask, **defaults}, headers=AUTH).status_code == 200
    for option in [{"n": 2}, {"logprobs": True}, {"response_format": {"type": "json_object"}},
                   {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"stop": 3}]:
        refused = httpx.post(f"{url}/v1/chat/completions", json={**ask, **option}, headers=AUTH)
        assert refused.status_code == 400 and next(iter(option)) in refused.json()["error"], (option, refused.text)


def test_openai_backend_against_the_served_chat_route_records_invalid_answers_uncoerced(apps, monkeypatch):
    """A real OpenAI-compatible server (our own route on a random tiny model): answers are rarely in the set."""
    monkeypatch.setenv("LANCETAG_TEST_TOKEN", TOKEN)
    backend = create_backend(
        BackendConfig(
            kind="openai",
            model="tiny",
            base_url=f"{apps['qwen-digits']}/v1",
            api_key_env="LANCETAG_TEST_TOKEN",
        )
    )
    # Labels no tiny model says: every answer is invalid, kept as said, never mapped onto a label.
    labels = ["zzz first label", "zzz second label"]
    task = task_from_dict({"name": "unsayable", "kind": "classify", "labels": labels, "answer_template": "{label}"})
    records = backend.label([png(), png((0, 0, 1))], task)
    assert len(records) == 2
    for record in records:
        assert record.error == "invalid_answer" and record.label is None and record.confidence is None
        assert record.raw_text is not None and record.raw_text not in labels
        assert "zzz first label" in record.error_message



def _refused_start(apps, name: str, backend: BackendConfig, reason: str, **ask) -> str:
    """Deploy a labeler that cannot start beside ``apps``; check the refusal and that nothing is left; return its message."""
    from ray import serve

    from lance_io.reasons import ReasonError

    port = int(apps["qwen-digits"].rsplit(":", 1)[1].split("/")[0])
    config = LabelerConfig(
        task="digits", backend=backend, port=port, app_name=name, route_prefix=f"/{name}", **{"num_cpus": 0, **ask}
    )
    with pytest.raises(ReasonError) as refused:
        run_labeler(config)
    assert refused.value.reason == reason, refused.value
    assert name not in serve.status().applications  # nothing half-deployed left behind
    assert httpx.get(f"{apps['qwen-digits']}/health").status_code == 200  # the other apps serve on
    return str(refused.value)


def test_a_labeler_whose_replicas_cannot_start_is_refused_with_their_error(apps, monkeypatch):
    # The key's variable is set where the command runs but not on the cluster: a replica's own failure.
    monkeypatch.delenv("LANCETAG_NO_SUCH_KEY", raising=False)
    backend = BackendConfig(kind="openai", model="m", base_url="http://127.0.0.1:9/v1", api_key_env="LANCETAG_NO_SUCH_KEY")
    message = _refused_start(apps, "no-key", backend, "labeler_failed")
    assert "LANCETAG_NO_SUCH_KEY is not set" in message and "Deploying application" not in message


@pytest.mark.parametrize(
    "ask, says",
    [
        ({"num_gpus": 1}, "asks GPU 1, and no node of the cluster holds it (the most a node of its 1 has: GPU 0)"),
        ({"num_cpus": 64}, "asks CPU 64, and no node of the cluster holds it (the most a node of its 1 has: CPU 4)"),
        ({"resources": {"accel_a": 1}}, "asks accel_a 1, and no node of the cluster holds it (the most a node of its 1 has: accel_a 0)"),
        # the test cluster's one node has 4 logical CPUs: two replicas of 1.5 fit, the third would wait
        ({"num_cpus": 1.5, "num_replicas": 3}, "3 labeler replicas ask CPU 1.5 each, and the nodes of the cluster (1) hold 2"),
        ({"num_cpus": 1.5, "autoscaling": {"min_replicas": 3}}, "3 labeler replicas ask CPU 1.5 each"),
    ],
    ids=["a-gpu", "more-cpus-than-a-node", "a-resource-no-node-has", "more-replicas-than-the-nodes-hold", "autoscaling-minimum"],
)
def test_a_labeler_the_nodes_cannot_hold_is_refused_before_deploying_instead_of_waiting(apps, ask, says):
    """Serve would wait for ever for such a replica (logging every 30 s); the refusal names what the nodes have."""
    backend = BackendConfig(kind="openai", model="m", base_url="http://127.0.0.1:9/v1")
    message = _refused_start(apps, "unschedulable", backend, "resources_unavailable", **ask)
    assert says in message, message


def test_the_check_counts_replicas_against_the_whole_cluster(apps):
    from lance_io.reasons import ReasonError
    from serve_apps.schedulable import require_schedulable

    require_schedulable({"CPU": 1.5}, replicas=2)  # the node's 4 CPUs hold two, though the apps beside them run
    require_schedulable({"CPU": 0}, replicas=1000)  # a replica asking nothing takes no room
    with pytest.raises(ReasonError, match="hold 2 of them at once"):
        require_schedulable({"CPU": 1.5}, replicas=3)


def test_lancetag_serve_asking_a_gpu_of_a_cluster_without_one_is_one_error_line_not_a_wait(apps):
    import os
    import subprocess

    import ray

    from tests.conftest import LANCETAG

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    args = ["serve", "--task", "digits", "--model", "m", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1"]
    proc = subprocess.run([LANCETAG, *args, "--gpus", "1", "--no-blocking"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and not proc.stdout
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: resources_unavailable: a labeler replica asks CPU 1, GPU 1") and "GPU 0" in line, line


@pytest.mark.long  # Serve starts the replica 3 times, each importing torch (about 40 s)
def test_a_labeler_whose_model_is_not_there_is_model_not_found(apps, tmp_path):
    message = _refused_start(apps, "no-model", BackendConfig(model=str(tmp_path / "missing")), "model_not_found")
    assert str(tmp_path / "missing") in message

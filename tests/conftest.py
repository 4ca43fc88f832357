"""Shared fixtures: one local Ray cluster per session, tiny offline models, temporary tables."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Offline and quiet, before anything imports Ray or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray's metrics exporter thread once killed a test's Ray driver with SIGSEGV (in opentelemetry's
# MetricCollector::Produce; ray-project/ray#36885 is the class). No test reads Ray's metrics.
os.environ.setdefault("RAY_enable_metrics_collection", "0")

REPO_ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
LANCETAG = str(Path(sys.executable).parent / "lancetag")  # the console script of this environment


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the whole test session (4 logical CPUs, 512 MiB object store)."""
    import ray

    if not ray.is_initialized():
        from serve_apps.local_cluster import init_local_ray

        init_local_ray(  # as lancetag starts its own: a new cluster, where Serve starts on a busy machine too
            num_cpus=4,  # logical CPUs on 2 cores: Serve replicas and job tasks never deadlock on accounting
            object_store_memory=512 * 1024**2,
            log_to_driver=False,
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory) -> Path:
    """Folder of a tiny random Qwen2-VL (model, tokenizer, processor, chat template)."""
    from serve_apps.tiny_models import build_tiny_model

    return build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory) -> Path:
    """Folder of a tiny random LLaVA-NeXT (model, tokenizer, processor, chat template)."""
    from serve_apps.tiny_models import build_tiny_model

    return build_tiny_model("llava_next", tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The interpreter of the vLLM labeling environment; skips where it is not set up."""
    if not VLLM_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-vllm is missing: CI must set up both environments")
        pytest.skip(".venv-vllm is not set up (run `make setup`)")
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1 with a bucket, for the whole session."""
    from tests.s3_server import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def digits_labeler(ray_cluster, tiny_qwen2_vl):
    """A digits labeler (tiny Qwen2-VL, transformers backend) served over HTTP on 127.0.0.1."""
    from serve_apps.app import LabelerConfig, run_labeler, stop_labeler
    from serve_apps.backends.base import BackendConfig

    config = LabelerConfig(
        task="digits",
        backend=BackendConfig(kind="transformers", model=str(tiny_qwen2_vl), batch_size=16),
        app_name="test-digits-labeler",
        route_prefix="/test-digits-labeler",
        num_cpus=0.5,
        max_batch_size=16,
    )
    url = run_labeler(config)
    yield url
    stop_labeler("test-digits-labeler")


def rows_written_by_label_commits(uri: str, column: str = "label") -> int:
    """Sum of the rows every commit of ``column`` wrote (the audit that shows nothing was written twice)."""
    from ray_jobs.label import label_commits

    return sum(int(v.properties.get("lancetag.rows", 0)) for v in label_commits(uri, column))

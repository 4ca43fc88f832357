"""Where and how a ``vllm`` backend runs: its typed options and the Ray runtime env of its replica.

Driver-side and light (no vLLM import): the driver in ``.venv`` calls :func:`vllm_runtime_env` to
start the labeler's replica with the vLLM environment's interpreter (``.venv-vllm/bin/python``
next to the repo, ``options.python_executable``, ``$LANCETAG_VLLM_PYTHON``) or, on a cluster,
in the vLLM container image (``options.image_uri``). See ``docs/vllm.md``.

Example::

    config = BackendConfig(kind="vllm", model="/models/qwen2-vl", options={"closed_set": "score"})
    LabelerConfig(task="hotel", backend=config, runtime_env=vllm_runtime_env(config))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lance_io.reasons import first_problem
from serve_apps.backends.base import BackendConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON_ENV = "LANCETAG_VLLM_PYTHON"
"""Environment variable naming the vLLM environment's interpreter (overrides the default)."""

ClosedSetMode = Literal["score", "constrained"]

# Passed on to the replica when set in the driver: offline mode and CPU engine sizing.
_FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
)


class VllmOptions(BaseModel):
    """The vLLM backend's settings, read from ``BackendConfig.options`` (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    closed_set: ClosedSetMode = Field(
        "score", description="score: candidate likelihoods; constrained: guided decoding"
    )
    max_model_len: int = Field(4096, ge=64, description="Longest prompt + answer, in tokens")
    max_images_per_prompt: int = Field(4, ge=1, description="Images one chat turn may carry")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU only: share of memory vLLM takes")
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool | None = Field(
        None, description="Skip CUDA graphs; default: True on CPU, False on GPU"
    )
    enable_lora: bool = Field(False, description="Allow adapters per call even when none is configured")
    max_lora_rank: int | None = Field(
        None, ge=1, description="Default: the configured adapter's rank, else 64"
    )
    max_loras: int = Field(2, ge=1, description="Adapters active in one batch")
    seed: int = 0
    cpu_kvcache_space_gib: int = Field(
        1, ge=1, description="CPU only: KV cache size (VLLM_CPU_KVCACHE_SPACE)"
    )
    multiprocessing: bool = Field(
        False,
        description="Run the engine core in its own process (vLLM's default); off: in the replica, faster start",
    )
    python_executable: str | None = Field(
        None,
        description="Interpreter of the vLLM environment for the replica; default: .venv-vllm next to the repo",
    )
    image_uri: str | None = Field(
        None, description="Container image for the replica on a cluster (the vLLM image)"
    )
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Passed to vllm.LLM as they are")


def vllm_options(config: BackendConfig) -> VllmOptions:
    """Return the typed vLLM options of ``config``; raise ValueError naming the bad option."""
    try:
        return VllmOptions.model_validate(config.options)
    except ValidationError as exc:
        raise ValueError(f"options.{first_problem(exc, '')} (vllm backend)") from None


def default_vllm_python() -> Path | None:
    """Return the vLLM environment's interpreter: ``$LANCETAG_VLLM_PYTHON``, else ``.venv-vllm`` next to the repo."""
    if os.environ.get(VLLM_PYTHON_ENV):
        return Path(os.environ[VLLM_PYTHON_ENV])
    candidate = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    return candidate if candidate.exists() else None


def vllm_runtime_env(config: BackendConfig) -> dict[str, Any]:
    """Return the Ray ``runtime_env`` that runs a vllm-backend replica in the vLLM environment.

    ``options.image_uri`` (a cluster's vLLM container image) wins; else the replica's interpreter is
    ``options.python_executable``, ``$LANCETAG_VLLM_PYTHON`` or ``.venv-vllm/bin/python`` next to the
    repo; when none exists the replica uses the driver's interpreter (one environment with vLLM).
    """
    options = vllm_options(config)
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env_vars.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kvcache_space_gib))
    env_vars["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if options.multiprocessing else "0"
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if options.image_uri:
        runtime_env["image_uri"] = options.image_uri
        return runtime_env
    python = Path(options.python_executable) if options.python_executable else default_vllm_python()
    if python is not None:
        if not python.exists():
            raise ValueError(
                f"options.python_executable: {python} does not exist; run `scripts/setup.sh vllm` "
                f"or point {VLLM_PYTHON_ENV} at the vLLM environment's python"
            )
        runtime_env["py_executable"] = str(python)
    return runtime_env

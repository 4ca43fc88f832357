"""Application builder for `serve deploy`: a Serve config names ``serve_apps.deploy:app`` and its args.

The args are a :class:`~serve_apps.app.LabelerConfig` (task, backend, limits). Replicas,
autoscaling, GPUs and the runtime environment (the vLLM image) are set per deployment in the
Serve config, as Serve expects; see ``configs/serve/*.yaml``.

    serve deploy configs/serve/labeler-vllm-gpu.yaml
"""

from __future__ import annotations

from typing import Any

from serve_apps.app import LabelerConfig, build_app, token_sha256


def app(args: dict[str, Any]) -> Any:
    """Return the labeler application for the Serve config's ``args``."""
    config = LabelerConfig.model_validate(args)
    return build_app(config, token_sha256=token_sha256(config.token_env))

"""Application builder for `serve deploy`: a Serve config names ``serve_apps.deploy:app`` and its args.

The args are a :class:`~serve_apps.app.LabelerConfig` (task, backend, limits). Replicas,
autoscaling, GPUs and the runtime environment (the vLLM image) are set per deployment in the
Serve config, as Serve expects; see ``configs/serve/*.yaml``.

    serve deploy configs/serve/labeler-vllm-gpu.yaml
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from serve_apps.app import LabelerConfig, build_app


def app(args: dict[str, Any]) -> Any:
    """Return the labeler application for the Serve config's ``args``."""
    config = LabelerConfig.model_validate(args)
    token_hash = None
    if config.token_env:
        token = os.environ.get(config.token_env)
        if not token:
            raise ValueError(f"token_env: environment variable {config.token_env} is not set in the Serve controller")
        token_hash = hashlib.sha256(token.encode()).hexdigest()
    return build_app(config, token_sha256=token_hash)

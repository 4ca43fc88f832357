"""The ``lancetag:`` block of a training YAML and reading a training config.

LLaMA-Factory never sees the block: :func:`load_config` splits it off and validates it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from lance_io.reasons import ReasonError
from llamafactory_ext.augment import ImageAugment
from llamafactory_ext.validation import ValidationOptions


class TrainConfigError(ReasonError):
    """A training config that cannot run; ``reason`` is a stable code."""


class RunOptions(BaseModel):
    """The ``lancetag:`` block of a training YAML: where to run (Ray Train), augmentation, validation.

    CLI flags override it.
    """

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(0, ge=0, description="Ray Train workers; 0 runs in this process without Ray")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker (0: CPU workers, gloo)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs per worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    storage: str | None = Field(None, description="Ray Train storage path for checkpoints (local or s3://)")
    name: str | None = Field(None, description="Ray Train run name (default: output folder name)")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts on failure (-1: unlimited)")
    checkpoints_to_keep: int | None = Field(None, ge=1, description="Checkpoints kept in storage")
    augment: ImageAugment | None = Field(None, description="Random affine jitter of training images")
    validation: ValidationOptions | None = Field(
        None, description="Hold back rows, score the task on them, keep the best weights, stop on a plateau"
    )


def load_config(config: str | Path | dict[str, Any]) -> tuple[dict[str, Any], RunOptions]:
    """Return (LLaMA-Factory args, run options) from a YAML path or dict."""
    if isinstance(config, str | Path) and not Path(config).is_file():
        raise TrainConfigError(
            "config_not_found", f"no training config at {config}; see configs/train/ for examples"
        )
    data = yaml.safe_load(Path(config).read_text()) if isinstance(config, str | Path) else dict(config)
    if not isinstance(data, dict):
        raise TrainConfigError(
            "config_not_mapping", f"{config} must be a YAML mapping of LLaMA-Factory arguments"
        )
    try:
        options = RunOptions.model_validate(data.pop("lancetag", None) or {})
    except ValueError as err:
        raise TrainConfigError("bad_lancetag_block", f"{config}: {err}") from err
    if isinstance(config, str | Path) and isinstance(data.get("deepspeed"), str):
        beside = Path(config).parent / data["deepspeed"]  # paths in a config are relative to it first
        if not Path(data["deepspeed"]).exists() and beside.exists():
            data["deepspeed"] = str(beside)
    return data, options

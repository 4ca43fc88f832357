"""The ``lancetag:`` block of a training YAML and reading a training config.

LLaMA-Factory never sees the block: :func:`load_config` splits it off and validates it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from lance_io.reasons import ReasonError
from llamafactory_ext.augment import ImageAugment
from llamafactory_ext.source import dataset_names
from llamafactory_ext.validation import ValidationOptions
from llamafactory_ext.vision_warmup import VisionWarmup


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
    vision_warmup: VisionWarmup | None = Field(
        None, description="Train a from-scratch vision tower as a classifier of the training rows first"
    )


def load_config(config: str | Path | dict[str, Any]) -> tuple[dict[str, Any], RunOptions]:
    """Return (LLaMA-Factory args, run options) from a YAML path or dict."""
    if isinstance(config, str | Path) and not Path(config).is_file():
        raise TrainConfigError(
            "config_not_found", f"no training config at {config}; see configs/train/ for examples"
        )
    try:
        data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) if isinstance(config, str | Path) else dict(config)
    except UnicodeDecodeError as exc:
        raise TrainConfigError("bad_yaml", f"{config} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
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


def check_datasets_and_template(args: dict[str, Any]) -> None:
    """Refuse, before any work, datasets ``args`` names that its ``dataset_dir`` does not define
    (``dataset_not_found``) and a template LLaMA-Factory does not have (``bad_training_config``).

    Both through LLaMA-Factory's own lookups (``get_dataset_list``, ``TEMPLATES``), which read files
    and tables only: safe on a driver without the workers' GPUs.
    """
    import difflib

    from llamafactory.data.parser import get_dataset_list
    from llamafactory.data.template import TEMPLATES

    _check_types(args)  # first: the lookups below take these values as text
    dataset_dir = args.get("dataset_dir", "data")
    for key in ("dataset", "eval_dataset"):
        try:
            get_dataset_list(dataset_names(args.get(key)), dataset_dir)
        except ValueError as err:
            raise TrainConfigError(
                "dataset_not_found", f"{key}: {err} (dataset_dir {dataset_dir}); register a table there with "
                "`lancetag lf register TABLE --name NAME --dataset-dir DIR`"
            ) from err
    template = args.get("template")
    if template is not None and template not in TEMPLATES:
        near = difflib.get_close_matches(str(template), list(TEMPLATES), n=3)
        raise TrainConfigError(
            "bad_training_config", f"template {template!r} is not one of LLaMA-Factory's"
            + (f"; did you mean {', '.join(near)}?" if near else "")
        )


def _check_types(args: dict[str, Any]) -> None:
    """Refuse (``bad_training_config``) a value of the wrong type for a numeric or text LLaMA-Factory
    argument: its parser passes ``learning_rate: abc`` or ``template: [1]`` through, and the run fails
    later, after the model loaded or inside a lookup (``dataset``/``eval_dataset`` may be lists of names)."""
    import typing
    from dataclasses import fields

    from llamafactory.hparams.parser import _TRAIN_ARGS

    for cls in _TRAIN_ARGS:
        hints = typing.get_type_hints(cls)
        for field in fields(cls):
            if field.name not in args:
                continue
            hint = hints.get(field.name)
            value = args[field.name]
            if value is None and type(None) in typing.get_args(hint):
                continue
            allowed = {t for t in (hint, *typing.get_args(hint)) if t in (int, float)}
            if (set(typing.get_args(hint)) or {hint}) - {type(None)} == {str} and not isinstance(value, str):
                names = field.name in ("dataset", "eval_dataset") and isinstance(value, list)
                if not (names and all(isinstance(v, str) for v in value)):
                    raise TrainConfigError("bad_training_config", f"{field.name} must be text, not {value!r}")
            if not allowed:
                continue
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or (float not in allowed and not isinstance(value, int)):
                kind = "a number" if float in allowed else "an integer"
                hint = ""
                if isinstance(value, str):
                    with contextlib.suppress(ValueError):
                        hint = f" (YAML reads {value} as text: write {float(value):.1e})"
                raise TrainConfigError("bad_training_config", f"{field.name} must be {kind}, not {value!r}{hint}")

"""`lancetag lf ...`, `lancetag train` and `lancetag webui`: LLaMA-Factory on Lance tables.

Heavy imports (LLaMA-Factory, torch, Ray) happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ray_jobs.cli.output import JsonFlag, emit_json, key_values

SiteDir = Annotated[Path | None, typer.Option(help="site-packages folder (default: this environment's)")]

lf_app = typer.Typer(
    help="LLaMA-Factory extension: register Lance tables as datasets, install the loader hook.",
    no_args_is_help=True,
)


@lf_app.command("register")
def register_command(
    table: Annotated[str, typer.Argument(help="Lance table URI")],
    name: Annotated[str, typer.Option(help="Dataset name in dataset_info.json")],
    dataset_dir: Annotated[Path, typer.Option(help="LLaMA-Factory dataset_dir holding dataset_info.json")],
    version: Annotated[
        str | None, typer.Option(help="Version number or tag (default: pin the latest)")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task name or YAML the messages follow")] = None,
    where: Annotated[str | None, typer.Option(help="SQL filter on table columns")] = None,
    label_column: Annotated[str | None, typer.Option(help="Label column to build messages from")] = None,
    messages_column: Annotated[str | None, typer.Option(help="Column of ready sharegpt messages")] = None,
    split: Annotated[str, typer.Option(help="train, validation or all (id-hash split)")] = "all",
    val_fraction: Annotated[float, typer.Option(help="Share of ids in the validation split")] = 0.1,
    num_samples: Annotated[
        int | None, typer.Option(min=1, help="LLaMA-Factory num_samples: sample/repeat rows")
    ] = None,
    storage_option: Annotated[
        list[str] | None,
        typer.Option(help="Lance storage option read from an env var at load time: KEY=ENV_VAR (repeatable)"),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Write or update a dataset_info.json entry that reads TABLE (pinned to a version) from Lance."""
    from lance_io.reasons import ReasonError
    from llamafactory_ext.register import register_dataset

    if split not in ("train", "validation", "all"):
        raise ReasonError("bad_split", f"--split must be train, validation or all, not {split!r}")
    storage_options_env = key_values(storage_option, "--storage-option", "KEY=ENV_VAR", "bad_storage_option")
    result = register_dataset(
        table,
        name,
        dataset_dir,
        version=version,
        task=task,
        where=where,
        label_column=label_column,
        messages_column=messages_column,
        split=split,  # type: ignore[arg-type]
        val_fraction=val_fraction,
        num_samples=num_samples,
        storage_options_env=storage_options_env,
    )
    if as_json:
        emit_json(result.as_dict())
    else:
        pinned = f"tag {result.tag}" if result.tag else f"version {result.version}"
        typer.echo(f"registered {name}: {table} @ {pinned}, {result.rows} rows -> {result.dataset_info}")


@lf_app.command("samples-from-labels")
def samples_from_labels_command(
    table: Annotated[str, typer.Argument(help="Lance table URI")],
    label_column: Annotated[str, typer.Option(help="Label column (prefix) whose answers become samples")],
    task: Annotated[str | None, typer.Option(help="Task name or YAML (default: classify over the labels)")] = None,
    where: Annotated[str | None, typer.Option(help="SQL filter on table columns")] = None,
    version: Annotated[str | None, typer.Option(help="Version number or tag (default: latest)")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Write the chats a label column teaches into TABLE's samples, beside human-written ones (one training path)."""
    from lance_io.samples import label_samples
    from lance_io.scan import parse_version
    from lance_io.storage import resolve_storage_options
    from llamafactory_ext.reader import resolve
    from llamafactory_ext.source import LanceSource

    ref = parse_version(version)
    source = LanceSource(
        uri=table, label_column=label_column, task=task, where=where,
        version=ref if isinstance(ref, int) else None, tag=ref if isinstance(ref, str) else None,
    )
    result = label_samples(
        table, resolve(source).load_task(), label_column, version=ref, where=where,
        storage_options=resolve_storage_options(table),
    )
    if as_json:
        emit_json(result)
    else:
        typer.echo(
            f"{result.source}: {result.samples} samples (+{result.added}, -{result.removed}), "
            f"skipped {result.skipped or 'none'} -> samples version {result.version}"
        )


@lf_app.command("install-hook")
def install_hook(
    site_dir: SiteDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Make every LLaMA-Factory process of this environment load Lance entries (a .pth file)."""
    from llamafactory_ext.hook import ENV_SWITCH, install_pth

    path = install_pth(site_dir)
    if as_json:
        emit_json({"pth": str(path)})
    else:
        typer.echo(
            f"installed {path}; `llamafactory-cli` now loads Lance entries ({ENV_SWITCH}=0 turns it off)"
        )


@lf_app.command("uninstall-hook")
def uninstall_hook(
    site_dir: SiteDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Remove the .pth file written by install-hook."""
    from llamafactory_ext.hook import uninstall_pth

    removed = uninstall_pth(site_dir)
    if as_json:
        emit_json({"removed": removed})
    else:
        typer.echo("removed" if removed else "not installed")


@lf_app.command("hook-path")
def hook_path(as_json: JsonFlag = False) -> None:
    """Print a PYTHONPATH entry that activates the extension for one process tree."""
    from llamafactory_ext.hook import SITE_DIR

    emit_json({"path": str(SITE_DIR)}) if as_json else typer.echo(str(SITE_DIR))


@lf_app.command("list")
def list_entries(
    dataset_dir: Annotated[Path, typer.Option(help="LLaMA-Factory dataset_dir")],
    as_json: JsonFlag = False,
) -> None:
    """List the Lance entries of a dataset_info.json with their pinned versions."""
    from llamafactory_ext.source import lance_entries

    entries = {
        n: s.model_dump(mode="json", exclude={"task_config"}) for n, s in lance_entries(dataset_dir).items()
    }
    if as_json:
        emit_json({"datasets": entries})
        return
    for name, src in entries.items():
        ref = f"tag {src['tag']}" if src.get("tag") else f"version {src.get('version')}"
        typer.echo(f"{name}: {src['uri']} @ {ref} where={src.get('where')} split={src['split']}")


def train(
    config: Annotated[Path, typer.Argument(help="LLaMA-Factory training YAML (optional `lancetag:` block)")],
    workers: Annotated[int | None, typer.Option(help="Ray Train workers (0: this process, no Ray)")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option(help="GPUs per Ray Train worker")] = None,
    storage: Annotated[str | None, typer.Option(help="Ray Train storage path for checkpoints")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: --set max_steps=10 (YAML value)")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Fine-tune with LLaMA-Factory from Lance tables (pinned versions), locally or on Ray Train."""
    import yaml

    from llamafactory_ext.run_options import load_config
    from llamafactory_ext.train import run_training
    from ray_jobs.evaluation.in_training import transformers_labeler
    from ray_jobs.ray_session import require_ray_at

    overrides = {k: yaml.safe_load(v) for k, v in key_values(set_, "--set", "key=value", "bad_override").items()}
    address = os.environ.get("RAY_ADDRESS")
    if address and (workers if workers is not None else load_config(config)[1].workers) > 0:
        require_ray_at(address)  # Ray Train's workers join it: ray.init would wait for ever on a cluster that is down
    result = run_training(config, workers=workers, gpus_per_worker=gpus_per_worker, storage=storage, overrides=overrides,
                          labeler=transformers_labeler)  # scores a `validation` block's rows with the labeler's code
    if as_json:
        emit_json(result.as_dict())
    else:
        typer.echo(
            f"trained in {result.seconds:.0f} s on {result.workers or 'no'} Ray workers: "
            f"loss {result.train_loss}, output {result.output_dir}, lineage {result.lineage_path}"
        )


def webui(
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 7860,
    dataset_dir: Annotated[
        Path | None,
        typer.Option(
            help="LLaMA-Factory dataset_dir shown in the Data dir box (LlamaBoard's default: ./data)"
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run LlamaBoard with Lance datasets listed, previewed and trainable (from .venv-webui)."""
    from llamafactory.extras.packages import is_gradio_available

    from lance_io.reasons import ReasonError
    from llamafactory_ext.webui import launch

    if not is_gradio_available():  # checked before the URL is announced: --json prints one object
        raise ReasonError(
            "gradio_missing",
            "the web UI needs gradio, which conflicts with Ray Serve in .venv; set up .venv-webui "
            "(`scripts/setup.sh webui`) and run `.venv-webui/bin/lancetag webui`",
        )
    if as_json:
        emit_json({"url": f"http://{host}:{port}"})
    launch(host=host, port=port, dataset_dir=str(dataset_dir) if dataset_dir else None)


def register(app: typer.Typer) -> None:
    """Add `lf`, `train` and `webui` to the CLI."""
    app.add_typer(lf_app, name="lf")
    app.command("train")(train)
    app.command("webui")(webui)

"""Training from Lance through `lancetag train` / run_training (Ray Train workers) and plain llamafactory-cli."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.data import digit_images, write_table
from tests.conftest import LANCETAG, REPO_ROOT

TINY_CONFIG = REPO_ROOT / "configs" / "train" / "tiny_qwen2_vl_cpu.yaml"


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Path:
    """A dataset_dir with `digits` registered from a 16-row, 2-fragment Lance table."""
    from llamafactory_ext.register import register_dataset

    root = tmp_path_factory.mktemp("lf-train")
    write_table(root / "digits.lance", digit_images(16), rows_per_file=8)
    register_dataset(str(root / "digits.lance"), "digits", root / "data")
    return root / "data"


def _losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "trainer_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def _assert_adapter_with_lineage(output_dir: Path, version: int = 1) -> dict:
    assert (output_dir / "adapter_model.safetensors").is_file()
    lineage = json.loads((output_dir / "lancetag_lineage.json").read_text())
    (record,) = lineage["datasets"]
    assert record["version"] == version and record["uri"].endswith("digits.lance")
    losses = _losses(output_dir)
    assert losses and all(math.isfinite(x) for x in losses)
    return lineage


@pytest.mark.slow
@pytest.mark.long  # Ray Train on two workers stays in the default run: test_validation_training's rank-0 test
def test_lancetag_train_cli_on_two_ray_workers_saves_adapter_lineage_and_checkpoint(
    ray_cluster, registered, tiny_qwen2_vl, tmp_path
):
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    out = tmp_path / "qwen-2w"
    cmd = [
        LANCETAG,
        "train",
        str(TINY_CONFIG),
        "--workers",
        "2",
        "--storage",
        str(tmp_path / "ray"),
        "--json",
    ]
    for key, value in {
        "model_name_or_path": tiny_qwen2_vl,
        "dataset_dir": registered,
        "output_dir": out,
        "max_steps": 2,
        "save_strategy": "steps",
        "save_steps": 1,
    }.items():
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["workers"] == 2 and math.isfinite(result["train_loss"])
    lineage = _assert_adapter_with_lineage(out)
    assert lineage["workers"] == 2
    (node,) = [n["NodeID"] for n in ray_cluster.nodes() if n["Alive"]]
    assert result["nodes"] == lineage["nodes"] == {node: 2}, "both workers on the one local node, recorded"
    # two ranks of batch 2 over 16 rows: 4 rows per step
    assert json.loads((out / "trainer_state.json").read_text())["epoch"] == pytest.approx(0.5)
    final = Path(result["checkpoint"])
    assert (final / "adapter_model.safetensors").is_file() and final.is_relative_to(tmp_path / "ray")
    assert json.loads((final / "lancetag_lineage.json").read_text())["datasets"][0]["version"] == 1
    assert len(list((tmp_path / "ray").rglob("checkpoint-2"))) == 1  # an HF checkpoint reported to storage


@pytest.mark.slow
@pytest.mark.long
def test_run_training_tiny_llava_next_on_one_ray_worker(ray_cluster, registered, tiny_llava_next, tmp_path):
    import yaml

    from llamafactory_ext.train import run_training

    out = tmp_path / "llava-1w"
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["lancetag"]["augment"] = {"rotate_degrees": 10, "shift": 0.1}  # installed in the worker
    result = run_training(
        config,
        workers=1,
        storage=str(tmp_path / "ray"),
        overrides={
            "model_name_or_path": str(tiny_llava_next),
            "template": "llava_next",
            "dataset_dir": str(registered),
            "output_dir": str(out),
            "max_steps": 2,
        },
    )
    assert result.workers == 1 and math.isfinite(result.train_loss)
    lineage = _assert_adapter_with_lineage(out)
    assert lineage["augment"] == {"rotate_degrees": 10, "scale": 0.0, "shift": 0.1, "fill": 0, "flip": False}


@pytest.mark.slow
@pytest.mark.long
def test_webui_training_subprocess_environment_makes_plain_llamafactory_cli_load_lance(
    registered, tiny_qwen2_vl, tmp_path
):
    import yaml

    from llamafactory_ext.webui import subprocess_environment

    args = yaml.safe_load(TINY_CONFIG.read_text())
    args.pop("lancetag")
    args.update(
        model_name_or_path=str(tiny_qwen2_vl),
        dataset_dir=str(registered),
        output_dir=str(tmp_path / "o"),
        max_steps=1,
    )
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(args))
    env = subprocess_environment(dict(os.environ))  # what `lancetag webui` gives LlamaBoard's Popen
    cli = ["llamafactory-cli", "train", str(config)]  # as LlamaBoard runs it: found on PATH
    proc = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()

    env["LANCETAG_LF_EXTENSION"] = "0"  # opted out: stock LLaMA-Factory says what is missing
    proc = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "needs the lancetag LLaMA-Factory extension" in proc.stderr + proc.stdout


def test_install_hook_writes_a_pth_that_activates_on_loader_import(tmp_path):
    proc = subprocess.run(
        [LANCETAG, "lf", "install-hook", "--site-dir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
    )
    pth = Path(json.loads(proc.stdout.strip().splitlines()[-1])["pth"])
    assert pth.parent == tmp_path and pth.read_text().startswith("import llamafactory_ext.hook")
    probe = (
        "import site, sys; site.addsitedir(sys.argv[1]);"
        "assert 'llamafactory' not in sys.modules;"  # nothing heavy imported at start-up
        "import llamafactory.data.loader as m; print(getattr(m._load_single_dataset, '__lancetag_wrapped__', False))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


@pytest.mark.parametrize(
    ("block", "says"),
    [
        ({"gpus_per_worker": 1}, "1 worker of CPU 1, GPU 1 (PACK)"),  # a GPU config on this CPU machine
        ({"cpus_per_worker": 64}, "1 worker of CPU 64 (PACK)"),
        ({"workers": 2, "cpus_per_worker": 3, "placement_strategy": "STRICT_SPREAD"}, "2 workers of CPU 3 (STRICT_SPREAD)"),
    ],
)
def test_lancetag_train_refuses_workers_no_node_of_the_cluster_holds_instead_of_waiting(
    ray_cluster, registered, tiny_qwen2_vl, tmp_path, block, says
):
    import yaml

    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["lancetag"].update({"workers": 1, **block})
    out = tmp_path / "never"
    config.update(model_name_or_path=str(tiny_qwen2_vl), dataset_dir=str(registered), output_dir=str(out))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    proc = subprocess.run([LANCETAG, "train", str(tmp_path / "train.yaml")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: resources_unavailable: the run asks ") and says in line, line
    assert "(1 node of CPU 4" in line, "what the cluster's one node has"
    assert not out.exists(), "refused before anything was pinned or trained"

"""Dockerfiles lint clean and take their versions from the project's pins; Serve configs are valid."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


def pinned(lock: Path, package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==([^\s\\]+)", lock.read_text(), re.M)
    assert match, f"{package} is not pinned in {lock.name}"
    return match.group(1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_versions_come_from_the_locks(dockerfile):
    text = dockerfile.read_text()
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", text, re.M)
    assert base, "images start from Ray's official images"
    locks = re.findall(r"requirements/([\w-]+\.lock)", text)
    assert locks, "dependencies are installed from a lock file"
    for lock in set(locks):
        assert base.group(1) == pinned(REPO / "requirements" / lock, "ray"), f"Ray in FROM differs from {lock}"
    assert f"{base.group(2)}.{base.group(3)}" == "3.11"
    assert "--require-hashes" in text


def test_each_image_installs_what_it_is_for():
    text = {p.name: p.read_text() for p in DOCKERFILES}
    assert "vllm-gpu.lock" in text["Dockerfile.label"] and "-gpu" in text["Dockerfile.label"].splitlines()[2]
    assert "train-gpu.lock" in text["Dockerfile.train"]
    assert "deepspeed==" in (REPO / "requirements" / "train-gpu.lock").read_text()
    assert "llamafactory==" in (REPO / "requirements" / "train-gpu.lock").read_text()
    assert "vllm==" in (REPO / "requirements" / "vllm-gpu.lock").read_text()


def test_ray_is_the_same_version_in_every_environment_that_has_ray():
    locks = [lock for lock in (REPO / "requirements").glob("*.lock") if lock.name != "webui.lock"]
    versions = {lock.name: pinned(lock, "ray") for lock in locks}
    assert len(set(versions.values())) == 1, versions
    assert not re.search(r"^ray==", (REPO / "requirements" / "webui.lock").read_text(), re.M), (
        "the web UI environment runs no Ray: if it needs Ray now, pin the same version and drop this exception"
    )


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "serve").glob("*.yaml")), ids=lambda p: p.name)
def test_serve_deploy_configs_are_valid_serve_schemas(config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(config.read_text()))
    app = schema.applications[0]
    assert app.import_path == "serve_apps.deploy:app"
    assert app.args["task"] and app.args["backend"]["model"]
    labeler = app.deployments[0]
    assert labeler.name == "Labeler"

"""`lancetag submit`: ingest and label an s3:// table as Ray Jobs on a real local head."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess

import pytest
from PIL import Image

from lance_io import open_table
from tests.conftest import LANCETAG

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.s3]


CLIENT_PORT = None  # the head's Ray Client server, set by ``head``


@pytest.fixture(scope="module")
def head():
    """The head's jobs address; its Ray Client address is ``ray://127.0.0.1:{CLIENT_PORT}``."""
    global CLIENT_PORT
    from tests.ray_head import free_port, ray_head

    CLIENT_PORT = free_port()
    with ray_head(client_port=CLIENT_PORT) as address:
        yield address


def test_jobs_submitted_to_a_head_ingest_and_label_an_s3_table_readable_locally(head, s3, tiny_qwen2_vl, tmp_path):
    photos = tmp_path / "photos"
    for digit in ("3", "7"):
        (photos / digit).mkdir(parents=True)
        for k in range(3):
            buffer = io.BytesIO()
            Image.new("L", (56, 56), 30 * k + int(digit) * 10).save(buffer, format="PNG")  # 6 distinct images
            (photos / digit / f"{k}.png").write_bytes(buffer.getvalue())
    uri = s3.uri("submitted.lance")
    env = {**os.environ, "LANCETAG_STORAGE_OPTIONS": json.dumps(s3.storage_options)}

    def submit(*args: str) -> dict:
        proc = subprocess.run(
            [LANCETAG, "submit", "--address", head, "--env", "LANCETAG_STORAGE_OPTIONS", "--wait", "--json", "--", *args],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert s3.storage_options["aws_secret_access_key"] not in proc.stdout + proc.stderr, "a secret was printed"
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    ingested = submit("ingest", str(photos), "--table", uri, "--label-from-dir", "--json")
    assert ingested["status"] == "SUCCEEDED"
    labeled = submit("label", uri, "--task", "digits", "--model", str(tiny_qwen2_vl), "--json")
    assert labeled["status"] == "SUCCEEDED"

    table = open_table(uri, storage_options=s3.storage_options).to_table(columns=["truth", "label", "label_provenance"])
    assert table.num_rows == 6 and set(table["truth"].to_pylist()) == {"3", "7"}
    assert table["label"].null_count == 0
    from lance_io.versions import list_versions

    history = repr(list_versions(uri, storage_options=s3.storage_options))
    assert "lancetag.job" in history and s3.storage_options["aws_secret_access_key"] not in history, "no secret in versions"
    logs = subprocess.run([LANCETAG, "jobs", "logs", labeled["job_id"], "--address", head], capture_output=True, text=True, check=True)
    assert s3.storage_options["aws_secret_access_key"] not in logs.stdout
    status = subprocess.run([LANCETAG, "jobs", "status", labeled["job_id"], "--address", head], capture_output=True, text=True, check=True)
    assert status.stdout.strip() == "SUCCEEDED"


def test_through_a_ray_client_address_serve_deploys_and_ray_data_jobs_are_refused(head, tmp_path):
    """``ray://`` (as KubeRay hands out) carries a Serve deployment; an ingest would fail inside Ray
    Data (``'Worker' object has no attribute 'core_worker'``), so it is refused before it starts."""
    import httpx

    from tests.ray_head import free_port

    env = {**os.environ, "RAY_ADDRESS": f"ray://127.0.0.1:{CLIENT_PORT}"}
    serve = [LANCETAG, "serve", "--task", "digits", "--model", "m", "--backend", "openai", "--base-url",
             "http://127.0.0.1:9/v1", "--port", str(free_port()), "--app-name", "through-client",
             "--no-blocking", "--json"]
    proc = subprocess.run(serve, capture_output=True, text=True, env=env, timeout=300)
    if "Starting Ray client server failed" in proc.stderr:  # Ray's own start-up race (1 run in 5 here): once more
        proc = subprocess.run(serve, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    url = json.loads(proc.stdout)["url"]  # where Serve listens: the port of whoever started it on the cluster first
    assert httpx.get(f"{url}/info", timeout=10).json()["task"]["name"] == "digits"

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("L", (8, 8), 7).save(photos / "a.png")
    table = tmp_path / "t.lance"
    proc = subprocess.run([LANCETAG, "ingest", str(photos), "--table", str(table), "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["reason"] == "ray_client_unsupported", proc.stderr
    assert not table.exists()


def test_through_a_ray_client_address_train_runs_on_a_ray_train_worker_of_the_head(head, tiny_qwen2_vl, tmp_path):
    """``train --workers N`` through ``ray://``: Ray Train's workers start on the head's cluster and
    the adapter, lineage and loss come back to the command, as on a cluster joined directly."""
    from bench.data import digit_images, write_table
    from llamafactory_ext.register import register_dataset
    from tests.conftest import REPO_ROOT

    write_table(tmp_path / "digits.lance", digit_images(8), rows_per_file=4)
    register_dataset(str(tmp_path / "digits.lance"), "digits", tmp_path / "data")
    out = tmp_path / "out"
    cmd = [LANCETAG, "train", str(REPO_ROOT / "configs" / "train" / "tiny_qwen2_vl_cpu.yaml"), "--workers", "1",
           "--storage", str(tmp_path / "ray"), "--json"]
    for key, value in {"model_name_or_path": tiny_qwen2_vl, "dataset_dir": tmp_path / "data", "output_dir": out,
                       "max_steps": 2}.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "RAY_ADDRESS": f"ray://127.0.0.1:{CLIENT_PORT}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if "Starting Ray client server failed" in proc.stderr:  # Ray's own start-up race, as above: once more
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["workers"] == 1 and math.isfinite(result["train_loss"])
    assert (out / "adapter_model.safetensors").is_file()
    lineage = json.loads((out / "lancetag_lineage.json").read_text())
    assert lineage["workers"] == 1 and lineage["datasets"][0]["uri"].endswith("digits.lance")


def test_serve_on_a_joined_cluster_whose_proxy_cannot_bind_the_port_is_port_in_use(tmp_path):
    """On a cluster the command joins (RAY_ADDRESS) where Serve is not running yet, Serve's proxy
    fails to bind a port another program holds: one line ``error: port_in_use``, exit 2, not
    ``error: internal: RayTaskError`` (exit 3). A head of its own: Serve must not be running on it."""
    import socket

    from tests.ray_head import free_port, ray_head

    gcs_port = free_port()
    with ray_head(num_cpus=1, gcs_port=gcs_port), socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
        proc = subprocess.run(
            [LANCETAG, "serve", "--task", "digits", "--backend", "random", "--model", "demo", "--port", str(port),
             "--no-blocking", "--json"], capture_output=True, text=True, env=env, timeout=300,
        )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    error = json.loads(proc.stdout)["error"]
    assert error["reason"] == "port_in_use" and f"127.0.0.1:{port}" in error["message"], error

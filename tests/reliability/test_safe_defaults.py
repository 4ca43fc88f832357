"""Safe defaults: loopback binds, no remote code, no unpickling, secrets redacted."""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

from lance_io import open_table, read_errors
from lance_io.storage import redact, resolve_storage_options
from ray_jobs.ingest import IngestOptions, ingest
from tests.conftest import LANCETAG
from tests.ingest_fixtures import HostileServer, image_bytes

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["lance_io", "serve_apps", "ray_jobs", "llamafactory_ext"]


def test_the_labeler_listens_on_loopback_only_unless_told(digits_labeler: str) -> None:
    """The session's labeler runs with the default host: every socket on its port is a loopback one."""
    port = urlsplit(digits_labeler).port
    listening = {
        c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }
    assert listening, f"nothing listens on port {port}"
    assert all(ipaddress.ip_address(ip).is_loopback for ip in listening), listening
    assert httpx.get(f"{digits_labeler}/health", timeout=30).status_code == 200


PROBE_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("the model's own code ran")
from transformers import Qwen2VLConfig


class ProbeConfig(Qwen2VLConfig):
    pass
"""

LOAD_TWICE = """
import json, sys
from serve_apps.backends.base import BackendConfig, create_backend
from pathlib import Path
model, marker = sys.argv[1], Path(sys.argv[2])
outcome = {}
for told in (False, True):
    try:
        backend = create_backend(BackendConfig(kind="transformers", model=model, device="cpu", trust_remote_code=told))
        loaded = type(backend.model).__name__
    except Exception as exc:  # a model whose code ran and then failed still shows the code ran
        loaded = f"error: {exc!r}"[:300]
    outcome["told" if told else "default"] = {"loaded": loaded, "code_ran": marker.exists()}
print(json.dumps(outcome))
"""


def test_a_model_s_own_code_runs_only_when_trust_remote_code_is_set(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    """A model folder shipping Python (``auto_map``) whose import leaves a marker file: default off."""
    model = tmp_path / "model-with-code"
    shutil.copytree(tiny_qwen2_vl, model)
    marker = tmp_path / "code-ran"
    (model / "lancetag_probe.py").write_text(PROBE_MODULE.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "lancetag_probe.ProbeConfig"}
    (model / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", LOAD_TWICE, str(model), str(marker)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["default"] == {"loaded": "Qwen2VLForConditionalGeneration", "code_ran": False}
    assert outcome["told"]["code_ran"] is True


def test_url_ingest_refuses_private_addresses_unless_allowed(ray_cluster, tmp_path: Path) -> None:
    """URL lists naming this machine and private/link-local networks: refused with a reason, nothing
    requested; with ``--allow-private-urls`` (what the refusal says to do) the loopback ones are fetched."""
    with HostileServer() as server:
        loopback = [server.url("/img/1.jpg"), f"http://localhost:{server.port}/img/2.jpg"]
        elsewhere = [
            "http://10.1.2.3/cam.jpg",
            "http://192.168.0.10/cam.jpg",
            "http://169.254.169.254/latest/meta-data/",  # the cloud metadata service
            f"http://[::1]:{server.port}/img/3.jpg",
        ]
        (tmp_path / "private.txt").write_text("\n".join(loopback + elsewhere) + "\n")
        table = str(tmp_path / "urls.lance")
        refused = ingest([str(tmp_path / "private.txt")], table, IngestOptions(progress=False))
        assert refused.reconciled and refused.inputs == 6
        assert (refused.added, refused.errors_by_reason) == (0, {"url_refused": 6})
        assert sum(server.hits.values()) == 0  # refused before any connection
        errors = read_errors(table, job=refused.job).to_pylist()
        assert sorted(e["source"] for e in errors) == sorted(loopback + elsewhere)
        assert all("--allow-private-urls" in e["message"] for e in errors)

        (tmp_path / "loopback.txt").write_text("\n".join(loopback) + "\n")
        address = ray_cluster.get_runtime_context().gcs_address
        run = subprocess.run(
            [LANCETAG, "ingest", str(tmp_path / "loopback.txt"), "--table", table,
             "--allow-private-urls", "--address", address, "--json"],
            capture_output=True, text=True, timeout=180,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        allowed = json.loads(run.stdout.strip().splitlines()[-1])
        assert (allowed["inputs"], allowed["added"], allowed["errors"]) == (2, 2, 0)
        assert server.hits["/img/1.jpg"] == 1 and server.hits["/img/2.jpg"] == 1
    rows = open_table(table).to_table(columns=["source", "image"]).to_pylist()
    assert {r["source"]: r["image"] for r in rows} == {
        loopback[0]: image_bytes(1 + 5000),
        loopback[1]: image_bytes(2 + 5000),
    }


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_no_code_path_unpickles_data_from_tables_or_requests():
    """pickle/dill/joblib loads, torch.load without weights_only, allow_pickle=True: none in our code."""
    offenders = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for call in _calls(ast.parse(path.read_text(), str(path))):
                name = _name(call.func)
                keywords = {k.arg: k.value for k in call.keywords}
                if name.split(".")[-1] in ("loads", "load") and name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle"):
                    offenders.append(f"{path}:{call.lineno} {name}")
                if name.endswith("read_pickle"):
                    offenders.append(f"{path}:{call.lineno} {name}")
                if name == "torch.load":
                    weights_only = keywords.get("weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        offenders.append(f"{path}:{call.lineno} torch.load without weights_only=True")
                allow = keywords.get("allow_pickle")
                if isinstance(allow, ast.Constant) and allow.value is True:
                    offenders.append(f"{path}:{call.lineno} allow_pickle=True")
    assert offenders == []


def test_storage_secrets_are_redacted_for_display(monkeypatch):
    options = {"aws_access_key_id": "AKIA123", "aws_secret_access_key": "s3cr3t", "region": "eu-west-1", "session_token": "t"}
    shown = redact(options)
    assert shown["region"] == "eu-west-1"
    assert "s3cr3t" not in str(shown) and "AKIA123" not in str(shown) and shown["session_token"] == "***"
    monkeypatch.setenv("LANCETAG_STORAGE_OPTIONS", '{"region": "x", "endpoint": "http://127.0.0.1:9"}')
    assert resolve_storage_options("s3://b/t.lance", {"region": "y"}) == {"region": "y", "endpoint": "http://127.0.0.1:9"}
    assert resolve_storage_options("/local/t.lance") is None

"""Safe defaults: loopback binds, no remote code, no unpickling, secrets redacted."""

from __future__ import annotations

import ast
from pathlib import Path

from lance_io.storage import redact, resolve_storage_options

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["lance_io", "serve_apps", "ray_jobs", "llamafactory_ext"]


def test_the_labeler_binds_loopback_and_runs_no_remote_code_unless_told():
    from serve_apps.app import LabelerConfig
    from serve_apps.backends.base import BackendConfig

    config = LabelerConfig(task="hotel", backend=BackendConfig(model="m"))
    assert config.host == "127.0.0.1"
    assert config.backend.trust_remote_code is False
    assert config.token_env is None or isinstance(config.token_env, str)


def test_url_ingest_refuses_private_addresses_unless_allowed():
    from ray_jobs.ingest.options import IngestOptions

    assert IngestOptions().allow_private_urls is False
    assert IngestOptions().allow_outside_root is False


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

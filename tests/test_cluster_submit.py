"""`lancetag submit`: ingest and label an s3:// table as Ray Jobs on a real local head."""

from __future__ import annotations

import io
import json
import os
import subprocess

import pytest
from PIL import Image

from lance_io import open_table
from tests.conftest import LANCETAG

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.s3]


@pytest.fixture(scope="module")
def head():
    from tests.ray_head import ray_head

    with ray_head() as address:
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

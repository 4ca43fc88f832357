"""The object store dies in the middle of an ingest and of a tagging run: no partial version, a rerun completes."""

from __future__ import annotations

import io
import threading
from urllib.parse import urlsplit

import pyarrow as pa
import pytest
from PIL import Image

from lance_io import append_images, ensure_columns, open_table, plan_fragments, write_fragment
from tests.table_fixtures import image_rows
from tests.tcp_proxy import KillableProxy

pytestmark = pytest.mark.s3
OUTPUT = pa.schema([pa.field("label", pa.string())])


@pytest.fixture
def store(s3):
    """S3 storage options that go through a proxy the test can kill, and the proxy."""
    target = urlsplit(s3.endpoint)
    proxy = KillableProxy(target.hostname, target.port)
    proxy.start()
    options = {**s3.storage_options, "endpoint": proxy.endpoint, "client_max_retries": "4", "client_retry_timeout": "5"}
    yield proxy, options
    proxy.kill()


def test_tagging_run_when_the_object_store_dies_then_rerun_completes(s3, store, tmp_path):
    proxy, options = store
    uri = s3.uri(f"tagging-{tmp_path.name}.lance")
    append_images(uri, image_rows(range(48)), storage_options=options, max_rows_per_file=8)
    ensure_columns(uri, OUTPUT, storage_options=options)
    committed_fragments = 0
    outage = True

    def compute(batch: pa.RecordBatch) -> pa.RecordBatch:
        if committed_fragments == 3 and outage:
            proxy.kill()  # the store goes down while this fragment is being computed
        return pa.record_batch([pa.array(["x"] * batch.num_rows)], schema=OUTPUT)

    with pytest.raises(OSError):
        for frag in plan_fragments(uri, "label IS NULL", storage_options=options):
            write_fragment(uri, frag.fragment_id, compute, read_columns=[], output_schema=OUTPUT, todo="label IS NULL",
                           storage_options=options)
            committed_fragments += 1
    outage = False
    proxy.start()
    ds = open_table(uri, storage_options=options)
    assert ds.count_rows() == 48
    assert ds.count_rows(filter="label IS NOT NULL") == 8 * committed_fragments == 24, "no partial fragment is visible"
    for frag in plan_fragments(uri, "label IS NULL", storage_options=options):
        write_fragment(uri, frag.fragment_id, compute, read_columns=[], output_schema=OUTPUT, todo="label IS NULL",
                       storage_options=options)
    assert open_table(uri, storage_options=options).count_rows(filter="label IS NULL") == 0


@pytest.mark.long  # its tagging twin in this file stays in the default run
def test_ingest_when_the_object_store_dies_then_rerun_completes_without_duplicates(ray_cluster, s3, store, tmp_path):
    from ray_jobs.ingest import IngestOptions, ingest

    proxy, options = store
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(120):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (k, 255 - k, (7 * k) % 256)).save(buffer, format="PNG")
        (folder / f"{k:03d}.png").write_bytes(buffer.getvalue())
    uri = s3.uri(f"ingest-{tmp_path.name}.lance")
    append_images(uri, image_rows(range(1)), storage_options=options)  # the table exists before the outage
    ingest_options = IngestOptions(commit_rows=40, progress=False)
    killed_mid_run = False

    def kill_after_first_version() -> None:
        nonlocal killed_mid_run
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if open_table(uri, storage_options=options).count_rows() > 1:
                    proxy.kill()
                    killed_mid_run = True
                    return
            except OSError:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_version)
    watcher.start()
    with pytest.raises(Exception):  # noqa: B017 - any failure is fine; the table must stay valid
        ingest([str(folder)], uri, ingest_options, storage_options=options)
    watcher.join()
    assert killed_mid_run
    proxy.start()
    visible = open_table(uri, storage_options=options).to_table(columns=["id", "image", "size_bytes"])
    partial = visible.num_rows
    assert 1 < partial < 121
    assert len(set(visible["id"].to_pylist())) == partial, "no duplicate from a half-done commit"
    assert [len(b) for b in visible["image"].to_pylist()] == visible["size_bytes"].to_pylist(), "every visible row is whole"

    summary = ingest([str(folder)], uri, ingest_options, storage_options=options)
    assert summary.added == 121 - partial and summary.duplicates == partial - 1
    ids = open_table(uri, storage_options=options).to_table(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 121

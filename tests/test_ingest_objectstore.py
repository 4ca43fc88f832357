"""Object-storage prefixes and tar shards as ingest sources, on a real S3-compatible server (moto on
127.0.0.1): a prefix of 2,000+ objects with every hostile case reconciles (on a moto that enforces
an IAM policy, so one object is really denied); a server that denies everything ends as one
access_denied record; shards and manifests on the server ingest like local ones.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from lance_io import open_table, read_errors
from lance_io.storage import ENV_VAR, boto3_client_kwargs
from lance_io.versions import list_versions
from ray_jobs.ingest import IngestOptions, ingest
from ray_jobs.ingest.sources import SOURCE_KINDS
from ray_jobs.ingest.sources.base import ListedSource
from ray_jobs.ingest.sources.objectstore import object_source
from ray_jobs.ingest.worker import read_object
from tests.ingest_fixtures import apple_double, image_bytes
from tests.s3_server import moto_server
from tests.test_ingest_webdataset import build_shards

pytestmark = pytest.mark.s3
QUIET = {"progress": False}
IMAGES = 2000
DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message><RequestId>1</RequestId></Error>"
)


def _client(s3):
    return boto3.client("s3", **boto3_client_kwargs(s3.storage_options))


def _upload(s3, objects: dict[str, bytes]) -> None:
    client = _client(s3)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=s3.bucket, Key=kv[0], Body=kv[1]), objects.items()))


@dataclass(frozen=True)
class AuthedS3:
    """A moto server that checks credentials: a user may do anything but read ``photos/*/denied-*``."""

    endpoint: str
    bucket: str
    storage_options: dict[str, str]

    def uri(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"


@pytest.fixture(scope="module")
def authed_s3() -> Iterator[AuthedS3]:
    """moto with IAM enforced after the 4 setup calls (bucket, user, policy, key), on 127.0.0.1."""
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    with moto_server(env) as endpoint:
        setup = {"endpoint_url": endpoint, "aws_access_key_id": "setup", "aws_secret_access_key": "setup",
                 "region_name": "us-east-1"}
        boto3.client("s3", **setup).create_bucket(Bucket="guarded")
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="ingest")
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::guarded/photos/*/denied-*"},
        ]}
        iam.put_user_policy(UserName="ingest", PolicyName="no-denied", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="ingest")["AccessKey"]
        yield AuthedS3(endpoint, "guarded", {
            "endpoint": endpoint, "aws_access_key_id": key["AccessKeyId"],
            "aws_secret_access_key": key["SecretAccessKey"], "region": "us-east-1", "allow_http": "true",
        })


@pytest.fixture
def denying_endpoint() -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that answers every S3 request with 403 AccessDenied."""

    class Deny(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _deny(self) -> None:
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(DENIED)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(DENIED)

        do_GET = do_HEAD = do_PUT = do_POST = _deny

    server = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_prefix_of_2000_objects_with_every_hostile_case_reconciles(ray_cluster, authed_s3, monkeypatch) -> None:
    s3 = authed_s3
    prefix = f"s3://{s3.bucket}/photos/"
    objects = {f"photos/{'ab'[n % 2]}/{n:05d}.png": image_bytes(n, "PNG", size=(8, 8)) for n in range(IMAGES)}
    objects |= {f"photos/a/copy-{n}.png": objects[f"photos/a/{n:05d}.png"] for n in (0, 2, 4)}
    objects["photos/b/also-a.png"] = objects["photos/a/00006.png"]  # the same image under another truth
    hostile = {
        "photos/a/empty.jpg": b"",
        "photos/b/": b"",  # a folder marker
        "photos/a/big.png": b"\x89PNG\r\n\x1a\n" + bytes(30_000),
        "photos/b/garbage.jpg": b"these bytes are not an image" * 4,
        "photos/a/notes.txt": b"a scanned object that is no image: skipped, as in a folder",
        "photos/a/._00000.png": apple_double(),  # macOS metadata named like an image: skipped too
        "photos/b/gone.png": image_bytes(99_999, "PNG", size=(8, 8)),  # deleted after listing
        "photos/a/denied-1.png": image_bytes(99_998, "PNG", size=(8, 8)),  # the policy denies reading it
    }
    _upload(s3, objects | hostile)
    monkeypatch.setenv(ENV_VAR, json.dumps(s3.storage_options))

    def deleting_after_listing(location: str, options: IngestOptions) -> ListedSource:
        listed = object_source(location, options)

        def items():
            for item in listed.items():
                if item.source.endswith("/gone.png"):  # listed, now deleted before any worker reads it
                    _client(s3).delete_object(Bucket=s3.bucket, Key="photos/b/gone.png")
                yield item

        return ListedSource(listed.kind, items)

    monkeypatch.setitem(SOURCE_KINDS, "objectstore", deleting_after_listing)
    table = s3.uri("from-prefix.lance")
    options = IngestOptions(label_from_dir=True, max_bytes=20_000, segment_items=700, **QUIET)
    summary = ingest([prefix], table, options, storage_options=s3.storage_options)

    assert summary.reconciled, summary
    assert summary.inputs == len(objects) + len(hostile)
    assert (summary.added, summary.duplicates, summary.skipped) == (IMAGES, 3, 2)
    assert summary.errors_by_reason == {
        "empty_file": 1, "not_a_file": 1, "too_large": 1, "not_an_image": 1, "not_found": 1, "access_denied": 1,
        "truth_conflict": 1,
    }, summary.errors_by_reason
    rows = open_table(table, storage_options=s3.storage_options).to_table(columns=["source", "truth"]).to_pylist()
    assert len(rows) == IMAGES
    assert all(r["truth"] == r["source"].split("/")[-2] for r in rows), "truth is the key's parent prefix"
    errors = read_errors(table, job=summary.job, storage_options=s3.storage_options).to_pylist()
    recorded = {e["source"] for e in errors} | {r["source"] for r in rows}
    listed = {f"s3://{s3.bucket}/{key}" for key in objects | hostile}
    duplicates = {f"s3://{s3.bucket}/photos/a/copy-{n}.png" for n in (0, 2, 4)}
    skipped = {f"s3://{s3.bucket}/photos/a/{name}" for name in ("notes.txt", "._00000.png")}
    assert listed - recorded == duplicates | skipped
    secret = s3.storage_options["aws_secret_access_key"]
    history = repr(list_versions(table, storage_options=s3.storage_options))
    assert secret not in history and not any(secret in e["message"] for e in errors), "no secret stored"


def test_a_prefix_the_server_denies_is_one_access_denied_record(
    ray_cluster, denying_endpoint, monkeypatch, tmp_path: Path
) -> None:
    denied = {"endpoint": denying_endpoint, "aws_access_key_id": "k", "aws_secret_access_key": "s3cr3t-value",
              "region": "us-east-1"}
    monkeypatch.setenv(ENV_VAR, json.dumps(denied))
    table = str(tmp_path / "denied.lance")
    summary = ingest(["s3://private/photos/"], table, IngestOptions(**QUIET))
    assert summary.reconciled and summary.inputs == 1
    assert summary.errors_by_reason == {"access_denied": 1}
    [error] = read_errors(table, job=summary.job).to_pylist()
    assert "s3cr3t-value" not in error["message"] and "credentials" in error["message"]
    result = read_object("s3://private/photos/a.png", 1000, denied)  # what a worker gets for one object
    assert result.reason == "access_denied", result


@pytest.mark.slow
def test_tar_shards_on_object_storage_ingest_like_local_shards(ray_cluster, s3, monkeypatch, tmp_path: Path) -> None:
    expected = build_shards(tmp_path / "shards")
    _upload(s3, {f"wds/{p.name}": p.read_bytes() for p in sorted((tmp_path / "shards").iterdir())})
    monkeypatch.setenv(ENV_VAR, json.dumps(s3.storage_options))
    table = s3.uri("from-shards.lance")
    source = f"s3://{s3.bucket}/wds/shard-{{00000..00003}}.tar"
    summary = ingest([source], table, IngestOptions(**QUIET), storage_options=s3.storage_options)
    assert summary.reconciled, summary
    assert (summary.added, summary.duplicates, summary.skipped) == (
        expected["added"], expected["duplicates"], expected["skipped"]
    )
    assert summary.errors_by_reason == {"corrupt_tar": 2, "truncated": 1, "not_an_image": 1}
    rows = open_table(table, storage_options=s3.storage_options).to_table(columns=["source", "caption"]).to_pylist()
    assert {r["source"].rsplit("#", 1)[1]: r["caption"] for r in rows}["s00012.jpg"] == "caption 12"
    assert all(r["source"].startswith(f"s3://{s3.bucket}/wds/shard-") for r in rows)


def test_a_manifest_on_object_storage_reads_its_relative_keys_and_s3_uris(ray_cluster, s3, monkeypatch) -> None:
    images = {f"man/imgs/{n}.png": image_bytes(500 + n, "PNG", size=(8, 8)) for n in range(4)}
    elsewhere = f"s3://{s3.bucket}/other/x.png"
    rows = ["path,label", *(f"imgs/{n}.png,c{n}" for n in range(4)), f"{elsewhere},cx",
            "../outside.png,c9", "imgs/missing.png,c8"]
    _upload(s3, images | {"other/x.png": image_bytes(600, "PNG", size=(8, 8)),
                          "outside.png": image_bytes(601, "PNG", size=(8, 8)),
                          "man/manifest.csv": "\n".join(rows).encode()})
    monkeypatch.setenv(ENV_VAR, json.dumps(s3.storage_options))
    table = s3.uri("from-manifest.lance")
    summary = ingest([f"s3://{s3.bucket}/man/manifest.csv"], table, IngestOptions(**QUIET),
                     storage_options=s3.storage_options)
    assert summary.reconciled and summary.inputs == 7
    assert summary.added == 5 and summary.errors_by_reason == {"outside_root": 1, "not_found": 1}
    got = open_table(table, storage_options=s3.storage_options).to_table(columns=["source", "truth"]).to_pylist()
    assert {r["source"]: r["truth"] for r in got} == {
        **{f"s3://{s3.bucket}/man/imgs/{n}.png": f"c{n}" for n in range(4)}, elsewhere: "cx"
    }


def test_a_parquet_manifest_on_object_storage_is_streamed_and_reads_its_relative_keys(ray_cluster, s3, monkeypatch) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    images = {f"pq/imgs/{n}.png": image_bytes(700 + n, "PNG", size=(8, 8)) for n in range(5)}
    table_rows = pa.table({"path": [f"imgs/{n}.png" for n in range(5)] + ["imgs/missing.png"],
                           "shop": [f"s{n}" for n in range(6)]})
    buffer = io.BytesIO()
    pq.write_table(table_rows, buffer, row_group_size=2)  # several row groups: read batch by batch
    _upload(s3, images | {"pq/manifest.parquet": buffer.getvalue()})
    monkeypatch.setenv(ENV_VAR, json.dumps(s3.storage_options))
    table = s3.uri("from-parquet.lance")
    summary = ingest([f"s3://{s3.bucket}/pq/manifest.parquet"], table, IngestOptions(**QUIET),
                     storage_options=s3.storage_options)
    assert summary.reconciled and summary.inputs == 6
    assert summary.added == 5 and summary.errors_by_reason == {"not_found": 1}
    got = open_table(table, storage_options=s3.storage_options).to_table(columns=["source", "shop"]).to_pylist()
    assert {r["source"]: r["shop"] for r in got} == {f"s3://{s3.bucket}/pq/imgs/{n}.png": f"s{n}" for n in range(5)}


def test_a_sharegpt_file_on_object_storage_keeps_every_conversation_and_reads_its_images_by_key(
    ray_cluster, s3, monkeypatch
) -> None:
    from lance_io.samples import open_samples

    def chat(question: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": "Yes."}]

    images = {f"chats/imgs/{n}.png": image_bytes(800 + n, "PNG", size=(8, 8)) for n in range(2)}
    elsewhere = f"s3://{s3.bucket}/other/chat.png"
    samples = [
        {"messages": chat("A cat?"), "images": ["imgs/0.png"]},
        {"messages": chat("A dog?"), "images": ["imgs/0.png"]},  # a second conversation about the same image
        {"messages": [{"role": "user", "content": "<image><image>Same?"}, {"role": "assistant", "content": "No."}],
         "images": ["imgs/0.png", "imgs/1.png"]},
        {"messages": chat("From another prefix?"), "images": [elsewhere]},
        {"messages": chat("Out of the prefix?"), "images": ["../outside.png"]},
    ]
    _upload(s3, images | {"other/chat.png": image_bytes(810, "PNG", size=(8, 8)),
                          "outside.png": image_bytes(811, "PNG", size=(8, 8)),
                          "chats/train.json": json.dumps(samples).encode()})
    monkeypatch.setenv(ENV_VAR, json.dumps(s3.storage_options))
    table = s3.uri("from-sharegpt.lance")
    summary = ingest([f"s3://{s3.bucket}/chats/train.json"], table, IngestOptions(**QUIET),
                     storage_options=s3.storage_options)

    assert summary.reconciled and summary.added == 3  # imgs/0, imgs/1 and the other prefix's image, once each
    counts = summary.samples
    assert (counts.samples_in, counts.added, counts.errors) == (5, 4, 1)
    assert summary.errors_by_reason == {"outside_root": 1}
    got = open_samples(table, storage_options=s3.storage_options).to_table(columns=["messages"]).to_pylist()
    assert sorted(s["messages"][0]["content"] for s in got) == sorted(
        ["<image>A cat?", "<image>A dog?", "<image><image>Same?", "<image>From another prefix?"]
    )
    sources = set(open_table(table, storage_options=s3.storage_options).to_table(columns=["source"])["source"].to_pylist())
    assert sources == {f"s3://{s3.bucket}/chats/imgs/0.png", f"s3://{s3.bucket}/chats/imgs/1.png", elsewhere}


def test_a_parquet_file_of_images_on_object_storage_is_listed_and_read_by_the_workers_not_the_driver(ray_cluster, s3, monkeypatch) -> None:
    """The Hugging Face Hub's format: an ``Image`` struct column ``{bytes, path}`` in Parquet shards."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [image_bytes(900 + n, "PNG", size=(96, 96)) for n in range(40)]  # ~27 KB of noise each
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = pa.table({"image": pa.array([{"bytes": b, "path": f"{n}.png"} for n, b in enumerate(images)], struct),
                     "label": [f"c{n % 2}" for n in range(40)]})
    buffer = io.BytesIO()
    pq.write_table(rows, buffer, row_group_size=16)  # three row groups
    _upload(s3, {"hub/train-00000-of-00001.parquet": buffer.getvalue()})
    monkeypatch.setenv(ENV_VAR, json.dumps(s3.storage_options))
    table = s3.uri("from-hub.lance")
    footers: list[str] = []

    class RecordedParquetFile(pq.ParquetFile):  # records this process's footer reads (not the workers')
        def __init__(self, source, *args, **kwargs) -> None:
            footers.append(str(source))
            super().__init__(source, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", RecordedParquetFile)

    summary = ingest([f"s3://{s3.bucket}/hub/train-00000-of-00001.parquet"], table, IngestOptions(**QUIET),
                     storage_options=s3.storage_options)

    assert summary.reconciled and summary.added == 40
    assert 0 < summary.bytes_from_driver < sum(map(len, images)) / 20, summary.bytes_from_driver
    assert footers == [], "the file's footer, which grows with its row groups, is parsed by a Ray task"
    got = open_table(table, storage_options=s3.storage_options).to_table(columns=["source", "image", "truth"]).to_pylist()
    assert {r["source"]: (r["image"], r["truth"]) for r in got} == {f"{n}.png": (b, f"c{n % 2}") for n, b in enumerate(images)}


def test_a_lance_table_on_object_storage_is_a_source_whose_images_the_workers_take(ray_cluster, s3, monkeypatch) -> None:
    import lance

    from lance_io import append_images
    from tests.table_fixtures import image_rows

    rows = image_rows(range(70), padding=20_000)
    first = s3.uri("first.lance")
    append_images(first, rows, storage_options=s3.storage_options)
    monkeypatch.setenv(ENV_VAR, json.dumps(s3.storage_options))
    copy = s3.uri("copy.lance")
    scans: list[str] = []
    scan = lance.LanceDataset.to_batches

    def recorded_scan(self, *args, **kwargs):  # records this process's scans (not the workers')
        scans.append(self.uri)
        return scan(self, *args, **kwargs)

    monkeypatch.setattr(lance.LanceDataset, "to_batches", recorded_scan)

    summary = ingest([f"lance:{first}"], copy, IngestOptions(**QUIET), storage_options=s3.storage_options)

    assert summary.reconciled and summary.added == 70
    assert 0 < summary.bytes_from_driver < sum(rows["size_bytes"].to_pylist()) / 20, summary.bytes_from_driver
    assert not [uri for uri in scans if "first.lance" in uri], "the source table is listed by a Ray task"
    got = open_table(copy, storage_options=s3.storage_options).to_table(columns=["id", "image", "truth"]).to_pylist()
    assert sorted(got, key=lambda r: r["id"]) == sorted(rows.select(["id", "image", "truth"]).to_pylist(), key=lambda r: r["id"])


def test_the_gs_and_az_listing_walks_one_directory_at_a_time_and_finds_what_the_s3_paginator_finds(s3) -> None:
    """gs:// and az:// are listed through pyarrow; run that walk on the S3 server, where boto3 checks it."""
    from lance_io.storage import pyarrow_filesystem
    from ray_jobs.ingest.sources.objectstore import list_objects, walk_files

    tree = {f"walk/{top}/{sub}/{n:03d}.jpg": b"x" * (n + 1) for top in "ab" for sub in ("p", "q", "r") for n in range(40)}
    tree.update({f"walk/{n:03d}.png": b"y" * n for n in range(30)} | {"walk/a/only.gif": b"z"})
    _upload(s3, tree)
    prefix = s3.uri("walk/")
    filesystem, path = pyarrow_filesystem(prefix, s3.storage_options)

    listings: list[tuple[bool, int]] = []

    class Recording:
        def get_file_info(self, selector):
            infos = filesystem.get_file_info(selector)
            listings.append((selector.recursive, len(infos)))
            return infos

    walked = [(f"s3://{p}", size) for p, size in walk_files(Recording(), path.rstrip("/"))]
    paged = list(list_objects(prefix, s3.storage_options))
    assert sorted(walked) == sorted(paged) == sorted((s3.uri(k), len(v)) for k, v in tree.items())
    assert len(walked) == len(set(walked))
    assert not any(recursive for recursive, _ in listings)
    assert max(size for _, size in listings) == 40  # the largest directory, never the 271 keys of the prefix


@pytest.fixture
def recording_endpoint() -> Iterator[tuple[str, list[str], bytes, list[int]]]:
    """An HTTP/1.1 server on 127.0.0.1 that serves one object at any key; records each request's method and client port."""
    body = image_bytes(0, fmt="PNG")
    requests: list[str] = []
    clients: list[int] = []

    class Serve(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client that keeps its connection sends from one port

        def log_message(self, *args: object) -> None:
            pass

        def _serve(self) -> None:
            requests.append(self.command)
            clients.append(self.client_address[1])
            start, end = 0, len(body) - 1
            ranged = self.headers.get("Range", "").removeprefix("bytes=")
            if ranged:
                first, _, last = ranged.partition("-")
                start, end = int(first), min(int(last or end), end)
            part = body[start : end + 1]
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Length", str(len(part)))
            self.send_header("Last-Modified", "Wed, 02 Dec 2026 08:00:00 GMT")
            self.send_header("ETag", '"1"')
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(part)

        do_GET = do_HEAD = _serve

    server = ThreadingHTTPServer(("127.0.0.1", 0), Serve)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests, body, clients
    finally:
        server.shutdown()
        server.server_close()


def test_a_worker_reads_an_s3_object_with_one_get_and_a_tar_member_with_one_ranged_get(recording_endpoint) -> None:
    from ray_jobs.ingest.worker import read_member

    endpoint, requests, body, _ = recording_endpoint
    options = {"endpoint": endpoint, "aws_access_key_id": "k", "aws_secret_access_key": "s", "region": "us-east-1"}
    assert read_object("s3://b/photos/a.png", len(body), options) == body
    assert requests == ["GET"], "no HEAD before the GET: one request, one round trip per image"
    requests.clear()
    assert read_member("s3://b/shard.tar", f"3:{len(body) - 3}", len(body), options) == body[3:]
    assert requests == ["GET"]


def test_reads_through_pyarrow_keep_one_filesystem_and_its_connection_from_object_to_object(recording_endpoint) -> None:
    """gs:// and az:// objects are read through pyarrow; that path runs here on the S3 protocol, the one server we have."""
    from ray_jobs.ingest.object_reads import _read_with_pyarrow

    endpoint, requests, body, clients = recording_endpoint
    options = {"endpoint": endpoint, "aws_access_key_id": "k2", "aws_secret_access_key": "s", "region": "us-east-1"}
    for n in range(5):
        assert _read_with_pyarrow(f"s3://b/photos/{n}.png", options, len(body), None) == body
        assert _read_with_pyarrow(f"s3://b/photos/{n}.png", options, len(body), lambda first: False) is None
    assert len(requests) >= 10
    assert len(set(clients)) == 1, f"ten reads over {len(set(clients))} connections: a filesystem was built per object"


def test_object_reads_on_the_server_keep_their_limits_and_reasons(s3) -> None:
    from ray_jobs.ingest import object_reads
    from ray_jobs.ingest.worker import SKIP, read_member

    png = image_bytes(1, fmt="PNG")
    _upload(s3, {"reads/a.png": png, "reads/notes.dat": b"plain text, not an image" * 100, "reads/empty.png": b""})
    options = s3.storage_options
    assert read_object(s3.uri("reads/a.png"), len(png), options) == png
    too_large = read_object(s3.uri("reads/a.png"), len(png) - 1, options)
    assert too_large.reason == "too_large"
    assert read_object(s3.uri("reads/notes.dat"), 10**6, options, scan=True) == SKIP  # sniffed, not an image
    assert read_object(s3.uri("reads/empty.png"), 10**6, options) == b""  # validation calls it empty
    assert read_object(s3.uri("reads/gone.png"), 10**6, options).reason == "not_found"
    assert read_member(s3.uri("reads/a.png"), f"{len(png) - 4}:4", 10**6, options) == png[-4:]
    assert read_member(s3.uri("reads/a.png"), f"{len(png) - 4}:8", 10**6, options).reason == "truncated"
    assert read_member(s3.uri("reads/a.png"), f"{len(png) + 10}:8", 10**6, options).reason == "truncated"
    assert read_member(s3.uri("reads/gone.tar"), "0:8", 10**6, options).reason == "not_found"
    with pytest.raises(object_reads.ObjectTooLarge) as raised:
        object_reads.read_object(s3.uri("reads/a.png"), options, 10)
    assert raised.value.size == len(png), "refused from the object's size, before its body is read"

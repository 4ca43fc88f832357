"""A real S3-compatible server (moto) on 127.0.0.1, for object-storage tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class S3Server:
    """Where the server listens and the storage options Lance needs to reach it."""

    endpoint: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, str]:
        return {
            "endpoint": self.endpoint,
            "aws_access_key_id": "testing-key-id",
            "aws_secret_access_key": "testing-secret-do-not-log",
            "region": "us-east-1",
            "allow_http": "true",
        }

    def uri(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_process(env: dict[str, str] | None = None, cpus: set[int] | None = None) -> Iterator[tuple[str, int]]:
    """Run moto_server on a free loopback port until the block ends; yield its endpoint URL and pid.

    ``cpus`` pins the server to those CPUs (a benchmark that must not share its decoders' cores).
    """
    port = _free_port()
    moto = Path(sys.executable).parent / "moto_server"
    process = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def moto_server(env: dict[str, str] | None = None) -> Iterator[str]:
    """Run moto_server on a free loopback port until the block ends; yield its endpoint URL."""
    with moto_process(env) as (endpoint, _):
        yield endpoint


@contextmanager
def s3_server(bucket: str = "lancetag") -> Iterator[S3Server]:
    """Start moto_server on a free loopback port with one bucket; stop it afterwards."""
    import boto3

    with moto_server() as endpoint:
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing-key-id",
            aws_secret_access_key="testing-secret-do-not-log",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        yield S3Server(endpoint, bucket)

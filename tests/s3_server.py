"""The S3-compatible server (moto on 127.0.0.1) the object-storage tests use: the one the benchmarks use."""

from bench.s3_server import S3Server, moto_server, s3_server

__all__ = ["S3Server", "moto_server", "s3_server"]

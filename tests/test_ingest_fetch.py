"""URL fetching against a hostile server on 127.0.0.1: bounded time, transient failures retried,
permanent ones not, and private addresses refused before any connection unless allowed (SSRF).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from ray_jobs.ingest import fetch as fetch_module
from ray_jobs.ingest.fetch import Fetcher, refused_address
from ray_jobs.ingest.items import IngestError
from ray_jobs.ingest.options import IngestOptions
from tests.ingest_fixtures import HostileServer

# Loopback is allowed explicitly: the test server lives there.
FAST = IngestOptions(
    allow_private_urls=True,
    read_timeout_s=1.0,
    url_deadline_s=3.0,
    retries=2,
    max_bytes=2 * 1024**2,
    per_host_concurrency=2,
)


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    with HostileServer() as running:
        yield running


@pytest.fixture(scope="module")
def fetcher() -> Iterator[Fetcher]:
    client = Fetcher(FAST)
    yield client
    client.close()


def _reason(result: bytes | IngestError) -> str:
    return "ok" if isinstance(result, bytes) else result.reason


def test_good_image_and_one_redirect_are_fetched(server: HostileServer, fetcher: Fetcher) -> None:
    assert isinstance(fetcher.fetch(server.url("/img/1.jpg")), bytes)
    assert fetcher.fetch(server.url("/redirect/2.jpg")) == fetcher.fetch(server.url("/img/2.jpg"))


def test_404_is_an_error_and_is_not_retried(server: HostileServer, fetcher: Fetcher) -> None:
    result = fetcher.fetch(server.url("/missing.jpg"))
    assert isinstance(result, IngestError) and result.reason == "http_status" and "404" in result.message
    assert server.hits["/missing.jpg"] == 1


def test_transient_503_is_retried_and_then_succeeds(server: HostileServer, fetcher: Fetcher) -> None:
    assert isinstance(fetcher.fetch(server.url("/flaky/3.jpg")), bytes)
    assert server.hits["/flaky/3.jpg"] == 2


def test_persistent_503_fails_after_the_configured_attempts(server: HostileServer, fetcher: Fetcher) -> None:
    result = fetcher.fetch(server.url("/down.jpg"))
    assert _reason(result) == "http_status" and "after 2 attempts" in result.message
    assert server.hits["/down.jpg"] == 2


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/reset.jpg", "connection_failed"),
        ("/loop", "too_many_redirects"),
        ("/endless.jpg", "too_large"),
        ("/html.jpg", "not_an_image"),
        ("/slow.jpg", "timeout"),
    ],
)
def test_hostile_responses_end_in_bounded_time_with_a_reason(
    server: HostileServer, fetcher: Fetcher, path: str, reason: str
) -> None:
    started = time.monotonic()
    result = fetcher.fetch(server.url(path))
    elapsed = time.monotonic() - started
    assert _reason(result) == reason, result
    assert elapsed < FAST.url_deadline_s + 1.5


def test_redirect_loop_stops_at_the_redirect_limit(server: HostileServer, fetcher: Fetcher) -> None:
    before = server.hits["/loop"]
    result = fetcher.fetch(server.url("/loop"))
    assert _reason(result) == "too_many_redirects"
    assert server.hits["/loop"] - before == FAST.max_redirects + 1  # followed to the limit, not retried


def test_per_host_concurrency_is_limited(server: HostileServer, fetcher: Fetcher) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: fetcher.fetch(server.url(f"/hold/{n}.jpg")), range(8)))
    assert all(isinstance(r, bytes) for r in results)
    assert server.max_in_flight == FAST.per_host_concurrency


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/img/1.jpg",
        "http://localhost:{port}/img/1.jpg",
        "http://[::1]:{port}/img/1.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.8/x.jpg",
        "http://192.168.1.1/x.jpg",
        "http://0.0.0.0:{port}/img/1.jpg",
        "http://[::ffff:127.0.0.1]:{port}/img/1.jpg",
    ],
)
def test_private_loopback_and_link_local_urls_are_refused_by_default(server: HostileServer, url: str) -> None:
    hits_before = sum(server.hits.values())
    guarded = Fetcher(IngestOptions())
    result = guarded.fetch(url.format(port=server.port))
    assert _reason(result) == "url_refused" and "--allow-private-urls" in result.message
    assert sum(server.hits.values()) == hits_before  # refused before connecting


def test_a_public_name_resolving_to_loopback_is_refused(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo
    # Test double for DNS (no resolver here): a public-looking name that resolves to loopback.
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, *a, **k: real("127.0.0.1" if host == "images.example.com" else host, *a, **k),
    )
    result = Fetcher(IngestOptions()).fetch(f"http://images.example.com:{server.port}/img/1.jpg")
    assert _reason(result) == "url_refused" and "127.0.0.1" in result.message


def test_redirects_are_rechecked_against_the_address_rules(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Test double for "a public server": 127.0.0.1 counts as public here, 127.0.0.2 stays refused.
    monkeypatch.setattr(
        fetch_module,
        "refused_address",
        lambda address: None if address == "127.0.0.1" else refused_address(address),
    )
    guarded = Fetcher(IngestOptions())
    assert isinstance(guarded.fetch(server.url("/img/4.jpg")), bytes)
    result = guarded.fetch(server.url(f"/to/http://127.0.0.2:{server.port}/img/4.jpg"))
    assert _reason(result) == "url_refused" and "127.0.0.2" in result.message


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/a.jpg", "file:///etc/passwd", "http://", "not a url", "http://\u2603.com/a.jpg", "http://\ufffd.com/"],
)
def test_non_http_urls_are_invalid(url: str) -> None:
    """Including hosts IDNA cannot encode (a snowman; the U+FFFD a non-UTF-8 byte of a URL list becomes)."""
    assert _reason(Fetcher(IngestOptions()).fetch(url)) == "invalid_url"


def test_a_body_the_client_cannot_decode_is_that_urls_error(server: HostileServer) -> None:
    result = Fetcher(IngestOptions(allow_private_urls=True)).fetch(server.url("/garbled.jpg"))
    assert _reason(result) == "bad_response" and "DecodingError" in result.message

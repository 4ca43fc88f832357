"""Fetch image URLs safely: timeouts, a total deadline, retries for transient failures only,
a body size cap, a redirect limit, a magic-byte check, a per-host concurrency limit, and an SSRF
guard that checks every address a host resolves to, on every connection (redirects included).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from ray_jobs.ingest.decode import SNIFF_BYTES, sniff_format
from ray_jobs.ingest.items import IngestError
from ray_jobs.ingest.options import IngestOptions


class FetchFailed(Exception):
    """A URL that will not give an image; ``transient`` failures are worth another attempt."""

    transient = False

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class TransientFetchFailed(FetchFailed):
    """A failure that may pass: 5xx, 429, connection reset, timeout."""

    transient = True


def refused_address(address: str) -> str | None:
    """Return why an IP address must not be fetched by default (private, loopback, ...), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for attribute in (
        "is_loopback",
        "is_private",
        "is_link_local",
        "is_multicast",
        "is_reserved",
        "is_unspecified",
    ):
        if getattr(ip, attribute):
            return attribute.removeprefix("is_").replace("_", "-")
    if not ip.is_global:
        return "not-global"
    return None


def resolve_checked(host: str, port: int, *, allow_private: bool) -> list[str]:
    """Resolve `host` and return its addresses; raise ``FetchFailed`` if any of them is refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchFailed("dns_failed", f"cannot resolve {host!r}: {exc}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        for address in addresses:
            why = refused_address(address)
            if why:
                raise FetchFailed(
                    "url_refused",
                    f"{host} resolves to {address} ({why}); private, loopback and link-local addresses "
                    "are refused by default (--allow-private-urls to fetch them)",
                )
    return addresses


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, connecting only to addresses that passed the SSRF check.

    Connecting to the checked address (not re-resolving the name) closes the DNS-rebinding gap;
    TLS still verifies the certificate against the host name.
    """

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, **kwargs: Any) -> Any:
        addresses = resolve_checked(host, port, allow_private=self.allow_private)
        error: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout=timeout, **kwargs)
            except httpcore.ConnectError as exc:
                error = exc
        raise error or httpcore.ConnectError(f"no address for {host}")


class HostLimiter:
    """At most `limit` concurrent requests per (scheme, host, port) in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}

    def slot(self, url: str) -> threading.BoundedSemaphore:
        """Return the semaphore of the host of `url`."""
        parts = urlsplit(url)
        key = f"{parts.scheme}://{parts.hostname}:{parts.port}"
        with self._lock:
            return self._slots.setdefault(key, threading.BoundedSemaphore(self.limit))


class Fetcher:
    """Fetches image URLs under the limits of one ``IngestOptions``; thread-safe, one per process."""

    def __init__(self, options: IngestOptions) -> None:
        self.options = options
        transport = httpx.HTTPTransport(retries=0)
        transport._pool._network_backend = GuardedBackend(
            allow_private=options.allow_private_urls
        )  # no public hook
        self.client = httpx.Client(transport=transport, trust_env=False, follow_redirects=False)
        self.hosts = HostLimiter(options.per_host_concurrency)

    def fetch(self, url: str) -> bytes | IngestError:
        """Return the body of `url` if it is an image within the limits, else why not."""
        deadline = time.monotonic() + self.options.url_deadline_s
        retrying = Retrying(
            stop=stop_after_attempt(self.options.retries),
            wait=wait_exponential_jitter(initial=0.2, max=2.0),
            retry=retry_if_exception_type(TransientFetchFailed),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    if time.monotonic() >= deadline:
                        raise FetchFailed(
                            "timeout", f"no image within the {self.options.url_deadline_s} s deadline"
                        )
                    return self._follow(url, deadline)
        except FetchFailed as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            suffix = f" (after {attempts} attempts)" if exc.transient and attempts > 1 else ""
            return IngestError(exc.reason, exc.message + suffix)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()

    def _follow(self, url: str, deadline: float) -> bytes:
        for _ in range(self.options.max_redirects + 1):
            check_url(url)
            with self.hosts.slot(url):
                location = self._get(url, deadline)
            if isinstance(location, bytes):
                return location
            url = location
        raise FetchFailed("too_many_redirects", f"more than {self.options.max_redirects} redirects")

    def _get(self, url: str, deadline: float) -> bytes | str:
        remaining = max(0.01, deadline - time.monotonic())
        timeout = httpx.Timeout(
            connect=min(self.options.connect_timeout_s, remaining),
            read=min(self.options.read_timeout_s, remaining),
            write=min(self.options.read_timeout_s, remaining),
            pool=min(self.options.connect_timeout_s, remaining),
        )
        try:
            with self.client.stream("GET", url, timeout=timeout) as response:
                if response.is_redirect:
                    return urljoin(url, response.headers["location"])
                _check_status(response)
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.options.max_bytes:
                    raise FetchFailed(
                        "too_large",
                        f"Content-Length {declared} is over the limit of {self.options.max_bytes}",
                    )
                return self._read_body(response.iter_bytes(), deadline)
        except httpx.TimeoutException as exc:
            raise TransientFetchFailed("timeout", f"{type(exc).__name__}: the server was too slow") from exc
        except httpx.TransportError as exc:
            raise TransientFetchFailed("connection_failed", f"{type(exc).__name__}: {exc}") from exc
        except httpx.RequestError as exc:  # e.g. a body its Content-Encoding does not describe
            raise FetchFailed("bad_response", f"{type(exc).__name__}: {exc}") from exc

    def _read_body(self, chunks: Iterable[bytes], deadline: float) -> bytes:
        body = bytearray()
        checked = False
        for chunk in chunks:
            body += chunk
            if len(body) > self.options.max_bytes:
                raise FetchFailed("too_large", f"the body passed the limit of {self.options.max_bytes} bytes")
            if not checked and len(body) >= SNIFF_BYTES:
                _check_magic(body)
                checked = True
            if time.monotonic() > deadline:
                raise FetchFailed(
                    "timeout", f"the body did not arrive within {self.options.url_deadline_s} s"
                )
        if not body:
            raise FetchFailed("empty_file", "the server sent an empty body")
        if not checked:
            _check_magic(body)
        return bytes(body)


def check_url(url: str) -> None:
    """Raise ``FetchFailed`` unless `url` is an absolute http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise FetchFailed("invalid_url", f"{url!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchFailed("invalid_url", f"{url!r} is not an http(s) URL with a host")
    try:
        httpx.URL(url)  # the client's own parse: a host IDNA cannot encode (e.g. '\u2603.com') fails here
    except httpx.InvalidURL as exc:
        raise FetchFailed("invalid_url", f"{url!r} is not a valid URL: {exc}") from exc


def _check_status(response: httpx.Response) -> None:
    status = response.status_code
    if status == 200:
        return
    message = f"HTTP {status} {response.reason_phrase}"
    if status >= 500 or status in (408, 429):
        raise TransientFetchFailed("http_status", message)
    raise FetchFailed("http_status", message)


def _check_magic(body: bytes | bytearray) -> None:
    if sniff_format(bytes(body[:SNIFF_BYTES])) is None:
        raise FetchFailed("not_an_image", f"the body is not an image (starts {bytes(body[:8])!r})")

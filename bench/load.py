"""A bounded load generator for the labeler: N concurrent clients on 127.0.0.1 for D seconds.

Each client posts ``/label`` requests back to back; the run stops by itself after ``duration_s``.
Used by ``python -m bench load`` (minutes) and by the reliability suite (seconds).
"""

from __future__ import annotations

import base64
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class LoadReport:
    """What the clients saw: status counts, latency percentiles of 200s, 503s with Retry-After."""

    requests: int
    statuses: dict[int, int]
    errors: dict[str, int]
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    images_per_s: float
    retry_after_on_all_503: bool
    rss_mb: list[float] = field(default_factory=list)


def run_load(
    url: str,
    images: list[bytes],
    *,
    clients: int = 16,
    duration_s: float = 20.0,
    images_per_request: int = 4,
    rss_of: Callable[[], float] | None = None,
) -> LoadReport:
    """Hammer ``url``/label with ``clients`` concurrent clients for ``duration_s``; return what they saw."""
    body = {"images": [base64.b64encode(b).decode() for b in images[:images_per_request]]}
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    missing_retry_after = 0
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s
    rss: list[float] = []

    def client() -> None:
        nonlocal missing_retry_after
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    response = http.post(f"{url}/label", json=body)
                except httpx.HTTPError as exc:
                    with lock:
                        errors[type(exc).__name__] += 1
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    statuses[response.status_code] += 1
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    elif response.status_code == 503:
                        missing_retry_after += "retry-after" not in response.headers
                if response.status_code == 503:
                    time.sleep(float(response.headers.get("retry-after", "0.5")) / 10)

    def sample_memory() -> None:
        while time.monotonic() < deadline:
            if rss_of is not None:
                rss.append(rss_of())
            time.sleep(1.0)

    threads = [threading.Thread(target=client) for _ in range(clients)] + [threading.Thread(target=sample_memory)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    ms = np.array(latencies) * 1000 if latencies else None
    return LoadReport(
        requests=sum(statuses.values()) + sum(errors.values()),
        statuses=dict(statuses),
        errors=dict(errors),
        p50_ms=float(np.percentile(ms, 50)) if ms is not None else None,
        p95_ms=float(np.percentile(ms, 95)) if ms is not None else None,
        p99_ms=float(np.percentile(ms, 99)) if ms is not None else None,
        images_per_s=statuses.get(200, 0) * images_per_request / seconds,
        retry_after_on_all_503=missing_retry_after == 0,
        rss_mb=rss,
    )


def replica_rss_mb(app_name: str) -> float:
    """Resident memory of the app's Serve replica processes, in MiB."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if f"ServeReplica:{app_name}:" in cmdline:
            total += proc.memory_info().rss
    return total / 1024**2

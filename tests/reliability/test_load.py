"""The labeler under bounded load on 127.0.0.1: no crash, memory bounded, overload answered 503 + Retry-After."""

from __future__ import annotations

import httpx
import pytest

from bench.data import png_bytes
from bench.load import replica_rss_mb, run_load

pytestmark = [pytest.mark.slow, pytest.mark.long]
APP = "test-load-labeler"


@pytest.fixture(scope="module")
def small_labeler(ray_cluster, tiny_qwen2_vl):
    """A labeler with a deliberately small queue, so that 24 clients overload it."""
    from serve_apps.app import LabelerConfig, run_labeler, stop_labeler
    from serve_apps.backends.base import BackendConfig

    url = run_labeler(
        LabelerConfig(
            task="digits", backend=BackendConfig(model=str(tiny_qwen2_vl), batch_size=8), app_name=APP,
            route_prefix=f"/{APP}", num_cpus=0.5, max_batch_size=8, max_ongoing_requests=2, max_queued_requests=4,
        )
    )
    yield url
    stop_labeler(APP)


def test_bounded_load_keeps_the_labeler_up_with_503s_and_bounded_memory(small_labeler):
    images = [png_bytes(k) for k in range(4)]
    report = run_load(small_labeler, images, clients=24, duration_s=20, rss_of=lambda: replica_rss_mb(APP))
    assert report.statuses.get(200, 0) > 10, report
    assert report.statuses.get(503, 0) > 0, "overload is answered, not queued without bound"
    assert set(report.statuses) <= {200, 503}, f"no other status under load: {report.statuses}"
    assert report.errors == {}, "no connection dropped"
    assert report.retry_after_on_all_503
    assert report.rss_mb and max(report.rss_mb) - report.rss_mb[0] < 300, f"memory grew: {report.rss_mb}"
    assert httpx.get(f"{small_labeler}/health", timeout=10).status_code == 200, "still up after the load"
    print(f"load: {report}")

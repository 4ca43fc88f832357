"""The labeler under a bounded number of concurrent clients for minutes: statuses, latency, memory."""

from __future__ import annotations

import os
from pathlib import Path

from bench.load import replica_rss_mb, run_load
from bench.report import Section

DURATION_S = float(os.environ.get("LANCETAG_BENCH_LOAD_SECONDS", "180"))
APP = "bench-load"


def run(workdir: Path) -> Section:
    """Run 8 and then 32 concurrent clients against one tiny-model replica with a bounded queue."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from bench.data import png_bytes
    from serve_apps.app import LabelerConfig, run_labeler
    from serve_apps.backends.base import BackendConfig
    from serve_apps.tiny_models import build_tiny_model

    model = str(build_tiny_model("qwen2_vl", workdir / "tiny"))
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
    url = run_labeler(
        LabelerConfig(task="digits", backend=BackendConfig(model=model, batch_size=16), app_name=APP, route_prefix=f"/{APP}",
                      max_batch_size=16, max_ongoing_requests=8, max_queued_requests=16)
    )
    images = [png_bytes(k) for k in range(4)]
    rows = []
    for clients in (8, 32):
        r = run_load(url, images, clients=clients, duration_s=DURATION_S / 2, rss_of=lambda: replica_rss_mb(APP))
        rows.append(
            f"| {clients} | {r.requests} | {r.statuses.get(200, 0)} | {r.statuses.get(503, 0)} | "
            f"{sum(v for k, v in r.statuses.items() if k not in (200, 503)) + sum(r.errors.values())} | "
            f"{r.p50_ms:.0f} / {r.p95_ms:.0f} / {r.p99_ms:.0f} | {r.images_per_s:.1f} | "
            f"{min(r.rss_mb):.0f} -> {max(r.rss_mb):.0f} | {'yes' if r.retry_after_on_all_503 else 'NO'} |"
        )
        print(f"clients {clients}: statuses {r.statuses} errors {r.errors}", flush=True)
    ray.shutdown()
    md = (
        f"One replica (tiny Qwen2-VL, 4 images per request), `max_ongoing_requests=8`, `max_queued_requests=16`, "
        f"{DURATION_S / 2:.0f} s per level.\n\n"
        "| clients | requests | 200 | 503 | other/failed | latency p50 / p95 / p99 (ms) | images/s | replica RSS (MiB) | Retry-After on every 503 |\n"
        "| ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | --- |\n" + "\n".join(rows) + "\n"
    )
    return Section("Labeler under load (bounded clients on 127.0.0.1)", md)

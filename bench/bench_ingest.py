"""Ingest throughput: lancetag's ingest job against the raw read of the same files and the
straightforward Ray Data script of the source article, side by side in one run.

The folder: N real-size JPEGs (default 5,000; ``LANCETAG_BENCH_INGEST_IMAGES``) made with Pillow
from scikit-image's sample photos, randomly cropped, resized (0.6-2.5 MP) and noised, so files
weigh about 100-500 KB like phone and web photos. The files are read once before timing starts,
so every contender reads from the page cache.

- raw read: ``open().read()`` of every file, one process (the ``cat``-like limit on bytes).
- straightforward: ``ray.data.from_items(paths).map_batches(<pandas rows: read, PIL open +
  convert("RGB"), uuid4 id>)`` then ``lance_ray.write_lance``: no validation accounting, no
  dedup, random ids (a rerun doubles the table).
- lancetag: ``ray_jobs.ingest.ingest(folder)``: validation (draft decode), sha256 ids, dedup,
  chunked commits, accounting.
"""

from __future__ import annotations

import io
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.report import Section

N_IMAGES = int(os.environ.get("LANCETAG_BENCH_INGEST_IMAGES", "5000"))
WARM_UP = 64
ATTEMPTS = 2
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)


def _make_batch(args: tuple[Path, int, int]) -> int:
    from PIL import Image
    from skimage import data

    folder, start, count = args
    bases = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    total = 0
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        base = bases[i % len(bases)]
        w, h = base.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        pixels = rng.uniform(0.6e6, 2.5e6)
        scale = (pixels / (cw * ch)) ** 0.5
        image = base.crop((x, y, x + cw, y + ch)).resize(
            (int(cw * scale), int(ch * scale)), Image.Resampling.BILINEAR
        )
        array = np.asarray(image, dtype=np.int16)
        noise = rng.integers(-8, 9, size=array.shape, dtype=np.int16)
        image = Image.fromarray(np.clip(array + noise, 0, 255).astype(np.uint8))
        path = folder / f"{i // 500:03d}" / f"photo_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "JPEG", quality=int(rng.integers(85, 96)))
        total += path.stat().st_size
    return total


def make_photos(folder: Path, count: int) -> int:
    """Write `count` distinct real-size JPEGs under `folder`; return their total size in bytes."""
    step = 250
    jobs = [(folder, start, min(step, count - start)) for start in range(0, count, step)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return sum(pool.map(_make_batch, jobs))


def raw_read(paths: list[Path]) -> int:
    """Read every file once; return the bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            total += len(handle.read())
    return total


def straightforward_ingest(paths: list[Path], uri: str) -> None:
    """The source article's script: Ray Data map_batches over pandas rows, uuid ids, write_lance."""
    import lance_ray
    import pandas as pd
    import ray
    from PIL import Image

    def process(batch: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for path in batch["path"]:
            with open(path, "rb") as handle:
                data = handle.read()
            image = Image.open(io.BytesIO(data)).convert("RGB")
            rows.append(
                {
                    "id": str(uuid.uuid4()),
                    "path": path,
                    "image": data,
                    "width": image.width,
                    "height": image.height,
                }
            )
        return pd.DataFrame(rows)

    dataset = ray.data.from_items([{"path": str(p)} for p in paths]).map_batches(
        process, batch_format="pandas"
    )
    lance_ray.write_lance(dataset, uri)


def _timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def run(workdir: Path) -> Section:
    """Generate the photo folder, then time raw read, the straightforward script and lancetag's ingest."""
    import lance
    import ray

    from ray_jobs.ingest import IngestOptions, ingest

    cache = os.environ.get("LANCETAG_BENCH_INGEST_PHOTOS")  # reuse a folder made by an earlier run
    folder = Path(cache) if cache else workdir / "photos"
    make_started = time.perf_counter()
    if len(list(folder.rglob("*.jpg"))) != N_IMAGES:
        make_photos(folder, N_IMAGES)
    make_s = time.perf_counter() - make_started
    paths = sorted(folder.rglob("*.jpg"))
    sizes = [p.stat().st_size for p in paths]
    total_bytes = sum(sizes)
    raw_read(paths)  # warm the page cache for every contender

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=os.cpu_count(), object_store_memory=1024**3, include_dashboard=False, log_to_driver=False
    )
    try:
        raw_s = min(_timed(raw_read, paths) for _ in range(3))
        # Warm-up of both contenders on 64 images: worker processes, imports and Ray Data's actors
        # are started once per cluster, not per run; neither contender should pay for the other.
        warm = workdir / "warm-up"
        warm.mkdir()
        for path in paths[:WARM_UP]:
            shutil.copy(path, warm / f"{path.parent.name}-{path.name}")
        ingest([str(warm)], str(workdir / "warm-ours.lance"), IngestOptions(progress=False))
        straightforward_ingest(sorted(warm.iterdir()), str(workdir / "warm-theirs.lance"))
        # Two interleaved attempts each (fresh tables), best of 2: this 2-core machine is noisy.
        ours_s, theirs_s, summaries = [], [], []
        for attempt in range(ATTEMPTS):
            ours_uri = str(workdir / f"lancetag-{attempt}.lance")
            theirs_uri = str(workdir / f"straightforward-{attempt}.lance")
            ours_s.append(
                _timed(lambda uri=ours_uri: summaries.append(ingest([str(folder)], uri, IngestOptions(progress=False))))
            )
            theirs_s.append(_timed(straightforward_ingest, paths, theirs_uri))
            assert lance.dataset(theirs_uri).count_rows() == len(paths)
            shutil.rmtree(theirs_uri)
        rerun = []
        rerun_s = _timed(
            lambda: rerun.append(ingest([str(folder)], ours_uri, IngestOptions(progress=False)))
        )
    finally:
        ray.shutdown()
    summary = summaries[0]
    assert all(s.added == len(paths) and s.reconciled for s in summaries) and rerun[0].added == 0
    samples = f"lancetag {', '.join(f'{t:.1f}' for t in ours_s)} s; script {', '.join(f'{t:.1f}' for t in theirs_s)} s"
    ours_s, theirs_s = min(ours_s), min(theirs_s)

    n = len(paths)
    rate = {"raw": n / raw_s, "theirs": n / theirs_s, "ours": n / ours_s}
    mb = total_bytes / 1e6
    md = f"""
{n:,} JPEGs, {mb / 1e3:.2f} GB (median {np.median(sizes) / 1e3:.0f} KB, {min(sizes) / 1e3:.0f}-{max(sizes) / 1e3:.0f} KB),
generated in {make_s:.0f} s (0 when reused); page cache warm; local Ray cluster with {os.cpu_count()} CPUs,\nwarmed up by both contenders on {WARM_UP} of the images first; the two contenders ran\n{ATTEMPTS} times each, interleaved, into fresh tables ({samples}).

| contender | seconds | images/s | MB/s | vs raw read | lancetag vs it |
| --- | ---: | ---: | ---: | ---: | ---: |
| raw read (`open().read()`, best of 3) | {raw_s:.2f} | {rate["raw"]:,.0f} | {mb / raw_s:,.0f} | 1.00x | {rate["ours"] / rate["raw"]:.2f}x |
| straightforward script (map_batches + pandas + uuid + write_lance), best of {ATTEMPTS} | {theirs_s:.2f} | {rate["theirs"]:,.0f} | {mb / theirs_s:,.0f} | {rate["theirs"] / rate["raw"]:.3f}x | {rate["ours"] / rate["theirs"]:.2f}x |
| **lancetag ingest** (validate, sha256, dedup, chunked commits), best of {ATTEMPTS} | {ours_s:.2f} | {rate["ours"]:,.0f} | {mb / ours_s:,.0f} | {rate["ours"] / rate["raw"]:.3f}x | 1.00x |
| lancetag rerun (everything a duplicate, nothing added) | {rerun_s:.2f} | {n / rerun_s:,.0f} | {mb / rerun_s:,.0f} | {n / rerun_s / rate["raw"]:.3f}x | |

Goals: >= 0.5x raw read ({"met" if rate["ours"] >= 0.5 * rate["raw"] else "NOT met"}), >= 3x the straightforward
script ({"met" if rate["ours"] >= 3 * rate["theirs"] else "NOT met"}). lancetag run: {summary.added} added,
{summary.duplicates} duplicates, {summary.errors} errors, {summary.skipped} skipped; table version {summary.version}.

Where the time goes: the first run reads, hashes and draft-decodes every image in Ray Data tasks
(one per CPU) while the driver appends chunks to the table. The JPEG decoder is the floor: draft
mode still entropy-decodes the whole stream, several ms per 1-2 MP image here, so any ingest that
validates by decoding is bounded by the decoder on 2 cores, not by the bytes; 0.5x the raw read
(a memcpy from the page cache) is out of reach for a validating ingest on this machine. The
rerun reads and hashes every file, finds all of them in the table (one `id IN (...)` lookup per
batch in the worker) and decodes nothing: content in the table was validated when it was added.
The straightforward script decodes fully and converts to RGB (about twice the draft decode), and
has no dedup, no errors record and random ids: its rerun doubles its table.

What made the first run faster than before: Ray Data's per-operator resource reservation keeps
half the CPUs away from a pipeline's only operator; with it, about one decode task ran at a time
on 2 CPUs (25% of the machine idle). The ingest turns it off for its own dataset only.
"""
    return Section(title="Ingest throughput (ray_jobs.ingest)", markdown=md)

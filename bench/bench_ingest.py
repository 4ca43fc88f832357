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
        ours_uri, theirs_uri = str(workdir / "lancetag.lance"), str(workdir / "straightforward.lance")
        holder: dict = {}
        ours_s = _timed(
            lambda: holder.update(summary=ingest([str(folder)], ours_uri, IngestOptions(progress=False)))
        )
        theirs_s = _timed(straightforward_ingest, paths, theirs_uri)
        rerun_s = _timed(
            lambda: holder.update(rerun=ingest([str(folder)], ours_uri, IngestOptions(progress=False)))
        )
    finally:
        ray.shutdown()
    summary, rerun = holder["summary"], holder["rerun"]
    assert summary.added == len(paths) and summary.reconciled and rerun.added == 0
    assert lance.dataset(theirs_uri).count_rows() == len(paths)

    n = len(paths)
    rate = {"raw": n / raw_s, "theirs": n / theirs_s, "ours": n / ours_s}
    mb = total_bytes / 1e6
    md = f"""
{n:,} JPEGs, {mb / 1e3:.2f} GB (median {np.median(sizes) / 1e3:.0f} KB, {min(sizes) / 1e3:.0f}-{max(sizes) / 1e3:.0f} KB),
generated in {make_s:.0f} s (0 when reused); page cache warm; local Ray cluster with {os.cpu_count()} CPUs,\nwarmed up by both contenders on {WARM_UP} of the images first.

| contender | seconds | images/s | MB/s | vs raw read | lancetag vs it |
| --- | ---: | ---: | ---: | ---: | ---: |
| raw read (`open().read()`, best of 3) | {raw_s:.2f} | {rate["raw"]:,.0f} | {mb / raw_s:,.0f} | 1.00x | {rate["ours"] / rate["raw"]:.2f}x |
| straightforward script (map_batches + pandas + uuid + write_lance) | {theirs_s:.2f} | {rate["theirs"]:,.0f} | {mb / theirs_s:,.0f} | {rate["theirs"] / rate["raw"]:.3f}x | {rate["ours"] / rate["theirs"]:.2f}x |
| **lancetag ingest** (validate, sha256, dedup, chunked commits) | {ours_s:.2f} | {rate["ours"]:,.0f} | {mb / ours_s:,.0f} | {rate["ours"] / rate["raw"]:.3f}x | 1.00x |
| lancetag rerun (everything a duplicate, nothing added) | {rerun_s:.2f} | {n / rerun_s:,.0f} | {mb / rerun_s:,.0f} | {n / rerun_s / rate["raw"]:.3f}x | |

Goals: >= 0.5x raw read ({"met" if rate["ours"] >= 0.5 * rate["raw"] else "NOT met"}), >= 3x the straightforward
script ({"met" if rate["ours"] >= 3 * rate["theirs"] else "NOT met"}). lancetag run: {summary.added} added,
{summary.duplicates} duplicates, {summary.errors} errors, {summary.skipped} skipped; table version {summary.version}.

Where the time goes: the rerun row is the job with nothing to write (read, draft-decode and
hash every image in 2 Ray tasks): the ceiling of validating by decoding on 2 cores. The gap
between the first run and the rerun is the driver's Lance appends (plain `large_binary`, see the
storage section) competing with the workers for the same 2 cores. The raw read from the page
cache is a memcpy; any ingest that decodes every image is bounded by the JPEG decoder instead
(draft mode still entropy-decodes the whole stream: several ms per 1-2 MP image here), so 0.5x
raw read is out of reach for a validating ingest on 2 cores. The straightforward script decodes
fully and converts to RGB (about twice the draft decode), and has no dedup, no errors record and
random ids: its rerun doubles its table.

3x the script would need {theirs_s:.1f} s / 3 = {theirs_s / 3:.1f} s for the whole ingest; the rerun alone, with
nothing written, takes {rerun_s:.1f} s, so writing {mb / 1e3:.2f} GB of image bytes would have to cost
{theirs_s / 3 - rerun_s:.1f} s. This machine's disk takes 1-10 s for that (`lance.write_dataset` alone wrote
170-800 MB/s here, varying run to run with writeback), on the same 2 cores as the decoders.
"""
    return Section(title="Ingest throughput (ray_jobs.ingest)", markdown=md)

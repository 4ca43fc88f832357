"""Ingest of images a source holds inline (a Hugging Face dataset, a Parquet file) next to a folder of the same images.

Each source is ingested by ``lancetag ingest`` as a user runs it (its own local Ray), into a fresh
table; the driver process's peak RSS is sampled every 50 ms. The images are the ingest benchmark's
real-size JPEGs. What matters is the driver: with the images left in their files (``Cell``:
the workers read them), the bytes it sends to the tasks and its memory do not depend on the
images' size.

    python -m bench inline
    LANCETAG_BENCH_INLINE_IMAGES=2000 LANCETAG_BENCH_INLINE_SCALE=100000,1000000 python -m bench inline

``LANCETAG_BENCH_INLINE_SCALE`` adds the driver's peak RSS as a Parquet source grows: the scale
benchmark's distinct PNGs, written as one Hub-style Parquet file per size (row groups of 100);
then as a Lance table grows: the table that ingest made, copied into another by a second ingest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from bench.bench_ingest import make_photos
from bench.bench_scale import LANCETAG, image_parts, run_measured
from bench.report import Section

N_IMAGES = int(os.environ.get("LANCETAG_BENCH_INLINE_IMAGES", "2000"))
ROW_GROUP = 100  # rows per Parquet row group, as the Hugging Face Hub writes image datasets
SCALE = [int(n) for n in os.environ.get("LANCETAG_BENCH_INLINE_SCALE", "").split(",") if n]


def write_parquet_of_parts(count: int, out: Path) -> Path:
    """Write ``count`` of the scale benchmark's PNGs into one Hub-style Parquet file, a folder at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", struct), ("label", pa.string())])
    left = count
    with pq.ParquetWriter(out, schema) as writer:
        for part in image_parts(count):
            files = sorted(part.iterdir())[:left]
            left -= len(files)
            images = pa.array([{"bytes": f.read_bytes(), "path": f.name} for f in files], struct)
            writer.write_table(pa.table({"image": images, "label": [part.name] * len(files)}, schema=schema),
                               row_group_size=ROW_GROUP)
    return out


def source_growth(workdir: Path, env: dict[str, str]) -> list[dict]:
    """Per size in SCALE, ``lancetag ingest`` of a Parquet file, then of the Lance table it made into
    another: wall, job time, the driver's peak RSS."""
    rows = []
    for n in SCALE:
        parquet = write_parquet_of_parts(n, workdir / f"scale-{n}.parquet")
        table, copy = workdir / f"scale-{n}.lance", workdir / f"copy-{n}.lance"
        for kind, source, target in (("Parquet file", parquet, table), ("Lance table", table, copy)):
            size = sum(f.stat().st_size for f in source.rglob("*") if f.is_file()) if source.is_dir() else source.stat().st_size
            measured = run_measured([*LANCETAG, "ingest", str(source), "--table", str(target), "--json"], env=env)
            report = json.loads(measured.stdout.strip().splitlines()[-1])
            assert report["added"] == n and report["errors"] == 0, report
            rows.append({"kind": kind, "n": n, "wall": measured.seconds, "job": report["seconds"],
                         "rss": measured.peak_rss / 2**20, "from_driver": report["bytes_from_driver"], "file": size})
        shutil.rmtree(table), shutil.rmtree(copy)
        parquet.unlink()
    return rows


def write_sources(photos: list[Path], workdir: Path) -> dict[str, Path]:
    """Write the photos as a Hugging Face dataset (4 Arrow shards) and as one Parquet file."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": p.read_bytes(), "path": p.name} for p in photos]
    labels = [p.parent.name for p in photos]
    hf = workdir / "hf"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(hf), num_shards=4)
    parquet = workdir / "train-00000-of-00001.parquet"
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(images, struct), "label": labels}), parquet, row_group_size=ROW_GROUP)
    return {"folder": photos[0].parent.parent, "hf": hf, "parquet": parquet}


def run(workdir: Path) -> Section:
    """Ingest the same photos from a folder, a Hugging Face dataset and a Parquet file; compare the driver."""
    folder = workdir / "photos"
    made = time.perf_counter()
    make_photos(folder, N_IMAGES)
    photos = sorted(folder.rglob("*.jpg"))
    sources = write_sources(photos, workdir)
    made_s = time.perf_counter() - made
    total = sum(p.stat().st_size for p in photos)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    rows = []
    for name, location in sources.items():
        table = workdir / f"{name}.lance"
        measured = run_measured([*LANCETAG, "ingest", str(location), "--table", str(table), "--json"], env=env)
        report = json.loads(measured.stdout.strip().splitlines()[-1])
        assert report["added"] == len(photos) and report["errors"] == 0, report
        rows.append({"name": name, "wall": measured.seconds, "job": report["seconds"], "rss": measured.peak_rss / 2**20,
                     "from_driver": report["bytes_from_driver"], "to_driver": report["bytes_to_driver"]})
        shutil.rmtree(table)
    growth = source_growth(workdir, env) if SCALE else []
    described = {
        "folder": "a folder of the JPEGs",
        "hf": "a Hugging Face dataset (`save_to_disk`, `Image` feature, 4 Arrow shards)",
        "parquet": f"one Parquet file, `Image` struct `{{bytes, path}}`, row groups of {ROW_GROUP}",
    }
    lines = "\n".join(
        f"| {described[r['name']]} | {r['wall']:.1f} | {r['job']:.1f} | {len(photos) / r['job']:,.0f} | "
        f"{r['rss']:,.0f} | {r['from_driver'] / len(photos):,.0f} | {r['to_driver'] / len(photos):,.0f} |"
        for r in rows
    )
    md = f"""
{len(photos):,} of the ingest benchmark's JPEGs ({total / 1e6:,.0f} MB, mean {total / len(photos) / 1e3:,.0f} KB), written
as three sources ({made_s:.0f} s); `lancetag ingest SOURCE --table T --json`, one command each (its own Ray), the
driver process's peak RSS sampled every 50 ms.

| source | wall s | job s | images/s | driver peak RSS MiB | bytes sent to the tasks per image | bytes back per image |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{lines}

The images of the Hugging Face dataset and of the Parquet file stay in their files: the driver lists
the other columns (and, for Arrow, the images' lengths from the offsets; for Parquet, each row
group's null count, read by a Ray task so that the file's footer stays off the driver) and sends
each task the file, row and column of its images, which the workers read
(`ray_jobs.ingest.sources.cells`, `worker.read_cell`). Before this, the driver read every
image and sent its bytes to the tasks as work rows: about the image's size per image, and a
segment (50,000 items) of them held at once.
"""
    if growth:
        first = {g["kind"]: g["rss"] for g in reversed(growth)}
        grown = "\n".join(
            f"| {g['kind']} | {g['n']:,} | {g['file'] / 1e6:,.0f} | {g['wall']:.0f} | {g['job']:.0f} | {g['n'] / g['job']:,.0f} | "
            f"{g['rss']:,.0f} | {g['rss'] / first[g['kind']]:.2f}x | {g['from_driver'] / g['n']:,.0f} |"
            for g in sorted(growth, key=lambda g: (g["kind"] != "Parquet file", g["n"]))
        )
        last = {g["kind"]: g["rss"] for g in growth}
        ok = ", ".join(f"{kind}: {'met' if last[kind] <= 1.2 * first[kind] else 'NOT met'}" for kind in last)
        md += f"""
Driver memory as a source grows (`LANCETAG_BENCH_INLINE_SCALE={",".join(map(str, SCALE))}`: the scale
benchmark's distinct 28x28 PNGs in one Hub-style Parquet file per size, row groups of {ROW_GROUP}, then the
Lance table that ingest made, ingested into another; one `lancetag ingest` each):

| source | images | source MB | wall s | job s | images/s | driver peak RSS MiB | vs smallest | bytes sent to the tasks per image |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{grown}

Goal (as for folders): driver peak RSS at the largest size within 1.2x of the smallest ({ok}).
"""
    return Section(title="Ingest of images held inline: Hugging Face dataset, Parquet, folder", markdown=md)

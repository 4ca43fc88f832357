"""The demo's split column, written from where each image sits, as the table grows.

    python -m bench layout

``lancetag demo --data DIR`` labels each image by the class folder it sits in (at any depth) as it
ingests it (``ray_jobs.demo.ingest_folder``), then splits it (its split folder's, or by id hash) in
one pass over the ``source`` column (``ray_jobs.demo.add_split_column``), committed by
``lance_io.columns.fill_column``. Tables of 10k, 100k and 1M rows of ids, paths and classes (37
class folders, a year folder inside each; fragments of 1,024 rows, as ingest writes them; no image
bytes, which the pass never reads), side by side in one
run: the pass as it is (:data:`ray_jobs.demo.COMMIT_ROWS` rows a commit) and the same pass
committing every 4,096 rows, ``fill_column``'s default and the cadence the demo used before.
Then the demo's two reads of the labeled table, each a batch at a time: the (``truth``, ``split``)
counts its checks share (``truth_counts``) and the training rows' widest and tallest aspect, which
size ``cutoff_len`` (``aspect_ratios``: ``width``, ``height``, ``exif_orientation``).
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.report import Section

SIZES = (10_000, 100_000, 1_000_000)
CLASSES = 37
OLD_COMMIT_ROWS = 4_096
SHAPES = ((640, 480, 1), (480, 640, None), (1200, 300, 6))  # the last turned upright: 300 wide, 1,200 tall


def _table(workdir: Path, rows: int, name: str) -> tuple[str, Path]:
    """Write a table of ``rows`` ids, nested class-folder paths and their classes; return its URI and the folder root."""
    import lance
    import pyarrow as pa

    root = Path("/data/photos")
    sources = [f"{root}/class{i % CLASSES}/{2000 + i % 20}/{i:08d}.jpg" for i in range(rows)]
    shapes = [SHAPES[i % len(SHAPES)] for i in range(rows)]  # width, height, EXIF orientation
    table = pa.table({"id": [f"{i:032x}" for i in range(rows)], "source": sources,
                      "truth": [f"class{i % CLASSES}" for i in range(rows)],  # written at ingest
                      "width": pa.array([shape[0] for shape in shapes], pa.int32()),
                      "height": pa.array([shape[1] for shape in shapes], pa.int32()),
                      "exif_orientation": pa.array([shape[2] for shape in shapes], pa.int8())})
    uri = str(workdir / f"{name}-{rows}.lance")
    lance.write_dataset(table, uri, max_rows_per_file=1024)
    return uri, root


def _pass(workdir: Path, rows: int, commit_rows: int) -> tuple[float, int, str]:
    """Return (seconds of the layout pass, versions it committed, the table) on a fresh table of ``rows``."""
    import lance

    from ray_jobs import demo

    uri, root = _table(workdir, rows, f"commit-{commit_rows}")
    layout = demo.FolderLayout(root, [f"class{k}" for k in range(CLASSES)])
    before = lance.dataset(uri).version
    start = time.perf_counter()
    version = demo.add_split_column(uri, layout, commit_rows=commit_rows)
    seconds = time.perf_counter() - start
    split = lance.dataset(uri).count_rows(filter="split IS NOT NULL")
    assert split == rows, f"{split} of {rows} rows split"
    return seconds, version - before, uri


def _reads(uri: str) -> tuple[float, float]:
    """Return the seconds of the demo's reads of the labeled table: truth_counts, aspect_ratios (best of 3)."""
    import lance

    from ray_jobs import demo

    version = lance.dataset(uri).version
    counts, aspects = [], []
    for _ in range(3):
        start = time.perf_counter()
        demo.truth_counts(uri)
        counts.append(time.perf_counter() - start)
        start = time.perf_counter()
        widest, tallest = demo.aspect_ratios(uri, version, "split = 'train'")
        aspects.append(time.perf_counter() - start)
    assert (widest, tallest) == (4 / 3, 1 / 4), (widest, tallest)  # 1200x300 turned upright is 300 wide
    return min(counts), min(aspects)


def run(workdir: Path) -> Section:
    """Time the layout pass at each size, both commit cadences side by side; return the RESULTS.md section."""
    from ray_jobs.demo import COMMIT_ROWS

    lines = [
        (__doc__ or "").split("\n\n", 2)[2].strip(),
        "",
        f"| rows | as it is ({COMMIT_ROWS:,} rows a commit) | versions | every {OLD_COMMIT_ROWS:,} rows | versions | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    reads = []
    for rows in SIZES:
        now, now_versions, uri = _pass(workdir, rows, COMMIT_ROWS)
        old, old_versions, _ = _pass(workdir, rows, OLD_COMMIT_ROWS)
        lines.append(f"| {rows:,} | {now:.2f} s | {now_versions} | {old:.2f} s | {old_versions} | {old / now:.1f}x |")
        reads.append((rows, *_reads(uri)))
    lines += ["", "| rows | `truth_counts` | `aspect_ratios` |", "| ---: | ---: | ---: |"]
    lines += [f"| {rows:,} | {counts:.3f} s | {aspects:.3f} s |" for rows, counts, aspects in reads]
    return Section("The demo's split column from the folder layout, as the table grows", "\n".join(lines))

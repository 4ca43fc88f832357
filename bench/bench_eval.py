"""`lancetag eval` on tables of 10k, 100k, 1M and 10M rows.

    python -m bench eval

`lancetag eval` counts (truth, answer) pairs and calibration bins one scan batch at a time
(`ray_jobs.evaluation.metrics.Tally`), so what it holds should grow with the classes, not the
rows. Measured here: a table of N rows with `truth` (10 classes), a `label` column right on
about 9 rows of 10, `label_confidence` and a `split` column holding about 20% `test` (no image
column: eval reads none), then `lancetag eval TABLE --json`, over the whole table and with
`--where "split = 'test'"`, each a process of its own: wall time and peak resident memory. Beside
them, a bare Lance scan of the three columns eval reads, in a process of its own: what the
reading costs before eval counts anything.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench.bench_scale import run_measured
from bench.report import Section, table_section

SIZES = tuple(int(s) for s in os.environ.get("LANCETAG_BENCH_EVAL_SIZES", "10000,100000,1000000,10000000").split(","))
LANCETAG = str(Path(sys.executable).parent / "lancetag")
SCAN = (
    "import sys, lance; from ray_jobs.evaluation.job import SCAN_BATCH; "
    "batches = lance.dataset(sys.argv[1]).scanner(columns=['truth', 'label', 'label_confidence'], batch_size=SCAN_BATCH, "
    "scan_in_order=True).to_batches(); print(sum(b.num_rows for b in batches))"
)
FILE_ROWS = 1_000_000


def _table(workdir: Path, rows: int) -> str:
    """Write ``rows`` labeled rows with confidence and a split, a file per million; return the URI."""
    import lance
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(rows)
    uri = str(workdir / f"e{rows}.lance")
    for start in range(0, rows, FILE_ROWS):
        n = min(FILE_ROWS, rows - start)
        truth = rng.integers(10, size=n)
        label = np.where(rng.random(n) < 0.9, truth, (truth + 1) % 10)
        part = pa.table({
            "id": pa.array(np.arange(start, start + n).astype(str)), "truth": pa.array(truth.astype(str)),
            "label": pa.array(label.astype(str)), "label_confidence": pa.array(rng.random(n).astype(np.float32)),
            "split": pa.array(np.where(rng.random(n) < 0.2, "test", "train")),
        })
        lance.write_dataset(part, uri, mode="append" if start else "create", max_rows_per_file=FILE_ROWS)
    return uri


def run(workdir: Path) -> Section:
    """Time `lancetag eval` over the whole table and over its test split at each size."""
    lines = ["| rows | whole table: rows evaluated | time | peak memory | `split = 'test'`: rows evaluated | time | peak memory | "
             "bare scan: time | peak memory |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    figures = []
    for rows in SIZES:
        uri = _table(workdir, rows)
        runs = [run_measured([LANCETAG, "eval", uri, *where, "--json"]) for where in ([], ["--where", "split = 'test'"])]
        evaluated = [json.loads(r.stdout.strip().splitlines()[-1])["evaluations"]["label"]["rows"] for r in runs]
        scan = run_measured([sys.executable, "-c", SCAN, uri])
        figures.append((rows, runs[0].seconds, runs[0].peak_rss, scan.peak_rss))
        lines.append("| " + " | ".join([f"{rows:,}", *(f"{n:,} | {r.seconds:.1f} s | {r.peak_rss / 2**20:.0f} MiB"
                                                        for n, r in zip(evaluated, runs, strict=True)),
                                        f"{scan.seconds:.1f} s | {scan.peak_rss / 2**20:.0f} MiB"]) + " |")
    (small, small_s, small_rss, small_scan), (large, large_s, large_rss, large_scan) = figures[0], figures[-1]
    return table_section(
        "`lancetag eval` as the table grows", __doc__, lines,
        f"From {small:,} to {large:,} rows evaluated ({large // small}x): the time grows {large_s / small_s:.1f}x "
        f"(the scan), the peak memory {large_rss / small_rss:.1f}x ({small_rss / 2**20:.0f} to {large_rss / 2**20:.0f} MiB). "
        f"Above the bare scan, eval holds {(small_rss - small_scan) / 2**20:.0f} MiB at {small:,} rows and "
        f"{(large_rss - large_scan) / 2**20:.0f} MiB at {large:,}; the rest of the growth is the scan's.",
    )

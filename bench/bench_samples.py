"""Samples from a label column (`lancetag lf samples-from-labels`) on tables of 10k, 100k and 1M rows.

    python -m bench samples

``lance_io.samples.label_samples`` turns each labeled row into a training chat (the task's
question, the stored answer) in the table's samples table, one scan batch at a time. Measured
here on the tables `python -m bench baselines` writes (a digit PNG per row, `truth`, and a
`label` column right on 9 rows of 10), each call in a process of its own: the samples of `label`
written when the table has none (create), then those of `truth` (a merge: the samples `truth`
teaches that `label` did not are added). Wall time and peak resident memory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench.bench_baselines import _table
from bench.bench_scale import run_measured
from bench.report import Section, table_section

MAKE = (
    "import json, sys; from lance_io.samples import label_samples; from lance_io.tasks import load_task; "
    "r = label_samples(sys.argv[1], load_task('digits'), sys.argv[2]); "
    "print(json.dumps({'samples': r.samples, 'added': r.added, 'removed': r.removed}))"
)
SIZES = tuple(int(s) for s in os.environ.get("LANCETAG_BENCH_SAMPLES_SIZES", "10000,100000,1000000").split(","))


def run(workdir: Path) -> Section:
    """Make the samples of two label columns at each size."""
    lines = ["| rows | `label`'s samples (create) | peak memory | `truth`'s samples (merge: added) | peak memory |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    figures = []
    for rows in SIZES:
        uri = _table(workdir, rows)
        made = [run_measured([sys.executable, "-c", MAKE, uri, column]) for column in ("label", "truth")]
        created, merged = (json.loads(m.stdout.strip().splitlines()[-1]) for m in made)
        figures.append((rows, made[0].seconds, max(m.peak_rss for m in made)))
        lines.append(f"| {rows:,} | {made[0].seconds:.1f} s ({created['samples']:,}) | {made[0].peak_rss / 2**20:.0f} MiB | "
                     f"{made[1].seconds:.1f} s ({merged['added']:,}) | {made[1].peak_rss / 2**20:.0f} MiB |")
    (small, small_s, small_rss), (large, large_s, large_rss) = figures[0], figures[-1]
    return table_section(
        "Samples from a label column as the table grows", __doc__, lines,
        f"From {small:,} to {large:,} rows ({large // small}x): the time grows {large_s / small_s:.0f}x (every labeled "
        f"row becomes a sample), the peak memory {large_rss / small_rss:.1f}x ({small_rss / 2**20:.0f} to "
        f"{large_rss / 2**20:.0f} MiB).",
    )

"""Validation's check before training, on tables of 10k, 100k and 1M rows.

    python -m bench validation

``plan_validation`` refuses a run whose validation share holds no row with a truth in the
task's set (``validation_no_rows``) before the first training step. It reads the id and truth
columns only and stops at the first validation row it finds. Measured on a registered table of
N rows (ids, a one-byte image, ten labels in turn; files of at most 250,000 rows): the usual
case, a validation share of 10% (found at once), and the refusal, a share that holds no row
(every row read). Best of 3 calls in this process.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.report import Section

SIZES = (10_000, 100_000, 1_000_000)
REPEATS = 3
LABELS = [str(d) for d in range(10)]


def _table(workdir: Path, rows: int) -> Path:
    """Write and register a table of ``rows`` labeled rows; return its dataset_dir."""
    import lance
    import pyarrow as pa

    from llamafactory_ext.register import register_dataset

    uri = str(workdir / f"t{rows}.lance")
    table = pa.table({
        "id": [f"{i:016x}" for i in range(rows)],
        "image": pa.array([b"x"] * rows, pa.binary()),
        "truth": [LABELS[i % len(LABELS)] for i in range(rows)],
    })
    lance.write_dataset(table, uri, max_rows_per_file=250_000)
    dataset_dir = workdir / f"lf{rows}"
    register_dataset(uri, "t", dataset_dir, task="digits", label_column="truth")
    return dataset_dir


def _seconds(dataset_dir: Path, fraction: float) -> tuple[float, bool]:
    """Return (best seconds, whether it refused) of the check on the entry at ``fraction``."""
    from llamafactory_ext.validation import ValidationError, require_validation_rows, validation_sources

    sources = validation_sources(dataset_dir, ["t"], fraction)
    best, refused = float("inf"), False
    for _ in range(REPEATS):
        started = time.perf_counter()
        try:
            require_validation_rows(sources)
        except ValidationError as err:
            refused = err.reason == "validation_no_rows"
        best = min(best, time.perf_counter() - started)
    return best, refused


def run(workdir: Path) -> Section:
    """Time the check at each size, with a 10% share and with an empty one."""
    lines = ["| rows | 10% share: first validation row found | no validation row: refused after reading every row |",
             "| ---: | ---: | ---: |"]
    figures = []
    for rows in SIZES:
        dataset_dir = _table(workdir, rows)
        found, refused_found = _seconds(dataset_dir, 0.1)
        none, refused_none = _seconds(dataset_dir, 1e-9)
        assert not refused_found and refused_none, (rows, refused_found, refused_none)
        figures.append((found, none))
        lines.append(f"| {rows:,} | {1000 * found:.1f} ms | {1000 * none:.0f} ms |")
    (small_found, small_none), (large_found, large_none) = figures[0], figures[-1]
    growth = SIZES[-1] // SIZES[0]
    body = "\n".join([
        __doc__.split("\n\n", 2)[2].strip(), "", *lines, "",
        f"From {SIZES[0]:,} to {SIZES[-1]:,} rows ({growth}x): the usual case goes from {1000 * small_found:.1f} "
        f"to {1000 * large_found:.1f} ms (it stops after about 1 / fraction rows), the refusal grows "
        f"{large_none / small_none:.0f}x with the rows (it reads every id and truth, and only when it refuses).",
    ])
    return Section(title="Validation's check before training", markdown=body)

"""`lancetag diff` on tables of 100k, 1M and 10M rows.

    python -m bench diff

`lance_io.diff` compares two versions a fragment at a time: fragments both versions share are
not compared, fragments whose rows stayed in place are compared row for row, and only rows that
moved are matched by id (past 250,000, in buckets by id written to a temporary folder).
Measured here: a table of N rows (sha256 ids, a `label` column, files of 250,000 rows), then a
label write that changes about 10% of the rows in every fragment in place (Lance's
`update_columns`, as `lancetag label` writes), then an append of 1% new rows, then a compaction
into files of a million rows (the target of Lance's own `compact_files`; `lancetag maintain`
merges only fragments under the table's fragment size), which moves every row. Each diff is
`lancetag diff TABLE A B [--column label] --json`, a process of its own: wall time and peak
resident memory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench.bench_scale import run_measured
from bench.report import Section, table_section

SIZES = tuple(int(s) for s in os.environ.get("LANCETAG_BENCH_DIFF_SIZES", "100000,1000000,10000000").split(","))
LANCETAG = str(Path(sys.executable).parent / "lancetag")
FILE_ROWS = 250_000


def _table(workdir: Path, rows: int) -> tuple[str, int, int]:
    """Write the table, relabel 10% of each fragment's rows in place, append 1%, compact; return the URI, the version
    before the label write and the compacted one."""
    import hashlib

    import lance
    import numpy as np
    import pyarrow as pa
    from lance import LanceOperation
    from lance.dataset import Transaction

    rng = np.random.default_rng(rows)
    uri = str(workdir / f"d{rows}.lance")

    def labels(n: int) -> pa.Array:
        return pa.array(rng.integers(10, size=n).astype(str))

    for start in range(0, rows, FILE_ROWS):
        ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(start, min(rows, start + FILE_ROWS))]
        lance.write_dataset(pa.table({"id": ids, "label": labels(len(ids))}), uri, mode="append" if start else "create",
                            max_rows_per_file=FILE_ROWS)
    ds = lance.dataset(uri)
    updated, fields = [], []
    for fragment in ds.get_fragments():
        ids = fragment.to_table(columns=["id"]).column("id")
        picked = ids.filter(pa.array(rng.random(len(ids)) < 0.1))
        meta, fields = fragment.update_columns(pa.table({"id": picked, "label": labels(len(picked))}), left_on="id", right_on="id")
        updated.append(meta)
    operation = LanceOperation.Update(updated_fragments=updated, fields_modified=fields)
    lance.LanceDataset.commit(uri, Transaction(ds.version, operation), read_version=ds.version)
    new = [hashlib.sha256(f"new {i}".encode()).hexdigest() for i in range(rows // 100)]
    lance.write_dataset(pa.table({"id": new, "label": labels(len(new))}), uri, mode="append")
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=1_000_000)  # reserves fragment ids, then rewrites
    return uri, ds.version, lance.dataset(uri).version


def run(workdir: Path) -> Section:
    """Time four diffs at each size: the label write, the append, both, and the three with the compaction."""
    lines = ["| rows | label write, `--column label`: rows changed | time | peak memory | append: rows added | time | "
             "peak memory | both, `--column label` | time | peak memory | the three and the compaction, `--column label` "
             "| time | peak memory |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    figures = []
    for rows in SIZES:
        uri, written, compacted = _table(workdir, rows)
        pairs = [(written, written + 1, ["--column", "label"]), (written + 1, written + 2, []),
                 (written, written + 2, ["--column", "label"]), (written, compacted, ["--column", "label"])]
        runs = [run_measured([LANCETAG, "diff", uri, str(a), str(b), *extra, "--json"]) for a, b, extra in pairs]
        found = [json.loads(r.stdout) for r in runs]
        counts = [f"{found[0]['changed']:,}", f"{found[1]['added']:,}",
                  *(f"{f['changed']:,} changed, {f['added']:,} added" for f in found[2:])]
        figures.append((rows, runs[0].seconds, max(r.peak_rss for r in runs[:3]), runs[3]))
        lines.append("| " + " | ".join([f"{rows:,}", *(f"{c} | {r.seconds:.1f} s | {r.peak_rss / 2**20:.0f} MiB"
                                                        for c, r in zip(counts, runs, strict=True))]) + " |")
    (small, small_s, small_rss, small_moved), (large, large_s, large_rss, large_moved) = figures[0], figures[-1]
    return table_section(
        "`lancetag diff` as the table grows", __doc__, lines,
        f"From {small:,} to {large:,} rows ({large // small}x): the label write's diff takes {large_s / small_s:.1f}x the "
        f"time (every fragment it touched is read), the peak memory of the first three {large_rss / small_rss:.1f}x "
        f"({small_rss / 2**20:.0f} to {large_rss / 2**20:.0f} MiB): a fragment at a time is held, not the table. Across "
        f"the compaction every row moved: {large_moved.seconds / small_moved.seconds:.1f}x the time and "
        f"{large_moved.peak_rss / small_moved.peak_rss:.1f}x the memory ({small_moved.peak_rss / 2**20:.0f} to "
        f"{large_moved.peak_rss / 2**20:.0f} MiB): the rows that moved are matched a bucket of ids at a time.",
    )

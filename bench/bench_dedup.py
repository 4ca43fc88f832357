"""The ingest's id lookups as the table grows: the known-content check and the truth check.

    python -m bench dedup

Every ingest looks up ids in the table it appends to. A task asks which of its images the table
already holds (``lance_io.table.existing_ids``: those are duplicates, not decoded again). Once a
chunk is committed, the driver asks the truth the table keeps for each labeled duplicate
(``lance_io.table.kept_truths``): a copy labeled otherwise is a ``truth_conflict``. Both are
``id IN (...)`` lookups through the ``id`` index. First each lookup alone, for 1,000 and 10,000
ids present in tables of 10k, 100k and 1M rows (fragments of 1,024 rows, as ingest writes them,
indexed as ingest leaves them; best of 3). Then a whole rerun (every image a duplicate) of 20,000
images, unlabeled and labeled by their folder, in one run: the labeled rerun is the one that pays
the truth check.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.report import Section

SIZES = (10_000, 100_000, 1_000_000)
PROBES = (1_000, 10_000)
RERUN_IMAGES = 20_000
RERUNS = 3
SUMMARY = """At a fixed number of ids both lookups grow with the table, less than in proportion: an id is
a content hash, so the ids of a lookup land in about as many fragments as there are ids (up to all
of them), and each fragment found is read for its rows. The cost is bounded by the ids looked up,
not by the rows. `kept_truths` also reads the `truth` and `source` of the rows it finds. Only
labeled duplicates pay it: a run of new images has none, and an unlabeled rerun looks nothing up."""


def _table(workdir: Path, rows: int) -> tuple[str, list[str]]:
    """Write an indexed table of ``rows`` labeled rows; return its URI and ids."""
    import lance
    import pyarrow as pa

    from lance_io.table import ensure_id_index

    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(rows)]
    table = pa.table({
        "id": ids,
        "image": pa.array([b"\x89PNG" + bytes(196)] * rows, pa.large_binary()),
        "source": [f"/data/photos/class{i % 37}/{i:08d}.png" for i in range(rows)],
        "truth": [f"class{i % 37}" for i in range(rows)],
    })
    uri = str(workdir / f"dedup-{rows}.lance")
    lance.write_dataset(table, uri, max_rows_per_file=1024)
    ensure_id_index(lance.dataset(uri))
    return uri, ids


def _existing(uri: str, ids: list[str]) -> set[str]:
    """The known-content check as a task runs it: open the table, look the ids up."""
    import lance

    from lance_io.table import existing_ids

    return existing_ids(lance.dataset(uri), ids)


def _best(call: Callable[[], object], times: int = 3) -> float:
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        spent.append(time.perf_counter() - started)
    return min(spent)


def _ingest(folders: list[Path], table: Path, *flags: str) -> dict:
    """The ``--json`` report of one ``lancetag ingest`` of ``folders`` into ``table`` (its own Ray)."""
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "ingest", *map(str, folders), "--table", str(table), "--json", *flags],
        capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rerun_seconds(folders: list[Path], table: Path, *flags: str) -> float:
    """The job seconds of an ingest that finds every image of ``folders`` in ``table`` already."""
    report = _ingest(folders, table, *flags)
    assert report["added"] == report["errors"] == 0 and report["duplicates"] == RERUN_IMAGES, report
    return report["seconds"]


def run(workdir: Path) -> Section:
    """Time both lookups at each size, then the reruns side by side; return the RESULTS.md section."""
    import numpy as np

    from bench.bench_scale import image_parts
    from lance_io.table import kept_truths

    lines = [
        (__doc__ or "").split("\n\n", 2)[2].strip(),
        "",
        "| rows | ids looked up | `existing_ids` | `kept_truths` | ratio | per id, `kept_truths` |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rng = np.random.default_rng(0)
    for rows in SIZES:
        uri, ids = _table(workdir, rows)
        for count in PROBES:
            probe = [ids[i] for i in rng.choice(rows, size=count, replace=False)]
            assert len(_existing(uri, probe)) == len(kept_truths(uri, None, probe)) == count
            known = _best(partial(_existing, uri, probe))
            truths = _best(partial(kept_truths, uri, None, probe))
            lines.append(f"| {rows:,} | {count:,} | {known:.3f} s | {truths:.3f} s | {truths / known:.2f}x | {1e6 * truths / count:.0f} µs |")

    folders = image_parts(RERUN_IMAGES)
    plain, labeled = workdir / "rerun-plain.lance", workdir / "rerun-labeled.lance"
    _ingest(folders, plain)
    _ingest(folders, labeled, "--label-from-dir")
    runs = [(_rerun_seconds(folders, plain), _rerun_seconds(folders, labeled, "--label-from-dir")) for _ in range(RERUNS)]
    lines += [
        "",
        f"| rerun of {RERUN_IMAGES:,} images (every one a duplicate) | unlabeled | labeled (the truth check) | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| run {n} | {a:.2f} s | {b:.2f} s | {b / a:.2f}x |" for n, (a, b) in enumerate(runs, 1)]
    lines += ["", SUMMARY]
    return Section("The ingest's id lookups (known content, kept truth) as the table grows", "\n".join(lines))

"""The ingest's id lookups as the table grows: the known-content check and the truth check, and the
truths a labeled rerun gives to rows held without one.

    python -m bench dedup

Every ingest looks up ids in the table it appends to. A task asks which of its images the table
already holds (``lance_io.table.existing_ids``: those are duplicates, not decoded again). Once a
chunk is committed, the driver asks the truth the table keeps for each labeled duplicate
(``lance_io.table.kept_truths``): a copy labeled otherwise is a ``truth_conflict``. Both are
``id IN (...)`` lookups through the ``id`` index. First each lookup alone, for 1,000 and 10,000
ids present in tables of 10k, 100k and 1M rows (fragments of 1,024 rows, as ingest writes them,
indexed as ingest leaves them; best of 3). Then a whole rerun (every image a duplicate) of 20,000
images, unlabeled and labeled by their folder, in one run: the labeled rerun is the one that pays
the truth check. A labeled copy of an image the table holds *without* a truth gives the row its
truth (``lance_io.columns.commit_values`` of ``truth`` alone, by id): that commit is timed for the
same ids in the same tables held unlabeled, and a labeled rerun into a copy of the unlabeled table
(every row gets its truth) runs beside the other two. The reruns' images sit in 20 class folders of
1,000. Before 2026-12-06 14:50 the bench gave those folders one by one as sources, so
``--label-from-dir`` found no class folder above an image: its "labeled" rerun carried no truth,
and the ratio it published (1.00-1.36x) measured no truth check. The bench now checks the truths are there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
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
labeled duplicates pay it: a run of new images has none, and an unlabeled rerun looks nothing up.
Giving truths to rows held without one adds a commit that looks the same ids up again and writes
a small data file of `truth` in every fragment they land in: it grows with the ids given and the
fragments they touch, never with the image bytes, which stay where they are."""


def _table(workdir: Path, rows: int, *, labeled: bool = True) -> tuple[str, list[str]]:
    """Write an indexed table of ``rows`` rows (``truth`` null unless ``labeled``); return its URI and ids."""
    import lance
    import pyarrow as pa

    from lance_io.table import ensure_id_index

    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(rows)]
    table = pa.table({
        "id": ids,
        "image": pa.array([b"\x89PNG" + bytes(196)] * rows, pa.large_binary()),
        "source": [f"/data/photos/class{i % 37}/{i:08d}.png" for i in range(rows)],
        "truth": pa.array([f"class{i % 37}" for i in range(rows)] if labeled else [None] * rows, pa.string()),
    })
    uri = str(workdir / f"dedup-{rows}{'' if labeled else '-unlabeled'}.lance")
    lance.write_dataset(table, uri, max_rows_per_file=1024)
    ensure_id_index(lance.dataset(uri))
    return uri, ids


def _existing(uri: str, ids: list[str]) -> set[str]:
    """The known-content check as a task runs it: open the table, look the ids up."""
    import lance

    from lance_io.table import existing_ids

    return existing_ids(lance.dataset(uri), ids)


def _give_truths(uri: str, ids: list[str]) -> None:
    """The commit a labeled rerun makes for rows held without a truth."""
    import pyarrow as pa

    from lance_io.columns import commit_values

    given = commit_values(uri, pa.table({"id": ids, "truth": ["given"] * len(ids)}), todo="truth IS NULL")
    assert given.rows == len(ids), given


def _restore(uri: str, version: int) -> None:
    """Make ``version`` of the table the latest again."""
    import lance

    lance.dataset(uri, version=version).restore()


def _addresses(uri: str, ids: list[str]) -> list[int]:
    """The Lance row addresses of ``ids`` (fragment id in the high 32 bits)."""
    import lance

    from lance_io.sql import sql_strings

    found = lance.dataset(uri).to_table(columns=["id"], filter=f"id IN ({sql_strings(ids)})", with_row_address=True)
    return found.column("_rowaddr").to_pylist()


def _best(call: Callable[[], object], times: int = 3, before: Callable[[], object] | None = None) -> float:
    """The fastest of ``times`` calls, each after ``before`` (untimed) if given."""
    spent = []
    for _ in range(times):
        if before is not None:
            before()
        started = time.perf_counter()
        call()
        spent.append(time.perf_counter() - started)
    return min(spent)


def _ingest(folders: list[Path], table: Path, *flags: str) -> dict:
    """The ``--json`` report of one ``lancetag ingest`` of ``folders`` into ``table`` (its own Ray)."""
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "ingest", *map(str, folders), "--table", str(table), "--json",
         "--allow-outside-root", *flags],
        capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _class_folders(workdir: Path, parts: list[Path]) -> Path:
    """A folder holding ``parts`` (links to them) as its class folders; return it."""
    root = workdir / "classes"
    root.mkdir()
    for part in parts:
        (root / part.name).symlink_to(part, target_is_directory=True)
    return root


def _rerun_seconds(folders: list[Path], table: Path, *flags: str, truths_added: int = 0) -> float:
    """The job seconds of an ingest that finds every image of ``folders`` in ``table`` already."""
    report = _ingest(folders, table, *flags)
    assert report["added"] == report["errors"] == 0 and report["duplicates"] == RERUN_IMAGES, report
    assert report["truths_added"] == truths_added, report
    return report["seconds"]


def run(workdir: Path) -> Section:
    """Time both lookups at each size, then the reruns side by side; return the RESULTS.md section."""
    import lance
    import numpy as np

    from bench.bench_scale import image_parts
    from lance_io.table import kept_truths

    lines = [
        (__doc__ or "").split("\n\n", 2)[2].strip(),
        "",
        "| rows | ids looked up | `existing_ids` | `kept_truths` | ratio | per id, `kept_truths` "
        "| truths given to those rows held without one: `commit_values` | fragments it writes |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rng = np.random.default_rng(0)
    for rows in SIZES:
        uri, ids = _table(workdir, rows)
        unlabeled, _ = _table(workdir, rows, labeled=False)
        written = lance.dataset(unlabeled).version
        for count in PROBES:
            probe = [ids[i] for i in rng.choice(rows, size=count, replace=False)]
            assert len(_existing(uri, probe)) == len(kept_truths(uri, None, probe)) == count
            known = _best(partial(_existing, uri, probe))
            truths = _best(partial(kept_truths, uri, None, probe))
            given = _best(partial(_give_truths, unlabeled, probe), before=partial(_restore, unlabeled, written))
            fragments = len({address >> 32 for address in _addresses(unlabeled, probe)})
            lines.append(
                f"| {rows:,} | {count:,} | {known:.3f} s | {truths:.3f} s | {truths / known:.2f}x "
                f"| {1e6 * truths / count:.0f} µs | {given:.3f} s | {fragments:,} |"
            )

    folders = [_class_folders(workdir, image_parts(RERUN_IMAGES))]  # a folder per class: --label-from-dir has truths
    plain, labeled = workdir / "rerun-plain.lance", workdir / "rerun-labeled.lance"
    _ingest(folders, plain)
    _ingest(folders, labeled, "--label-from-dir")
    assert lance.dataset(str(labeled)).count_rows("truth IS NULL") == 0, "the labeled rerun must carry truths to check"
    runs = []
    for n in range(RERUNS):
        held = workdir / f"rerun-held-unlabeled-{n}.lance"
        shutil.copytree(plain, held)
        runs.append((
            _rerun_seconds(folders, plain),
            _rerun_seconds(folders, labeled, "--label-from-dir"),
            _rerun_seconds(folders, held, "--label-from-dir", truths_added=RERUN_IMAGES),
        ))
    lines += [
        "",
        f"| rerun of {RERUN_IMAGES:,} images (every one a duplicate) | unlabeled | labeled (the truth check) | ratio "
        "| labeled, into the table held unlabeled (every truth given) | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| run {n} | {a:.2f} s | {b:.2f} s | {b / a:.2f}x | {c:.2f} s | {c / a:.2f}x |" for n, (a, b, c) in enumerate(runs, 1)]
    lines += ["", SUMMARY]
    return Section("The ingest's id lookups (known content, kept truth) and the truths it gives, as the table grows", "\n".join(lines))

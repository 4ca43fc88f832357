"""`lancetag eval --baseline-train` on tables of 10k, 100k and 1M rows.

    python -m bench baselines

The pixel baselines are fitted on at most 5,000 training rows and scored on at most 20,000
evaluated rows, both chosen by id hash, so their cost should not grow with the table beyond
finding those rows. Measured here: a table of N rows as ingest writes them (a digit PNG of
28x28 per row, about 400 bytes; `truth`, a `label` column right on 9 rows of 10, a `split`
column holding 20% `test` by id hash, the `id` BTREE index; files of at most 250,000 rows),
then `lancetag eval TABLE --where "split = 'test'" --json` with and without `--baseline-train
"split = 'train'"`, each a process of its own: wall time and peak resident memory. On the same
table, the demo's recipe step (`ray_jobs.demo.training_recipe`: the mirror and jitter checks on at
most 2,000 training rows chosen by id hash, their images alone read) in a process of its own, and
the vision warm-up's rows (`llamafactory_ext.vision_warmup`: at most 20,000 training rows chosen by
id hash from their ids and labels, their images alone read; the table registered as an entry of
the `split = 'train'` rows, validation's 10% held back) and its pixel teacher
(`llamafactory_ext.pixel_teacher`: an RBF SVM's out-of-fold probabilities for those rows, each of
its five fits on at most 4,000 rows), in a process of its own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench.bench_scale import run_measured
from bench.report import Section, table_section

RECIPE = (
    "import json, sys, lance; from ray_jobs.demo import training_recipe; "
    "r = training_recipe(sys.argv[1], lance.dataset(sys.argv[1]).version); "
    "print(json.dumps({'profiled': r.evidence['profiled_rows'], 'flip': r.flip}))"
)
WARMUP = (
    "import json, sys; from llamafactory_ext.vision_warmup import _training_rows; "
    "from llamafactory_ext.pixel_teacher import teacher_probabilities; "
    "images, labels, classes, total = _training_rows({'dataset_dir': sys.argv[1], 'dataset': 'digits'}); "
    "_, teacher = teacher_probabilities(images, labels, len(classes), seed=42); "
    "print(json.dumps({'rows': len(images), 'training_rows': total, 'teacher': teacher}))"
)
SIZES = tuple(int(s) for s in os.environ.get("LANCETAG_BENCH_BASELINE_SIZES", "10000,100000,1000000").split(","))
LANCETAG = str(Path(sys.executable).parent / "lancetag")


def _table(workdir: Path, rows: int) -> str:
    """Write a labeled, split table of ``rows`` digit images with the id index; return its URI."""
    import hashlib

    import lance
    import pyarrow as pa

    from bench.data import digit_images
    from lance_io.splits import split_of

    pool = digit_images(1797, size=28)
    uri = str(workdir / f"t{rows}.lance")
    step = 250_000
    for start in range(0, rows, step):
        index = range(start, min(rows, start + step))
        ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in index]
        images, truth = zip(*(pool[i % len(pool)] for i in index), strict=True)
        label = [t if i % 10 else str((int(t) + 1) % 10) for i, t in zip(index, truth, strict=True)]
        part = pa.table({
            "id": ids, "image": pa.array(images, pa.binary()), "truth": list(truth), "label": label,
            "split": [split_of(i, 0.2, held_out="test") for i in ids],
        })
        lance.write_dataset(part, uri, mode="append" if start else "create", max_rows_per_file=step)
    lance.dataset(uri).create_scalar_index("id", index_type="BTREE")
    return uri


def run(workdir: Path) -> Section:
    """Time `lancetag eval` with and without the baselines, the recipe step and the warm-up's rows at each size."""
    from llamafactory_ext.register import register_dataset

    lines = [
        "| rows | held out | eval alone | with the baselines | baselines' share | peak memory, alone / with | "
        "baselines' rows (train / scored) | recipe step, peak memory (rows profiled, mirror) | "
        "warm-up's rows and teacher, peak memory (rows chosen of training rows) | of which the teacher (rows a fit, "
        "out-of-fold accuracy) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    figures = []
    for rows in SIZES:
        uri = _table(workdir, rows)
        common = [LANCETAG, "eval", uri, "--where", "split = 'test'", "--json"]
        alone = run_measured(common)
        both = run_measured([*common, "--baseline-train", "split = 'train'"])
        result = json.loads(both.stdout.strip().splitlines()[-1])
        svm = result["baselines"]["label"][-1]
        held_out = result["evaluations"]["label"]["rows"]
        recipe = run_measured([sys.executable, "-c", RECIPE, uri])
        chosen = json.loads(recipe.stdout.strip().splitlines()[-1])
        entries = workdir / f"data{rows}"
        register_dataset(uri, "digits", entries, label_column="truth", where="split = 'train'", split="train")
        warmup = run_measured([sys.executable, "-c", WARMUP, str(entries)])
        warm = json.loads(warmup.stdout.strip().splitlines()[-1])
        extra = both.seconds - alone.seconds
        figures.append((rows, extra, svm["rows"]))
        lines.append(
            f"| {rows:,} | {held_out:,} | {alone.seconds:.1f} s | {both.seconds:.1f} s | {extra:.1f} s | "
            f"{alone.peak_rss / 2**20:.0f} / {both.peak_rss / 2**20:.0f} MiB | {svm['train_rows']:,} / {svm['rows']:,} | "
            f"{recipe.seconds:.1f} s, {recipe.peak_rss / 2**20:.0f} MiB ({chosen['profiled']:,}, {'on' if chosen['flip'] else 'off'}) | "
            f"{warmup.seconds:.1f} s, {warmup.peak_rss / 2**20:.0f} MiB ({warm['rows']:,} of {warm['training_rows']:,}) | "
            f"{warm['teacher']['seconds']:.1f} s ({warm['teacher']['fit_rows']:,}, {warm['teacher']['accuracy']:.1%}) |"
        )
    (small, small_extra, _), (large, large_extra, large_scored) = figures[0], figures[-1]
    last_step = ""
    if len(figures) > 1:
        before, before_extra, before_scored = figures[-2]
        last_step = (f" From {before:,} to {large:,} rows, which score {before_scored:,} and {large_scored:,} rows, "
                     f"{before_extra:.1f} s to {large_extra:.1f} s.")
    return table_section(
        "Pixel baselines, the demo's recipe and the vision warm-up's rows and teacher as the table grows", __doc__, lines,
        f"From {small:,} to {large:,} rows ({large // small}x), the baselines' share of the time goes from "
        f"{small_extra:.1f} s to {large_extra:.1f} s ({large_extra / small_extra:.1f}x).{last_step}",
    )

"""The check that no training example of a Lance entry is cut to ``cutoff_len``, as the table grows.

    python -m bench cutoff

``llamafactory_ext.cutoff.preprocess_uncut`` runs LLaMA-Factory's preprocessing once, with the limit
lifted, then reads the examples' lengths. First, side by side on real data: LLaMA-Factory's
``get_dataset`` on the 1,797 scikit-learn digits from a Lance entry, with the check and with
LLaMA-Factory's own preprocessing alone (best of ``REPEATS``, alternated). Then the pass over the
lengths alone, on preprocessed datasets of 10k, 100k and 1M examples of 300-400 tokens held on disk
(memory-mapped Arrow, as LLaMA-Factory's preprocessing leaves them), none too long: its cost is
the part that grows with the rows, where LLaMA-Factory's own tokenizing grows with them too and
costs far more per example.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from bench.report import Section

REPEATS = 3
SIZES = (10_000, 100_000, 1_000_000)
LIMIT = 400


def _real(workdir: Path) -> tuple[float, float]:
    """Return (seconds with the check, seconds without) of ``get_dataset`` on the digits' Lance entry."""
    import llamafactory.data.loader as loader

    import llamafactory_ext
    from bench.bench_lf import _measure, _prepare

    llamafactory_ext.activate()
    data_dir, model, _ = _prepare(workdir)
    checked, plain = loader._get_preprocessed_dataset, loader._get_preprocessed_dataset.__wrapped__
    best = {"with": float("inf"), "without": float("inf")}
    for k in range(REPEATS):
        for name, function in (("with", checked), ("without", plain)):
            loader._get_preprocessed_dataset = function
            seconds, _ = _measure(data_dir, model, "lance", workdir / f"{name}-{k}", streaming=False)
            best[name] = min(best[name], seconds)
    loader._get_preprocessed_dataset = checked
    return best["with"], best["without"]


def _lengths_pass(workdir: Path, rows: int) -> tuple[float, float]:
    """Return (seconds of the check over ``rows`` preprocessed examples on disk, their GB on disk)."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset, load_from_disk

    from llamafactory_ext.cutoff import preprocess_uncut

    sizes = np.random.default_rng(0).integers(300, LIMIT + 1, rows)
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]), pa.int64())
    ids = pa.LargeListArray.from_arrays(offsets, pa.array(np.ones(int(sizes.sum()), dtype=np.int64)))
    path = workdir / f"examples-{rows}"
    Dataset(pa.table({"input_ids": ids})).save_to_disk(str(path))
    processed = load_from_disk(str(path))
    start = time.perf_counter()
    kept = preprocess_uncut(lambda *_args, **_kwargs: processed, None, SimpleNamespace(cutoff_len=LIMIT))
    seconds = time.perf_counter() - start
    assert kept is processed
    return seconds, sum(p.stat().st_size for p in path.rglob("*.arrow")) / 1e9


def run(workdir: Path) -> Section:
    """Measure the check on real data and over growing tables; return the RESULTS.md section."""
    import os

    os.environ["HF_DATASETS_CACHE"] = str(workdir / "hf-default-cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    checked, plain = _real(workdir / "real")
    lines = [
        (__doc__ or "").split("\n\n", 2)[2].strip(),
        "",
        "| `get_dataset`, 1,797 digits from Lance | seconds |",
        "| --- | ---: |",
        f"| LLaMA-Factory's preprocessing alone | {plain:.2f} |",
        f"| with the check | {checked:.2f} ({checked / plain:.2f}x) |",
        "",
        "| preprocessed examples | on disk | the check's pass | per million examples |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for rows in SIZES:
        seconds, gigabytes = _lengths_pass(workdir, rows)
        lines.append(f"| {rows:,} | {gigabytes:.2f} GB | {seconds:.3f} s | {seconds * 1e6 / rows:.2f} s |")
    return Section("Training from Lance: the check that no example is cut, as the table grows", "\n".join(lines))

"""Validation inside training as the table grows: the check before training, the plan, one evaluation.

    python -m bench validation

Measured on a registered table of N rows (ids, 1 KB of random bytes as the image, ten labels in
turn, the `id` BTREE index ingest creates; files of at most 250,000 rows), `validation:
{fraction: 0.1}` with the default `max_rows` (5,000), best of 3 calls in this process:

- the check (``require_validation_rows``), which refuses a run whose validation share holds no
  row with a truth in the task's set before the first training step: it reads ids and truths and
  stops at the first validation row; the refusal (a share that holds no row) reads every row;
- the plan (``plan_validation``, once a run): the share held back (the fraction, or `max_rows`
  over the rows), then the ids of the rows in it, from the id and truth columns;
- one evaluation (``scored_rows``): those rows' images read by id and handed to a labeler that
  answers without a model, so what is timed is the platform's part; a model's is per row asked.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from bench.report import Section, table_section

SIZES = (10_000, 100_000, 1_000_000)
REPEATS = 3
LABELS = [str(d) for d in range(10)]


def _table(workdir: Path, rows: int) -> Path:
    """Write and register a table of ``rows`` labeled rows; return its dataset_dir."""
    import lance
    import pyarrow as pa

    from llamafactory_ext.register import register_dataset

    uri = str(workdir / f"t{rows}.lance")
    step = 250_000
    for start in range(0, rows, step):
        index = range(start, min(rows, start + step))
        part = pa.table({
            "id": [f"{i:016x}" for i in index],
            "image": pa.array([os.urandom(1024) for _ in index], pa.binary()),
            "truth": [LABELS[i % len(LABELS)] for i in index],
        })
        lance.write_dataset(part, uri, mode="append" if start else "create", max_rows_per_file=step)
    lance.dataset(uri).create_scalar_index("id", index_type="BTREE")
    dataset_dir = workdir / f"lf{rows}"
    register_dataset(uri, "t", dataset_dir, task="digits", label_column="truth")
    return dataset_dir


def _best(call: Callable[[], object]) -> tuple[float, object]:
    """Return (best seconds of ``REPEATS`` calls, the last call's result)."""
    best, result = float("inf"), None
    for _ in range(REPEATS):
        started = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - started)
    return best, result


def _check(dataset_dir: Path, fraction: float) -> tuple[float, bool]:
    """Return (best seconds, whether it refused) of the check on the entry at ``fraction``."""
    from llamafactory_ext.validation import ValidationError, require_validation_rows, validation_sources

    sources = validation_sources(dataset_dir, ["t"], fraction)

    def check() -> bool:
        try:
            require_validation_rows(sources)
        except ValidationError as err:
            return err.reason == "validation_no_rows"
        return False

    return _best(check)  # type: ignore[return-value]


def _plan_and_evaluate(dataset_dir: Path, workdir: Path) -> tuple[float, float, float, int]:
    """Return (plan seconds, one evaluation's seconds, fraction held back, rows asked per evaluation)."""
    import json

    from llamafactory_ext.validation import plan_validation, scored_rows
    from llamafactory_ext.validation_curve import ValidationOptions
    from ray_jobs.evaluation.in_training import transformers_labeler
    from serve_apps.results import LabelResult

    info = (dataset_dir / "dataset_info.json").read_text()
    args = {"dataset": "t", "dataset_dir": str(dataset_dir), "model_name_or_path": "m", "output_dir": str(workdir / "out")}

    def plan() -> object:
        (dataset_dir / "dataset_info.json").write_text(info)  # the plan rewrites the entry it splits
        return plan_validation(args, ValidationOptions(fraction=0.1), transformers_labeler)[0]

    def answer(images: list[bytes], task: object) -> list[LabelResult]:
        return [LabelResult(task="digits", kind="classify", label="1", confidence=0.5, model_id="none",
                            task_hash="none", backend="bench") for _ in images]

    planning, validation = _best(plan)
    evaluating, scored = _best(lambda: list(scored_rows(answer, validation.rows)))  # type: ignore[attr-defined]
    assert json.loads(info)["t"]["lance"]["split"] == "all"
    return planning, evaluating, validation.fraction, len(scored)  # type: ignore[attr-defined, arg-type]


def run(workdir: Path) -> Section:
    """Time the check, the plan and one evaluation at each size."""
    lines = [
        "| rows | check: first validation row found | check: refused after reading every row | "
        "share held back (rows) | plan, once a run | one evaluation's reads |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    figures = []
    for rows in SIZES:
        dataset_dir = _table(workdir, rows)
        found, refused_found = _check(dataset_dir, 0.1)
        none, refused_none = _check(dataset_dir, 1e-9)
        assert not refused_found and refused_none, (rows, refused_found, refused_none)
        planning, evaluating, fraction, asked = _plan_and_evaluate(dataset_dir, workdir)
        figures.append((found, none, planning, evaluating, asked))
        lines.append(f"| {rows:,} | {1000 * found:.1f} ms | {1000 * none:.0f} ms | {fraction:.2%} ({asked:,}) | "
                     f"{planning:.2f} s | {evaluating:.2f} s |")
    small, large = figures[0], figures[-1]
    growth = SIZES[-1] // SIZES[0]
    return table_section(
        "Validation inside training as the table grows", __doc__, lines,
        f"From {SIZES[0]:,} to {SIZES[-1]:,} rows ({growth}x): the check's usual case goes from "
        f"{1000 * small[0]:.1f} to {1000 * large[0]:.1f} ms (it stops after about 1 / fraction rows), its "
        f"refusal grows {large[1] / small[1]:.0f}x with the rows (it reads every id and truth, and only when it "
        f"refuses); the plan grows {large[2] / small[2]:.0f}x (every id and truth, once a run); an evaluation asks "
        f"about {small[4]:,} then {large[4]:,} rows and reads them in {small[3]:.2f} then {large[3]:.2f} s.",
    )

"""`lancetag eval`: compare a label column with a truth column at a table version; write a report.

Next to the model's figures: classical baselines fitted on another filter's rows
(:mod:`ray_jobs.evaluation.baselines`) and, when the labels came from a model trained with
validation, that run's validation curve (from its ``lancetag_lineage.json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lance_io.image_size import LINEAGE_FILE
from lance_io.reasons import ReasonError
from ray_jobs.evaluation.baselines import Baseline, table_baselines
from ray_jobs.evaluation.metrics import Evaluation, Tally
from ray_jobs.evaluation.report import REFERENCE_COSTS, confusion_png, cost_per_1000, html_report

if TYPE_CHECKING:
    import pyarrow as pa

SCAN_BATCH = 65_536
"""Rows read at a time: the answer, truth and confidence columns of a batch are all eval holds of the table."""
DEFAULT_PRICE_PER_HOUR = 0.10
"""Hourly price of the machine that labeled, in dollars (a 2-core cloud VM is about this)."""


@dataclass
class EvalResult:
    """Evaluation of one or more column/truth pairs, with throughput, cost and where the report is."""

    table: str
    version: int
    column: str
    truth: str
    evaluations: dict[str, Evaluation]
    images_per_second: float | None = None
    cost_per_1000: float | None = None
    price_per_hour: float = DEFAULT_PRICE_PER_HOUR
    report: str | None = None
    lineage: dict[str, str] = field(default_factory=dict)
    baselines: dict[str, list[Baseline]] = field(default_factory=dict)
    training: dict | None = None

    @property
    def accuracy(self) -> float:
        """Mean accuracy over the evaluated pairs (one pair unless an attribute task)."""
        return sum(e.accuracy for e in self.evaluations.values()) / len(self.evaluations)


def _pairs(schema_names: list[str], column: str, truth: str) -> dict[str, tuple[str, str]]:
    """Answer/truth column pairs by question key (:func:`lance_io.labels.answer_columns_in`)."""
    from lance_io.labels import answer_columns_in
    from lance_io.scan import TableReadError

    answers, truths = answer_columns_in(schema_names, column), answer_columns_in(schema_names, truth)
    if not answers:
        raise TableReadError("column_missing", f"no label column {column!r} or {column}_<attribute> columns (columns: {', '.join(schema_names)})")
    if len(answers) == 1 and len(truths) == 1:
        (key, answer), (truth_column,) = next(iter(answers.items())), truths.values()
        return {key: (answer, truth_column)}
    if len(answers) > 1:  # one truth_<key> per answer, also beside a `truth` column (every ingested table has one)
        truths = answer_columns_in([name for name in schema_names if name != truth], truth)
    pairs = {key: (answer, truths[key]) for key, answer in answers.items() if key in truths}
    if not pairs:
        raise TableReadError("column_missing", f"no truth column {truth!r} or {truth}_<attribute> columns matching {', '.join(answers.values())}")
    return pairs


def _refuse_free_text(schema: pa.Schema, column: str, answers: list[str]) -> None:
    """Refuse answer columns a caption task wrote: accuracy and confusion need a closed answer set."""
    from lance_io.labels import kind_of
    from lance_io.reasons import ReasonError

    if any(kind_of(schema, answer) == "caption" for answer in answers):
        raise ReasonError(
            "free_text",
            f"{column!r} holds captions (free text): exact-match accuracy, per-class scores and a confusion "
            f"matrix mean nothing there; compare two runs with `lancetag diff TABLE A B --column {column}` "
            f"or read them with `lancetag query TABLE --columns id,{column}`",
        )


def _throughput(
    runs: dict[str, dict], recorded_at: dict[str, int], column: str, version: int
) -> tuple[float | None, dict[str, str]]:
    """Images/s and lineage of the latest label run of ``column`` at or before ``version``.

    ``recorded_at`` maps a run id to the version its summary was stored in (the summary itself
    is written before that version exists, so it cannot say).
    """
    candidates = [
        (recorded_at[run_id], r)
        for run_id, r in runs.items()
        if r.get("operation") == "label" and r.get("column") == column and r.get("labeled")
        and recorded_at.get(run_id, version + 1) <= version
    ]
    if not candidates:
        return None, {}
    _, last = max(candidates, key=lambda pair: pair[0])
    seconds = float(last.get("seconds") or 0)
    ips = float(last["labeled"]) / seconds if seconds else None
    lineage = {"labels_written_by": f"label run {last.get('run_id')}", "model": str(last.get("model")), "adapter": str(last.get("adapter") or "")}
    return ips, lineage


def training_record(lineage: dict[str, str]) -> dict | None:
    """Return the validation curve of the run that trained the labeling model (adapter, else model), or None."""
    for folder in (lineage.get("adapter"), lineage.get("model")):
        path = Path(folder) / LINEAGE_FILE if folder and "://" not in folder else None
        if path is not None and path.is_file():
            return json.loads(path.read_text()).get("validation")
    return None


def evaluate_table(
    table: str,
    column: str,
    truth: str = "truth",
    *,
    version: int | str | None = None,
    where: str | None = None,
    report_dir: str | Path | None = None,
    price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
    storage_options: dict[str, str] | None = None,
    baseline_train: str | None = None,
) -> EvalResult:
    """Evaluate ``column`` against ``truth`` on the rows matching ``where`` at ``version``.

    With ``baseline_train`` (a SQL filter, e.g. ``"split = 'train'"``), classical baselines are fitted
    on those rows and scored on the same rows as the model. With ``report_dir``, writes
    ``confusion.png`` (per attribute for attribute tasks), ``report.html`` and ``metrics.json`` there.
    """
    from lance_io import open_table
    from lance_io.scan import one_predicate, scan_batches
    from lance_io.versions import recorded_runs

    one_predicate(where)
    one_predicate(baseline_train)
    ds = open_table(table, version, storage_options=storage_options)
    pairs = _pairs(ds.schema.names, column, truth)
    _refuse_free_text(ds.schema, column, [answer for answer, _ in pairs.values()])
    confidence, errors = (c if c in ds.schema.names else None for c in (f"{column}_confidence", f"{column}_error"))
    needed = sorted({c for pair in pairs.values() for c in pair} | {c for c in (confidence, errors) if c})
    tallies = {name: Tally() for name in pairs}
    scanned = 0
    for batch in scan_batches(ds, needed, where=where, batch_size=SCAN_BATCH):
        scanned += batch.num_rows
        for name, (c, t) in pairs.items():
            tallies[name].add(batch[t], batch[c], batch[confidence] if confidence else None, batch[errors] if errors else None)
    evaluations = {name: tally.evaluation() for name, tally in tallies.items()}
    for name, (_c, t) in pairs.items():
        if not evaluations[name].rows:
            rows = f"{scanned} row(s) matching {where!r}" if where else f"{scanned} row(s)"
            raise ReasonError("no_rows", f"none of the {rows} of {table} at version {ds.version} has a {t} value: "
                              "nothing to evaluate; check --where and --truth")
    runs = recorded_runs(table, storage_options=storage_options)  # one pass over the versions' transactions
    recorded_at = {run: version for run, (version, _) in runs.items() if version is not None}
    ips, lineage = _throughput({run: summary for run, (_, summary) in runs.items()}, recorded_at, column, ds.version)
    lineage["evaluated_version"] = str(ds.version)
    baselines = {}
    if baseline_train is not None:
        baselines = {name: table_baselines(ds, t, c, baseline_train, where) for name, (c, t) in pairs.items()}
    result = EvalResult(
        table=table, version=ds.version, column=column, truth=truth, evaluations=evaluations,
        images_per_second=ips, cost_per_1000=cost_per_1000(ips, price_per_hour) if ips else None,
        price_per_hour=price_per_hour, lineage=lineage, baselines=baselines, training=training_record(lineage),
    )
    if report_dir is not None:
        result.report = str(write_report(result, Path(report_dir)))
    return result


def write_report(result: EvalResult, out: Path) -> Path:
    """Write PNG(s), report.html and metrics.json for ``result`` into ``out``; return the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    costs = dict(REFERENCE_COSTS)
    if result.cost_per_1000 is not None:
        costs = {
            f"this run: {result.images_per_second:.1f} images/s at ${result.price_per_hour:.2f}/h": result.cost_per_1000,
            **costs,
        }
    pages = []
    for name, evaluation in result.evaluations.items():
        png = out / (f"confusion-{name}.png" if len(result.evaluations) > 1 else "confusion.png")
        if evaluation.confusion:
            cells = confusion_png(evaluation, png, title=name)
        else:  # past MATRIX_CLASSES: no matrix, and no PNG of an earlier report left beside this one
            png.unlink(missing_ok=True)
            png, cells = None, {}
        facts = {"table": result.table, "version": str(result.version), "column": name, "truth": result.truth, **result.lineage}
        pages.append(html_report(evaluation, png, cells, title=f"lancetag eval: {name}", facts=facts, costs=costs,
                                 baselines=result.baselines.get(name, []), training=result.training))
    page = pages[0] if len(pages) == 1 else "\n".join(pages)
    (out / "report.html").write_text(page)
    metrics = {
        "table": result.table, "version": result.version, "accuracy": result.accuracy,
        "images_per_second": result.images_per_second, "cost_per_1000": result.cost_per_1000,
        "lineage": result.lineage, "evaluations": {k: asdict(v) for k, v in result.evaluations.items()},
        "baselines": {k: [asdict(b) for b in v] for k, v in result.baselines.items()}, "training": result.training,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out / "report.html"

"""Evaluation reports people can open: a confusion-matrix PNG and a self-contained HTML page."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ray_jobs.evaluation.baselines import Baseline, describe_verdict
from ray_jobs.evaluation.metrics import Evaluation

# Published reference points (source articles): cost per 1,000 images.
REFERENCE_COSTS = {
    "fine-tuned LLaVA-1.6-Mistral-7B on vLLM, 1x A10G (article)": 0.26,
    "GPT-4o API (article)": 5.54,
}


def cost_per_1000(images_per_second: float, price_per_hour: float) -> float:
    """Return the dollars it costs to label 1,000 images at this throughput and hourly price."""
    return price_per_hour / (images_per_second * 3600.0) * 1000.0


Cells = dict[tuple[int, int], tuple[int, int, int]]
"""(truth index, predicted index) -> (x, y, half-width) of the cell in the PNG, in pixels."""


def confusion_png(evaluation: Evaluation, path: Path, title: str = "confusion matrix") -> Cells:
    """Draw the confusion matrix (rows: truth, columns: predicted) with counts; return the cell positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(evaluation.classes)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    matrix = evaluation.confusion or [[0]]
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), evaluation.classes, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), evaluation.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title)
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    height = fig.get_size_inches()[1] * fig.dpi
    cells: Cells = {}
    for i in range(n):
        for j in range(n):
            x, y = ax.transData.transform((j, i))
            x1, _ = ax.transData.transform((j + 0.5, i))
            cells[(i, j)] = (round(x), round(height - y), max(1, round(x1 - x)))
    plt.close(fig)
    return cells


def html_report(
    evaluation: Evaluation,
    png: Path | None,
    cells: Cells,
    *,
    title: str,
    facts: dict[str, str],
    costs: dict[str, float],
    baselines: list[Baseline] | None = None,
    training: dict | None = None,
) -> str:
    """Return a self-contained HTML page: headline figures, baselines, per-class table, confusion, costs.

    ``png``: the confusion matrix drawn by :func:`confusion_png` (None past ``MATRIX_CLASSES`` classes).
    ``training``: the validation record of the run that trained the model (its curve), if any.
    """
    esc = html.escape
    fact_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts.items())
    class_rows = "".join(
        f"<tr><td>{esc(c)}</td><td>{m.precision:.3f}</td><td>{m.recall:.3f}</td><td>{m.f1:.3f}</td><td>{m.support}</td></tr>"
        for c, m in evaluation.per_class.items()
    )
    cost_rows = "".join(f"<tr><td>{esc(k)}</td><td>${v:.4f}</td></tr>" for k, v in costs.items())
    baseline_section = _baselines_html(evaluation, baselines) if baselines else ""
    training_section = _training_html(training) if training else ""
    conf = "n/a" if evaluation.mean_confidence is None else f"{evaluation.mean_confidence:.3f}"
    ece = "n/a" if evaluation.calibration_error is None else f"{evaluation.calibration_error:.3f}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}.big{{font-size:2em;font-weight:bold}}</style></head>
<body>
<h1>{esc(title)}</h1>
<p><span class="big" id="accuracy">{100 * evaluation.accuracy:.1f}%</span> accuracy on {evaluation.rows} rows with truth;
coverage {100 * evaluation.coverage:.1f}% ({evaluation.labeled} labeled, {evaluation.invalid} invalid);
macro F1 {evaluation.macro_f1:.3f}; mean confidence {conf}; calibration error (ECE) {ece}.</p>
<table id="facts">{fact_rows}</table>
{baseline_section}{training_section}<h2>Per class</h2>
<table id="per-class"><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{class_rows}</table>
{_confusion_html(evaluation, png, cells)}<h2>Cost per 1,000 images</h2>
<table id="costs"><tr><th>labeler</th><th>$ / 1,000 images</th></tr>{cost_rows}</table>
</body></html>
"""


def _confusion_html(evaluation: Evaluation, png: Path | None, cells: Cells) -> str:
    """The confusion matrix image with a tooltip per cell (or why there is none), then the commonest wrong answers."""
    esc = html.escape
    if png is None:
        matrix = f"<p>{esc('; '.join(evaluation.notes))}</p>"
    else:
        image = base64.b64encode(png.read_bytes()).decode()
        areas = "".join(
            f'<area shape="rect" coords="{x - r},{y - r},{x + r},{y + r}" '
            f'title="truth {esc(evaluation.classes[i])}, predicted {esc(evaluation.classes[j])}: {evaluation.confusion[i][j]}">'
            for (i, j), (x, y, r) in cells.items()
        )
        matrix = f'<img id="confusion" alt="confusion matrix" usemap="#cells" src="data:image/png;base64,{image}">\n<map name="cells">{areas}</map>'
    pairs = "".join(f"<tr><td>{esc(t)}</td><td>{esc(a)}</td><td>{n}</td></tr>" for t, a, n in evaluation.most_confused)
    confused = (f'<h3>Most confused</h3>\n<table id="most-confused"><tr><th>truth</th><th>answer</th><th>rows</th></tr>{pairs}</table>\n'
                if pairs else "")
    return f"<h2>Confusion matrix</h2>\n{matrix}\n{confused}"


def _baselines_html(evaluation: Evaluation, baselines: list[Baseline]) -> str:
    """The model's accuracy and each classical baseline's, on the same rows."""
    esc = html.escape
    rows = f"<tr><td>this model</td><td>{100 * evaluation.accuracy:.1f}%</td><td>{evaluation.rows}</td><td></td><td></td></tr>"
    for b in baselines:
        overlap = f" ({b.overlap} evaluated rows among them)" if b.overlap else ""
        scored = str(b.rows) if b.rows == evaluation.rows else (
            f"{b.rows} of {evaluation.rows}, chosen by id hash (this model: {100 * b.model_accuracy:.1f}% on them)")
        rows += (
            f"<tr><td>{esc(b.name)}</td><td>{100 * b.accuracy:.1f}%</td><td>{esc(scored)}</td>"
            f"<td>{b.train_rows} rows where {esc(b.train_filter)}{esc(overlap)}</td><td>{esc(describe_verdict(b))}</td></tr>"
        )
    better = max(baselines, key=lambda b: b.accuracy)
    return (
        f"<h2>Baselines on the same rows</h2>\n<p id=\"verdict\">Against the better baseline, {esc(better.name)}, "
        f"this model is <b>{esc(describe_verdict(better))}</b>.</p>\n"
        "<table id=\"baselines\"><tr><th>model</th><th>accuracy</th>"
        f"<th>rows</th><th>trained on</th><th>this model against it</th></tr>{rows}</table>\n"
    )


def _training_html(training: dict) -> str:
    """The validation curve of the training run: step, epoch, validation accuracy, train loss."""
    best = (training.get("best") or {}).get("step")
    rows = ""
    for p in training.get("points", []):
        loss = "n/a" if p.get("train_loss") is None else f"{p['train_loss']:.4f}"
        mark = " (kept)" if p.get("step") == best else ""
        rows += (
            f"<tr><td>{p['step']}{mark}</td><td>{p['epoch']:.2f}</td>"
            f"<td>{100 * p['validation_accuracy']:.1f}%</td><td>{loss}</td></tr>"
        )
    stopped = "stopped early" if training.get("stopped_early") else "ran to the end"
    return (
        f"<h2>Validation during training</h2>\n<p>{training.get('rows', 0)} validation rows "
        f"(fraction {training.get('fraction')}), {stopped}; the weights of the best step were kept.</p>\n"
        "<table id=\"training\"><tr><th>step</th><th>epoch</th><th>validation accuracy</th>"
        f"<th>train loss</th></tr>{rows}</table>\n"
    )

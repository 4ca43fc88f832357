"""The README's main job, `lancetag demo`, as a user runs it, on several real image sets.

Per set: accuracy before/after fine-tuning, the two classical pixel baselines on the same held-out
split, wall time, and the recipe the loop chose from the set's training rows. CPU training is not
bit-for-bit repeatable, so each set runs ``RUNS`` times (``LANCETAG_BENCH_DEMO_RUNS``), each in a
fresh workdir; ``LANCETAG_BENCH_DEMO_SETS`` (comma-separated) picks sets, default every set
``bench.real_datasets`` can write here. Digits runs as `lancetag demo` (its default data), the
others as `lancetag demo --data DIR` (a folder per class), exactly as a user would.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import real_datasets
from bench.report import Section

GOAL_ACCURACY, GOAL_SECONDS = 0.97, 300
RUNS = int(os.environ.get("LANCETAG_BENCH_DEMO_RUNS", "2"))
ABOUT = {
    "digits": "scikit-learn's handwritten digits, 8x8 written as 56x56 PNGs (10 classes)",
    "elpv": "PyPI elpv-dataset: 300x300 electroluminescence images of solar cells, functional vs defective",
    "tuxpaint": "Debian tuxpaint-stamps-default: clip-art stamps of 8 categories, transparent PNGs as they ship",
    "tuxpaint_subcategories": "the same stamps, a class per subcategory with 10 or more: 22 classes, a prompt of 22 labels",
}


def _run_once(workdir: Path, data: Path | None) -> dict:
    lancetag = str(Path(sys.executable).parent / "lancetag")
    command = [lancetag, "demo", "--workdir", str(workdir), "--json"] + (
        ["--data", str(data)] if data else []
    )
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "wall": time.perf_counter() - started}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _recipe(recipe: dict) -> str:
    validation, flip = recipe["validation"], recipe["evidence"]["flip_check"]
    return (
        f"side {recipe['side']} px ({recipe['visual_tokens']} visual tokens), flip {'on' if recipe['flip'] else 'off'} "
        f"(mirror cost a pixel classifier {100 * flip['skill_lost']:.0f}% of its skill, sign test p {flip['p_value']:.2g}), "
        f"{_jitter(recipe)}, up to {recipe['epochs']} epochs, validation on "
        f"{100 * validation['fraction']:.1f}% every {validation['every_epochs']} epoch(s), patience {validation['patience']}"
    )


def _jitter(recipe: dict) -> str:
    check = recipe["evidence"]["jitter_check"]
    moved = f"jittered copies moved a pixel SVM {_pct(check['accuracy'])} -> {_pct(check['with_jittered_copies'])}"
    return f"jitter {'on' if recipe['jitter'] else 'off'} ({moved}), fill {recipe['fill']}"


def _better(run: dict) -> dict:
    """The run's better pixel baseline, with the model's paired comparison against it."""
    return max(run["baselines"], key=lambda b: b["accuracy"])


def _verdict_counts(verdicts: list[str]) -> str:
    """'above in 2 runs, level in 1' for the paired verdicts of a set's runs."""
    counts = {v: verdicts.count(v) for v in ("above", "level", "below") if v in verdicts}
    return ", ".join(f"{v} in {n} run{'s' if n > 1 else ''}" for v, n in counts.items())


def _section(name: str, runs: list[dict]) -> tuple[str, str]:
    first = runs[0]
    baseline_names = [b["name"] for b in first["baselines"]]
    rows = []
    for k, r in enumerate(runs):
        better = _better(r)
        curve = r.get("validation") or {}
        best = curve.get("best") or {}
        stopped = f"best epoch {best.get('epoch', 0):.0f}" + (
            ", stopped early" if curve.get("stopped_early") else ""
        )
        views = curve.get("views")
        if views:
            stopped += (
                f"; {views['count']} views {_pct(views['accuracy'])} vs the image alone {_pct(views['single_accuracy'])}"
                f" on validation: {'views' if views['chosen'] else 'image alone'} kept"
            )
            if views["chosen"] and views.get("unsure_at") is not None:
                stopped += (
                    f", asked only of images at most {views['unsure_at']:.2f} sure alone"
                    f" ({_pct(views['unsure_share'])} of validation)"
                )
        rows.append(
            f"| {k + 1} | {_pct(r['accuracy_before'])} | **{_pct(r['accuracy_after'])}** | "
            + " | ".join(_pct(b["accuracy"]) for b in r["baselines"])
            + f" | {better['verdict']} (+{better['model_only']} / -{better['baseline_only']}, p {better['p_value']:.2g})"
            + f" | {r['wall']:.0f} s | {stopped} |"
        )
    afters = [r["accuracy_after"] for r in runs]
    best_baseline = [_better(r)["accuracy"] for r in runs]
    beats = sum(a > b for a, b in zip(afters, best_baseline, strict=True))
    verdicts = _verdict_counts([_better(r)["verdict"] for r in runs])
    header = " | ".join(baseline_names)
    md = f"""
### {name}: {ABOUT.get(name, name)}

{first["train_rows"]} training rows, {first["test_rows"]} held out. Recipe chosen from the training rows: {_recipe(first["recipe"])}.

| run | before | after fine-tuning | {header} | against the better baseline, row by row | wall time | validation |
| ---: | ---: | ---: | {" | ".join("---:" for _ in baseline_names)} | --- | ---: | --- |
{chr(10).join(rows)}

Mean after fine-tuning **{_pct(statistics.mean(afters))}** (worst {_pct(min(afters))}), mean best baseline
{_pct(statistics.mean(best_baseline))}; the model scored higher than the better baseline in {beats} of {len(runs)} runs.
Row by row (McNemar's exact test on the held-out rows, p < 0.05), the model against it: {verdicts}.
"""
    summary = (
        f"| {name} | {len(runs)} | {_pct(statistics.mean(afters))} ({_pct(min(afters))}-{_pct(max(afters))}) | "
        f"{_pct(statistics.mean(best_baseline))} | {beats}/{len(runs)} | {verdicts} | {statistics.mean(r['wall'] for r in runs):.0f} s |"
    )
    return md, summary


def run(workdir: Path) -> Section:
    """Run `lancetag demo --json` RUNS times per set in fresh workdirs; report each run beside the baselines."""
    names = [
        n
        for n in os.environ.get("LANCETAG_BENCH_DEMO_SETS", ",".join(real_datasets.available())).split(",")
        if n
    ]
    parts, summaries, goals = [], [], ""
    for name in names:
        data = None if name == "digits" else real_datasets.WRITERS[name](workdir / "data" / name)
        runs = [_run_once(workdir / f"{name}-{k}", data) for k in range(RUNS)]
        md, summary = _section(name, runs)
        parts.append(md)
        summaries.append(summary)
        if name == "digits":
            worst_after, worst_wall = min(r["accuracy_after"] for r in runs), max(r["wall"] for r in runs)
            goals = (
                f"Digits goals: >= 97% held out in every run: {'met' if worst_after >= GOAL_ACCURACY else 'NOT met'} "
                f"(worst {_pct(worst_after)}); <= {GOAL_SECONDS} s: "
                f"{'met' if worst_wall <= GOAL_SECONDS else 'NOT met'} (worst {worst_wall:.0f} s)."
            )
    md = f"""
Every set runs the same command with no setting given by hand: the loop ingests the folder, splits
it by id hash (20% held out), chooses the recipe from the training rows (`llamafactory_ext.recipe`,
docs/training.md), warms the random vision tower of a tiny Qwen2-VL built offline as a classifier
of the training rows (`llamafactory_ext.vision_warmup`), fine-tunes the whole model with validation
inside training (which also decides whether the labeler averages 8 views of each image or asks with the image alone), re-tags
and evaluates on the held-out rows, where logistic regression and an RBF SVM on 16x16 pixels are
fitted on the same training split (`lancetag eval --baseline-train`). {RUNS} run(s) per set, each in
a fresh workdir.

| set | runs | fine-tuned model, mean (range) | better baseline, mean | model scored higher | row by row (McNemar, p < 0.05) | wall time, mean |
| --- | ---: | ---: | ---: | ---: | --- | ---: |
{chr(10).join(summaries)}

{goals}
{"".join(parts)}"""
    return Section("The closed loop: `lancetag demo` on real image sets", md)

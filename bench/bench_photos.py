"""The training steps of the closed loop on photos of growing size: what grows with the image, not the table.

    python -m bench photos

The demo's recipe trains the tiny model at 56-112 pixels a side. A user's photos have millions of
pixels. Measured here: 400 JPEG photos (two classes, a tint each, on smooth noise), at each of
three sizes, in a registered Lance table. Each step runs in a process of its own, with its wall time
and peak resident memory:

- the recipe step (`choose_recipe` on the 400 rows);
- the vision warm-up (`warm_vision_tower`, 3 epochs at 84 px);
- LLaMA-Factory's fine-tune of the tiny Qwen2-VL (`run_training` in process, 3 epochs at 84 px,
  no warm-up or validation);
- the pixel baselines of `lancetag eval --baseline-train` (`table_baselines`: both fitted on the
  rows whose id is below `8` and scored on the others, all 400 photos decoded to 16x16);
- labeling the 400 photos with the fine-tuned model (the transformers backend, 8 a call), which
  resizes them to the size its lineage records (84 px; a JPEG at least twice that a side decoded
  at 1/2 to 1/8 of its scale first), and beside it the same model with no lineage: each photo
  decoded whole and resized by the processor alone, as before the size was recorded.

Each image is decoded once, into what the step needs: a profile whose shorter side is 224-447 pixels for
the recipe, and a PNG at the training size for the warm-up and the in-memory rows LLaMA-Factory
trains on (`llamafactory_ext.image_fit`), and 1/2 to 1/8 of its scale for the baselines (JPEG
`draft`). So the image's size should cost that one decode, not one decode per epoch.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

from bench.bench_scale import run_measured
from bench.report import Section, table_section

SIZES = tuple(tuple(int(v) for v in s.split("x")) for s in os.environ.get(
    "LANCETAG_BENCH_PHOTO_SIZES", "400x300,1600x1200,3200x2400").split(","))
PHOTOS = int(os.environ.get("LANCETAG_BENCH_PHOTOS", "400"))
EPOCHS = 3
SIDE = 84
RECIPE = (
    "import json, sys, lance; from llamafactory_ext.recipe import choose_recipe; "
    "t = lance.dataset(sys.argv[1]).to_table(columns=['id', 'image', 'truth']); "
    "r = choose_recipe(t['id'].to_pylist(), t['image'].to_pylist(), t['truth'].to_pylist()); "
    "print(json.dumps({'side': r.side, 'flip': r.flip, 'jitter': r.jitter}))"
)
WARMUP = (
    "import sys; from llamafactory_ext.vision_warmup import VisionWarmup, warm_vision_tower; "
    "root = sys.argv[1]; "
    "warm_vision_tower({'model_name_or_path': root + '/model', 'template': 'qwen2_vl', 'finetuning_type': 'full', "
    "'dataset': 'photos', 'dataset_dir': root + '/data', 'output_dir': root + '/warm', "
    f"'image_max_pixels': {SIDE * SIDE}, 'image_min_pixels': {SIDE * SIDE}}}, VisionWarmup(epochs={EPOCHS}), None)"
)
FINE_TUNE = (
    "import json, sys, yaml; from llamafactory_ext.train import run_training; root = sys.argv[1]; "
    "config = yaml.safe_load(open('configs/train/tiny_qwen2_vl_digits_full.yaml')); "
    "config.update(model_name_or_path=root + '/model', dataset='photos', dataset_dir=root + '/data', "
    f"output_dir=root + '/ft', num_train_epochs={EPOCHS}, image_max_pixels={SIDE * SIDE}, "
    f"image_min_pixels={SIDE * SIDE}, logging_steps=1000); "
    "config['lancetag'] = {'workers': 0}; print(json.dumps({'loss': run_training(config).train_loss}))"
)
BASELINES = (
    "import json, sys, lance; from ray_jobs.evaluation.baselines import table_baselines; "
    "found = table_baselines(lance.dataset(sys.argv[1]), 'truth', 'answer', \"id < '8'\", \"id >= '8'\"); "
    "print(json.dumps({'scored': found[0].rows, 'trained': found[0].train_rows}))"
)


LABEL = (
    "import json, sys, lance; from lance_io.tasks import load_task; "
    "from serve_apps.backends.base import BackendConfig, create_backend; "
    "backend = create_backend(BackendConfig(model=sys.argv[1], batch_size=8)); task = load_task(sys.argv[3]); "
    "images = lance.dataset(sys.argv[2]).to_table(columns=['image'])['image'].to_pylist(); "
    "done = [r for at in range(0, len(images), 8) for r in backend.label(images[at:at + 8], task)]; "
    "print(json.dumps({'labeled': sum(r.ok for r in done), 'image_pixels': backend.info()['image_pixels']}))"
)


def _photos(root: Path, width: int, height: int) -> int:
    """Write PHOTOS JPEGs as a registered table under ``root`` beside a tiny model at SIDE; return their bytes."""
    import lance
    import numpy as np
    import yaml
    from PIL import Image

    from bench.data import image_rows
    from lance_io import append_images
    from llamafactory_ext.recipe import set_processor_side
    from llamafactory_ext.register import register_dataset
    from serve_apps.tiny_models import build_tiny_model

    rng = np.random.default_rng(0)
    rows = []
    for k in range(PHOTOS):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
        tint = np.array([40, 0, 0] if k % 2 else [0, 0, 40], dtype=np.int16)
        pixels = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16) + tint
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
        rows.append((buffer.getvalue(), "red" if k % 2 else "blue"))
    root.mkdir(parents=True)
    (root / "tint.yaml").write_text(yaml.safe_dump({"kind": "classify", "name": "tint", "labels": ["blue", "red"]}))
    append_images(str(root / "photos.lance"), image_rows(rows))  # pages of about WRITE_BATCH_BYTES, as ingest writes
    lance.dataset(str(root / "photos.lance")).add_columns({"answer": "truth"})  # a model's answers, for the baselines
    register_dataset(str(root / "photos.lance"), "photos", root / "data", task=str(root / "tint.yaml"), label_column="truth")
    set_processor_side(build_tiny_model("qwen2_vl", root / "model", heads=4, vision_hidden=128), SIDE)
    return sum(len(data) for data, _ in rows)


def run(workdir: Path) -> Section:
    """Time the recipe step, the warm-up, the fine-tune and the pixel baselines on PHOTOS photos at each of SIZES."""
    lines = ["| photo size | JPEG, mean | recipe step | vision warm-up (3 epochs) | fine-tune (3 epochs) | pixel baselines "
             "| labeling at the trained size | labeling, decoded whole | recipe chosen |",
             "| --- | ---: | --- | --- | --- | --- | --- | --- | --- |"]
    figures = []
    for width, height in SIZES:
        root = workdir / f"{width}x{height}"
        total = _photos(root, width, height)
        recipe = run_measured([sys.executable, "-c", RECIPE, str(root / "photos.lance")])
        warmup = run_measured([sys.executable, "-c", WARMUP, str(root)])
        tune = run_measured([sys.executable, "-c", FINE_TUNE, str(root)])
        baselines = run_measured([sys.executable, "-c", BASELINES, str(root / "photos.lance")])
        shutil.copytree(root / "ft", root / "ft-whole", ignore=shutil.ignore_patterns("lancetag_lineage.json"))
        labeled, whole = (run_measured([sys.executable, "-c", LABEL, str(root / model), str(root / "photos.lance"),
                                        str(root / "tint.yaml")]) for model in ("ft", "ft-whole"))
        for measured, recorded in ((labeled, {"max": SIDE * SIDE, "min": SIDE * SIDE, "qwen2_vl": True}), (whole, None)):
            done = json.loads(measured.stdout.strip().splitlines()[-1])
            assert done == {"labeled": PHOTOS, "image_pixels": recorded}, done
        chosen = json.loads(recipe.stdout.strip().splitlines()[-1])
        steps = (recipe, warmup, tune, baselines, labeled, whole)
        figures.append((width * height, steps))
        lines.append(f"| {width}x{height} | {total / PHOTOS / 1e3:.0f} KB | " + " | ".join(
            f"{m.seconds:.1f} s, {m.peak_rss / 2**20:.0f} MiB" for m in steps)
            + f" | {chosen['side']} px, flip {'on' if chosen['flip'] else 'off'}, jitter {'on' if chosen['jitter'] else 'off'} |")
    (small, small_steps), (large, large_steps) = figures[0], figures[-1]
    growth = ", ".join(f"{name} {b.seconds / a.seconds:.1f}x in time and {b.peak_rss / a.peak_rss:.1f}x in memory"
                       for name, a, b in zip(("the recipe step", "the warm-up", "the fine-tune", "the baselines",
                                              "labeling at the trained size", "labeling decoded whole"),
                                             small_steps, large_steps, strict=True))
    ratios = ", ".join(f"{width}x{height} {steps[5].seconds / steps[4].seconds:.1f}x"
                       for (width, height), (_, steps) in zip(SIZES, figures, strict=True))
    return table_section(
        "Photos of growing size: the recipe step, the vision warm-up, the fine-tune, the baselines and labeling", __doc__, lines,
        f"From {SIZES[0][0]}x{SIZES[0][1]} to {SIZES[-1][0]}x{SIZES[-1][1]} pixels ({large // small}x): {growth}. "
        f"Labeling decoded whole over labeling at the trained size: {ratios}.",
    )


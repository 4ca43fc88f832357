"""The product's own loop for attribute and caption tasks: label -> register -> train -> relabel -> eval.

Every step is the real `lancetag` console command in a subprocess, on a table ingested from real
photos (scikit-image's sample images, cropped at random so every image differs), labeled by a
tiny Qwen2-VL on a Serve labeler in the session's Ray cluster. A second delivery of photos stays
unlabeled, so a count that ignores which rows have labels shows up.
"""

from __future__ import annotations

import csv
import json
import math
import random
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from lance_io import append_images, ensure_columns, open_table, plan_fragments, write_fragment
from lance_io.labels import answer_columns, label_schema
from lance_io.reasons import ReasonError
from lance_io.tasks import load_task
from tests.conftest import LANCETAG, REPO_ROOT
from tests.table_fixtures import image_rows

FASHION_YAML = REPO_ROOT / "configs" / "tasks" / "fashion.yaml"
CAPTION_YAML = REPO_ROOT / "configs" / "tasks" / "caption.yaml"
TINY_CONFIG = REPO_ROOT / "configs" / "train" / "tiny_qwen2_vl_cpu.yaml"
FASHION = load_task(FASHION_YAML)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "horse", "camera")
FIRST_DELIVERY, SECOND_DELIVERY = 16, 8
LABELED = "delivery = 1"  # the rows every label run of these tests touches


def write_photos(folder: Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` distinct 56x56 crops of scikit-image photos and a manifest with ``truth_<attribute>``
    ground truth (fashion values drawn at random) and a ``delivery`` column; return the manifest."""
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        photo = Image.fromarray(np.asarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])())).convert("RGB")
        w, h = photo.size
        scale = rng.uniform(0.4, 0.9)
        cw, ch = int(w * scale), int(h * scale)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        photo.crop((x, y, x + cw, y + ch)).resize((56, 56)).save(folder / f"{i:03d}.png")
        row = {"path": f"{i:03d}.png", "delivery": 1 if i < FIRST_DELIVERY else 2}
        row |= {f"truth_{name}": rng.choice(a.values) for name, a in FASHION.attributes.items()}
        rows.append(row)
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def lancetag(*args: str, ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the console command; when ``ok``, assert it succeeded."""
    proc = subprocess.run([LANCETAG, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"lancetag {' '.join(map(str, args))}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def lancetag_json(*args: str, timeout: int = 600) -> dict:
    """Run the console command with --json and return its last stdout line, parsed."""
    return json.loads(lancetag(*args, "--json", timeout=timeout).stdout.strip().splitlines()[-1])


def provenance_by_id(uri: str, column: str) -> dict[str, str | None]:
    table = open_table(uri).to_table(columns=["id", f"{column}_provenance"])
    return dict(zip(table["id"].to_pylist(), table[f"{column}_provenance"].to_pylist(), strict=True))


def rows_written_by_run(uri: str, column: str, adapter: str) -> int:
    """Rows the label commits of ``column`` wrote with ``adapter`` ('' for none): the audit of one run."""
    from ray_jobs.label import label_commits

    return sum(
        int(v.properties.get("lancetag.rows", 0))
        for v in label_commits(uri, column)
        if v.properties.get("lancetag.adapter", "") == adapter
    )


@pytest.fixture(scope="module")
def photo_table(ray_cluster, tmp_path_factory) -> str:
    """24 distinct photos ingested by `lancetag ingest` from a manifest (16 of delivery 1, 8 of delivery 2)."""
    root = tmp_path_factory.mktemp("loop")
    manifest = write_photos(root / "photos", FIRST_DELIVERY + SECOND_DELIVERY)
    address = ray_cluster.get_runtime_context().gcs_address
    uri = str(root / "photos.lance")
    ingested = lancetag_json("ingest", manifest, "--table", uri, "--address", address)
    assert (ingested["added"], ingested["errors"]) == (FIRST_DELIVERY + SECOND_DELIVERY, 0)
    return uri


def label_train_relabel(
    uri: str, task: Path, column: str, tiny_model: Path, tmp_path: Path, address: str
) -> tuple[dict, dict, dict]:
    """Run label -> lf register -> train -> label --lora --relabel on the delivery-1 rows; return
    (registration, training, relabel) outputs after checking what each must do."""
    label = ["label", uri, "--task", task, "--column", column, "--model", tiny_model, "--where", LABELED,
             "--address", address, "--batch-size", "8"]
    zero_shot = lancetag_json(*label, "--version-tag", f"{column}-zero-shot")
    assert (zero_shot["labeled"], zero_shot["failed"]) == (FIRST_DELIVERY, 0)
    table = open_table(uri)
    labeled_ok = table.count_rows(filter=f"{column}_provenance IS NOT NULL AND {column}_error IS NULL")
    assert labeled_ok == FIRST_DELIVERY and table.count_rows(filter=f"{column}_provenance IS NULL") == SECOND_DELIVERY

    data = tmp_path / "data"
    registered = lancetag_json(
        "lf", "register", uri, "--name", column, "--dataset-dir", data, "--task", task, "--label-column", column
    )
    assert registered["rows"] == labeled_ok  # rows training gets, not rows of the table

    out = tmp_path / f"{column}-lora"
    overrides = {"model_name_or_path": tiny_model, "dataset": column, "dataset_dir": data, "output_dir": out,
                 "max_steps": 3}  # the config's cutoff_len holds an attribute chat's turns, one per attribute
    trained = lancetag_json("train", TINY_CONFIG, *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")])
    assert math.isfinite(trained["train_loss"]) and (out / "adapter_model.safetensors").is_file()
    lineage = json.loads((out / "lancetag_lineage.json").read_text())
    assert [(d["uri"], d["label_column"]) for d in lineage["datasets"]] == [(uri, column)]
    assert lineage["image_pixels"] == {"max": 768 * 768, "min": 32 * 32, "qwen2_vl": True}  # LLaMA-Factory's defaults: the config sets none

    before = provenance_by_id(uri, column)
    stale = {i for i, p in before.items() if p == zero_shot["provenance"]}
    relabeled = lancetag_json(*label, "--lora", out, "--relabel", "--version-tag", f"{column}-fine-tuned")
    assert relabeled["provenance"] != zero_shot["provenance"] and str(out) in relabeled["provenance"]
    after = provenance_by_id(uri, column)
    rewritten = {i for i in after if after[i] != before[i]}
    assert rewritten == stale and all(after[i] == relabeled["provenance"] for i in stale)
    assert (relabeled["planned"], relabeled["labeled"], relabeled["failed"]) == (len(stale), len(stale), 0)
    # the audit: each run's commits wrote each of its rows once
    assert rows_written_by_run(uri, column, "") == FIRST_DELIVERY
    assert rows_written_by_run(uri, column, str(out)) == len(stale)
    return registered, trained, relabeled


@pytest.mark.slow
def test_attribute_labels_train_an_adapter_whose_relabel_is_evaluated_per_attribute(
    ray_cluster, photo_table, tiny_qwen2_vl, tmp_path
):
    address = ray_cluster.get_runtime_context().gcs_address
    label_train_relabel(photo_table, FASHION_YAML, "attrs", tiny_qwen2_vl, tmp_path, address)
    labeled = open_table(photo_table).to_table(filter=LABELED)  # the documented columns, each filled
    for name in [*answer_columns(FASHION, "attrs").values(), "attrs_confidence"]:
        assert labeled[name].null_count == 0, name
    assert labeled["attrs_error"].null_count == FIRST_DELIVERY

    diff = lancetag_json("diff", photo_table, "attrs-zero-shot", "attrs-fine-tuned", "--column", "attrs")
    assert sorted(c["column"] for c in diff["columns"]) == sorted(answer_columns(FASHION, "attrs").values())
    delivery_1 = set(open_table(photo_table).to_table(columns=["id"], filter=LABELED)["id"].to_pylist())
    assert set(diff["changed_ids"]) <= delivery_1

    evaluated = lancetag_json("eval", photo_table, "--column", "attrs", "--truth", "truth", "--where", LABELED)
    assert set(evaluated["evaluations"]) == set(FASHION.attributes)
    for name, evaluation in evaluated["evaluations"].items():
        assert evaluation["rows"] == FIRST_DELIVERY and evaluation["labeled"] == FIRST_DELIVERY, name
        assert set(evaluation["classes"]) <= set(FASHION.attributes[name].values), name
    assert evaluated["lineage"]["adapter"] == str(tmp_path / "attrs-lora")


@pytest.mark.slow
@pytest.mark.long
def test_caption_labels_train_an_adapter_and_eval_refuses_free_text_with_a_reason(
    ray_cluster, photo_table, tiny_qwen2_vl, tmp_path
):
    # The tiny random model's captions are empty strings: this checks the plumbing, not what is learned.
    address = ray_cluster.get_runtime_context().gcs_address
    label_train_relabel(photo_table, CAPTION_YAML, "caption", tiny_qwen2_vl, tmp_path, address)

    diff = lancetag_json("diff", photo_table, "caption-zero-shot", "caption-fine-tuned", "--column", "caption")
    assert [c["column"] for c in diff["columns"]] == ["caption"]

    proc = lancetag("eval", photo_table, "--column", "caption", "--truth", "truth", ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "free_text" in proc.stderr and "lancetag diff" in proc.stderr


# Unit level: the pieces of the loop without a model (labels written as a label run commits them).


def write_attribute_labels(uri: str, answers: dict[str, dict[str, str] | None]) -> None:
    """Commit fashion labels under ``attrs`` for the given ids; None stands for a row whose labeling failed."""
    schema = label_schema(FASHION, "attrs")
    columns = answer_columns(FASHION, "attrs")
    ensure_columns(uri, schema)

    def row(i: str) -> dict:
        if answers[i] is None:
            return {"attrs_provenance": "m||h", "attrs_error": "image_decode_failed: truncated"}
        return {columns[k]: v for k, v in answers[i].items()} | {"attrs_confidence": 0.5, "attrs_provenance": "m||h"}

    def compute(batch: pa.RecordBatch) -> pa.RecordBatch:
        rows = [row(i) for i in batch.column("id").to_pylist()]
        return pa.record_batch([pa.array([r.get(f.name) for r in rows], f.type) for f in schema], schema=schema)

    where = "id IN (" + ", ".join(f"'{i}'" for i in answers) + ")"
    for frag in plan_fragments(uri, "true", where=where):
        write_fragment(uri, frag.fragment_id, compute, read_columns=[], output_schema=schema, todo="true", where=where)


@pytest.fixture
def attribute_table(tmp_path) -> tuple[str, list[str]]:
    """8 rows: 5 labeled with every attribute, 1 failed, 2 never labeled."""
    uri = str(tmp_path / "attrs.lance")
    rows = image_rows(range(8))
    append_images(uri, rows)
    ids = rows["id"].to_pylist()
    answers = {"category": "dress", "sleeve_length": "long", "fabric": "silk", "collar": "v-neck", "pattern": "floral"}
    write_attribute_labels(uri, {**{i: answers for i in ids[:5]}, ids[5]: None})
    return uri, ids


def test_register_counts_the_labeled_rows_and_each_loads_one_turn_per_attribute(attribute_table, tmp_path):
    from llamafactory_ext.reader import load_rows
    from llamafactory_ext.register import register_dataset
    from llamafactory_ext.source import lance_entries

    uri, _ = attribute_table
    registered = register_dataset(uri, "attrs", tmp_path, task=str(FASHION_YAML), label_column="attrs")
    assert registered.rows == 5  # not the failed row, not the 2 unlabeled ones
    rows = load_rows(lance_entries(tmp_path)["attrs"])
    assert len(rows) == 5
    turns = rows[0]["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant"] * len(FASHION.attributes)
    assert [t["content"] for t in turns if t["role"] == "assistant"] == ["dress", "long", "silk", "v-neck", "floral"]
    assert turns[0]["content"].startswith("<image>") and sum("<image>" in t["content"] for t in turns) == 1


def test_register_an_attribute_prefix_without_a_task_is_refused_with_task_missing(attribute_table, tmp_path):
    from llamafactory_ext.register import register_dataset

    uri, _ = attribute_table
    with pytest.raises(ReasonError) as err:
        register_dataset(uri, "attrs", tmp_path, label_column="attrs")
    assert err.value.reason == "task_missing" and "--task" in err.value.message
    assert not (tmp_path / "dataset_info.json").exists()
    proc = lancetag("lf", "register", uri, "--name", "attrs", "--dataset-dir", tmp_path, "--label-column", "attrs", ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "task_missing" in proc.stdout + proc.stderr


def test_web_ui_preview_of_an_attribute_entry_counts_and_shows_the_labeled_rows(attribute_table, tmp_path):
    from llamafactory_ext.preview import preview_rows
    from llamafactory_ext.register import register_dataset

    uri, _ = attribute_table
    register_dataset(uri, "attrs", tmp_path, task=str(FASHION_YAML), label_column="attrs")
    total, first = preview_rows(str(tmp_path), "attrs", page_index=0, page_size=4)
    _, last = preview_rows(str(tmp_path), "attrs", page_index=1, page_size=4)
    assert total == 5 and len(first) == 4 and len(last) == 1
    answers = [t["content"] for t in first[0]["messages"] if t["role"] == "assistant"]
    assert answers == ["dress", "long", "silk", "v-neck", "floral"]
    assert first[0]["images"][0].startswith("<image: ")


def test_eval_refuses_a_caption_column_and_pairs_attributes_beside_a_truth_column(tmp_path):
    from ray_jobs.evaluation import evaluate_table

    uri = str(tmp_path / "t.lance")
    rows = image_rows(range(4))  # has a `truth` column, as every ingested table
    append_images(uri, rows)
    ids = rows["id"].to_pylist()
    first_values = {name: a.values[0] for name, a in FASHION.attributes.items()}
    write_attribute_labels(uri, {i: first_values for i in ids})
    truth = pa.schema([pa.field(f"truth_{name}", pa.string()) for name in FASHION.attributes])
    ensure_columns(uri, truth)

    def compute(batch: pa.RecordBatch) -> pa.RecordBatch:
        return pa.record_batch(
            [pa.array([a.values[0]] * batch.num_rows) for a in FASHION.attributes.values()], schema=truth
        )

    for frag in plan_fragments(uri, "true"):
        write_fragment(uri, frag.fragment_id, compute, read_columns=[], output_schema=truth, todo="true")
    result = evaluate_table(uri, "attrs", "truth")
    assert set(result.evaluations) == set(FASHION.attributes) and result.accuracy == 1.0

    caption = label_schema(load_task(CAPTION_YAML), "cap")
    ensure_columns(uri, caption)
    with pytest.raises(ReasonError) as err:
        evaluate_table(uri, "cap", "truth")
    assert err.value.reason == "free_text" and "lancetag diff" in err.value.message


def test_register_a_caption_column_needs_its_task_and_trains_on_the_caption_prompt(tmp_path):
    from llamafactory_ext.reader import load_rows
    from llamafactory_ext.register import register_dataset
    from llamafactory_ext.source import lance_entries

    caption = load_task(CAPTION_YAML)
    uri = str(tmp_path / "t.lance")
    rows = image_rows(range(3))
    append_images(uri, rows)
    schema = label_schema(caption, "cap")
    ensure_columns(uri, schema)
    texts = dict(zip(rows["id"].to_pylist(), ["a red dress", "a blue coat", None], strict=True))

    def compute(batch: pa.RecordBatch) -> pa.RecordBatch:
        values = [texts[i] for i in batch.column("id").to_pylist()]
        return pa.record_batch(
            [pa.array(values), pa.array([None] * len(values), pa.float32()),
             pa.array(["m||h"] * len(values)), pa.array([None] * len(values), pa.string())],
            schema=schema,
        )

    for frag in plan_fragments(uri, "true"):
        write_fragment(uri, frag.fragment_id, compute, read_columns=[], output_schema=schema, todo="true")
    with pytest.raises(ReasonError) as err:  # not a classify task over every caption seen
        register_dataset(uri, "cap", tmp_path, label_column="cap")
    assert err.value.reason == "task_missing" and "caption task" in err.value.message
    assert register_dataset(uri, "cap", tmp_path, task=str(CAPTION_YAML), label_column="cap").rows == 2
    chats = [r["messages"] for r in load_rows(lance_entries(tmp_path)["cap"])]
    assert sorted(c[-1]["content"] for c in chats) == ["a blue coat", "a red dress"]
    assert all(c[0]["content"] == "<image>" + caption.prompt for c in chats)

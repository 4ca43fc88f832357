"""Samples through LLaMA-Factory: a sharegpt dataset after `lancetag ingest` preprocesses exactly as natively.

The dataset is shaped like LLaMA-Factory's ``data/mllm_demo.json`` (bench/samples_data.py): six
conversations over three images, two conversations about one image in two languages, one
conversation showing the same file twice and one over two images.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.samples_data import mllm_demo_samples, write_mllm_demo
from tests.conftest import LANCETAG
from tests.test_lf_dataset import _preprocess as preprocess_with_llamafactory

QUIET = {"progress": False}


def _args(model: Path, template: str, dataset_dir: Path, dataset: str, tmp: Path, **extra) -> dict:
    return {
        "model_name_or_path": str(model),
        "template": template,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "dataset": dataset,
        "dataset_dir": str(dataset_dir),
        "cutoff_len": 1024,
        "output_dir": str(tmp / "out"),
        "cache_dir": str(tmp / "hf-cache"),
        "overwrite_cache": True,
        "report_to": "none",
        **extra,
    }


def _preprocess(args: dict) -> tuple[list[dict], object]:
    """Run LLaMA-Factory's own get_dataset; return (every training example, collator)."""
    dataset, collator = preprocess_with_llamafactory(args)
    return list(dataset), collator


def _assert_same_examples(native: list[dict], lance: list[dict], collator) -> None:
    """Same number of examples, and for each: input_ids, labels, pixel_values, image_grid_thw identical."""
    assert len(native) == len(lance)
    key = lambda ex: (ex["input_ids"], ex["labels"])  # noqa: E731 - streams come shuffled
    native, lance = sorted(native, key=key), sorted(lance, key=key)
    for a, b in zip(native, lance, strict=True):
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        assert len(a["images"]) == len(b["images"]) and isinstance(b["images"][0], bytes | dict)
        fields = ("input_ids", "attention_mask", "labels", "images")
        batch_a = collator([{k: a[k] for k in fields}])
        batch_b = collator([{k: b[k] for k in fields}])
        assert batch_a["pixel_values"].shape == batch_b["pixel_values"].shape
        assert (batch_a["pixel_values"] == batch_b["pixel_values"]).all()
        for name in ("image_grid_thw", "image_sizes"):
            if name in batch_a:
                assert (batch_a[name] == batch_b[name]).all()


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory) -> tuple[Path, str]:
    """The mllm_demo-shaped dataset (native entry ``mllm_demo``) and the table it was ingested into."""
    from ray_jobs.ingest import IngestOptions, ingest

    folder = tmp_path_factory.mktemp("mllm")
    path = write_mllm_demo(folder / "data")
    table = str(folder / "demo.lance")
    summary = ingest([str(path)], table, IngestOptions(**QUIET))
    assert (summary.added, summary.duplicates) == (3, 5)  # 8 image references, 3 distinct images
    assert summary.samples.samples_in == summary.samples.added == 6 and summary.reconciled
    return folder / "data", table


def test_ingest_keeps_every_conversation_in_order_of_its_images_and_reingest_adds_nothing(demo) -> None:
    from lance_io.samples import open_samples
    from lance_io.table import open_table
    from ray_jobs.ingest import IngestOptions, ingest

    data_dir, table = demo
    ids_by_source = {r["source"]: r["id"] for r in open_table(table).to_table(columns=["id", "source"]).to_pylist()}
    samples = sorted(open_samples(table).to_table().to_pylist(), key=lambda s: s["source_index"])
    expected = mllm_demo_samples()
    assert [s["messages"] for s in samples] == [e["messages"] for e in expected]
    assert [s["image_ids"] for s in samples] == [[ids_by_source[p] for p in e["images"]] for e in expected]
    assert samples[4]["image_ids"][0] == samples[4]["image_ids"][1]  # the same file twice, twice

    again = ingest([str(data_dir / "mllm_demo.json")], table, IngestOptions(**QUIET))
    assert (again.added, again.samples.added, again.samples.duplicates) == (0, 0, 6) and again.reconciled
    assert open_samples(table).count_rows() == 6


def test_lance_samples_preprocess_identically_to_native_sharegpt_in_memory_and_streaming(demo, tiny_qwen2_vl, tmp_path):
    import llamafactory_ext
    from llamafactory_ext.register import register_dataset

    llamafactory_ext.activate()
    data_dir, table = demo
    registered = register_dataset(table, "mllm_lance", data_dir)
    assert registered.rows == 6

    native, collator = _preprocess(_args(tiny_qwen2_vl, "qwen2_vl", data_dir, "mllm_demo", tmp_path / "n"))
    in_memory, _ = _preprocess(_args(tiny_qwen2_vl, "qwen2_vl", data_dir, "mllm_lance", tmp_path / "l"))
    assert len(native) == 6
    _assert_same_examples(native, in_memory, collator)

    stream = {"streaming": True, "max_steps": 2, "preprocessing_batch_size": 2}
    streamed, _ = _preprocess(_args(tiny_qwen2_vl, "qwen2_vl", data_dir, "mllm_lance", tmp_path / "ls", **stream))
    _assert_same_examples(native, streamed, collator)


def test_lance_samples_preprocess_identically_for_llava_next_multi_image(demo, tiny_llava_next, tmp_path):
    import llamafactory_ext
    from llamafactory_ext.register import register_dataset

    llamafactory_ext.activate()
    data_dir, table = demo
    register_dataset(table, "mllm_lance", data_dir)
    native, collator = _preprocess(_args(tiny_llava_next, "llava_next", data_dir, "mllm_demo", tmp_path / "n"))
    lance_ds, _ = _preprocess(_args(tiny_llava_next, "llava_next", data_dir, "mllm_lance", tmp_path / "l"))
    assert len(native) == 6
    _assert_same_examples(native, lance_ds, collator)


def test_cli_register_pins_samples_and_images_versions_and_appends_do_not_change_what_loads(demo, tmp_path):
    from llamafactory_ext.reader import load_rows
    from llamafactory_ext.register import register_dataset
    from llamafactory_ext.source import LanceSource, read_dataset_info
    from ray_jobs.ingest import IngestOptions, ingest

    data_dir, _ = demo
    table = str(tmp_path / "grow.lance")
    ingest([str(data_dir / "mllm_demo.json")], table, IngestOptions(**QUIET))
    out = subprocess.run(
        [LANCETAG, "lf", "register", table, "--name", "pinned", "--dataset-dir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["rows"] == 6
    entry = read_dataset_info(tmp_path)["pinned"]
    source = LanceSource.model_validate(entry["lance"])
    assert source.samples_version is not None and source.version is not None
    assert entry["columns"] == {"messages": "messages", "images": "images", "system": "system", "tools": "tools"}

    turns = [{"role": "user", "content": "<image>New?"}, {"role": "assistant", "content": "Yes."}]
    more = write_mllm_demo(tmp_path / "more", [{"messages": turns, "images": ["mllm_demo_data/2.png"]}], name="more")
    summary = ingest([str(more)], table, IngestOptions(**QUIET))
    assert summary.samples.added == 1
    assert len(load_rows(source)) == 6  # pinned: the new sample is not in it
    assert register_dataset(table, "latest", tmp_path).rows == 7


def test_web_ui_preview_of_a_samples_entry_shows_conversations_with_their_images(demo, tmp_path):
    from llamafactory_ext.preview import preview_rows
    from llamafactory_ext.register import register_dataset

    _, table = demo
    register_dataset(table, "preview", tmp_path)
    total, rows = preview_rows(str(tmp_path), "preview", page_index=2, page_size=2)
    assert total == 6 and len(rows) == 2
    assert [len(r["images"]) for r in rows] == [2, 2]  # the two multi-image conversations, last in the file
    assert all(image.startswith("<image: ") for r in rows for image in r["images"])
    assert rows[1]["messages"][0]["content"] == "<image>和<image>有什么不同？"


def test_training_pins_a_samples_entry_and_counts_its_samples_with_a_where_on_sample_columns(demo, tmp_path):
    from llamafactory_ext.register import register_dataset
    from llamafactory_ext.train import pin_datasets

    _, table = demo
    register_dataset(table, "zh", tmp_path, where="source_kind = 'sharegpt' AND source_index >= 3")
    _, (record,) = pin_datasets({"dataset": "zh", "dataset_dir": str(tmp_path)}, tmp_path / "pinned")
    assert record["samples_version"] is not None and record["rows_matching_where"] == 3

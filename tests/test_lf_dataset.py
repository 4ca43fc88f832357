"""Lance tables as LLaMA-Factory datasets: registration, loading, equivalence, pinning, streaming."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.data import digit_images, write_native, write_table
from tests.conftest import LANCETAG

ARTICLE_PROMPT = (
    "Fill in the blank: this is a photo of a {}, you should select the appropriate category "
    "from the provided labels: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"
)


NO_SUCH_COLUMN = ["--label-column", "no_such_column", "--json"]


def _lf_args(model: Path, dataset_dir: Path, dataset: str, tmp: Path, **extra) -> dict:
    return {
        "model_name_or_path": str(model),
        "template": "qwen2_vl",
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "dataset": dataset,
        "dataset_dir": str(dataset_dir),
        "cutoff_len": 256,
        "output_dir": str(tmp / "out"),
        "cache_dir": str(tmp / "hf-cache"),
        "overwrite_cache": True,
        "report_to": "none",
        **extra,
    }


def _preprocess(args: dict) -> tuple:
    """Run LLaMA-Factory's own get_dataset; return (train dataset, collator)."""
    from llamafactory.data import (
        MultiModalDataCollatorForSeq2Seq,
        get_dataset,
        get_template_and_fix_tokenizer,
    )
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    collator = MultiModalDataCollatorForSeq2Seq(template=template, **tokenizer_module)
    return module["train_dataset"], collator


@pytest.fixture(scope="module")
def digits_table(tmp_path_factory) -> tuple[Path, list[tuple[bytes, str]]]:
    """A 24-row table of real digit images in 3 fragments, labeled in ``truth``."""
    images = digit_images(24)
    uri = tmp_path_factory.mktemp("tables") / "digits.lance"
    write_table(uri, images, rows_per_file=8)
    return uri, images


def test_register_pins_latest_version_and_stock_llamafactory_refuses_entry(digits_table, tmp_path):
    from llamafactory.data.parser import get_dataset_list

    uri, _ = digits_table
    out = subprocess.run(
        [LANCETAG, "lf", "register", str(uri), "--name", "digits", "--dataset-dir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["version"] == 1 and record["rows"] == 24
    entry = json.loads((tmp_path / "dataset_info.json").read_text())["digits"]
    assert entry["formatting"] == "sharegpt" and entry["lance"]["version"] == 1
    assert entry["lance"]["task_config"]["labels"] == [str(i) for i in range(10)]

    import llamafactory.data.loader as loader

    stock = getattr(loader._load_single_dataset, "__wrapped__", loader._load_single_dataset)
    (attr,) = get_dataset_list(["digits"], str(tmp_path))

    class DataArgs:
        dataset_dir = str(tmp_path)

    with pytest.raises(ValueError, match="needs the lancetag LLaMA-Factory extension"):
        stock(attr, None, DataArgs, None)


def test_register_reports_missing_column_as_reason_code(digits_table, tmp_path):
    uri, _ = digits_table
    out = subprocess.run(
        [
            LANCETAG,
            "lf",
            "register",
            str(uri),
            "--name",
            "x",
            "--dataset-dir",
            str(tmp_path),
            *NO_SUCH_COLUMN,
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    record = json.loads(out.stdout)["error"]
    assert record["reason"] == "column_missing" and "no_such_column" in record["message"]


def test_a_messages_column_that_holds_no_chat_turns_is_refused_at_register(digits_table, tmp_path):
    """Before: registered (rows counted), then training failed inside LLaMA-Factory's loader (internal)."""
    from llamafactory_ext.register import register_dataset
    from llamafactory_ext.source import LanceEntryError

    uri, _ = digits_table
    with pytest.raises(LanceEntryError) as refused:
        register_dataset(str(uri), "x", tmp_path, messages_column="truth")
    assert refused.value.reason == "bad_messages_column" and "truth holds string" in refused.value.message
    with pytest.raises(LanceEntryError, match="num_samples must be at least 1"):
        register_dataset(str(uri), "x", tmp_path, num_samples=-5)
    assert not (tmp_path / "dataset_info.json").exists()


def test_key_value_options_reach_the_entry_and_an_item_without_equals_is_refused(digits_table, tmp_path):
    from llamafactory_ext.source import read_dataset_info

    uri, _ = digits_table
    register = [LANCETAG, "lf", "register", str(uri), "--name", "x", "--dataset-dir", str(tmp_path), "--json"]
    env = {**os.environ, "MY_REGION": "eu-west-1"}  # register checks the variable is set, keeps only its name
    ok = subprocess.run([*register, "--storage-option", "aws_region = MY_REGION"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert read_dataset_info(tmp_path)["x"]["lance"]["storage_options_env"] == {"aws_region": "MY_REGION"}
    refusals = {
        "bad_storage_option": [*register, "--storage-option", "aws_region"],
        "bad_override": [LANCETAG, "train", str(tmp_path / "any.yaml"), "--set", "max_steps", "--json"],
    }
    for reason, command in refusals.items():
        out = subprocess.run(command, capture_output=True, text=True)
        assert out.returncode == 2
        record = json.loads(out.stdout)["error"]
        assert record["reason"] == reason and "=" in record["message"]


def test_lance_entry_preprocesses_identically_to_native_json_and_files(digits_table, tiny_qwen2_vl, tmp_path):
    import llamafactory_ext
    from llamafactory_ext.register import register_dataset

    llamafactory_ext.activate()
    uri, images = digits_table
    data_dir = tmp_path / "data"
    register_dataset(str(uri), "digits_lance", data_dir)
    rows = [
        {
            "messages": [
                {"role": "user", "content": "<image>" + ARTICLE_PROMPT},
                {"role": "assistant", "content": f"this is a photo of {label}."},
            ]
        }
        for _, label in images
    ]
    write_native(data_dir, "digits_native", rows, [data for data, _ in images])

    native, collator = _preprocess(_lf_args(tiny_qwen2_vl, data_dir, "digits_native", tmp_path / "n"))
    lance_ds, _ = _preprocess(_lf_args(tiny_qwen2_vl, data_dir, "digits_lance", tmp_path / "l"))

    assert len(native) == len(lance_ds) == 24
    for a, b in zip(native, lance_ds, strict=True):
        assert a["input_ids"] == b["input_ids"]
        assert a["labels"] == b["labels"]
    keys = ("input_ids", "attention_mask", "labels")
    batch_native = collator([{k: native[i][k] for k in (*keys, "images")} for i in range(4)])
    batch_lance = collator([{k: lance_ds[i][k] for k in (*keys, "images")} for i in range(4)])
    assert isinstance(lance_ds[0]["images"][0], bytes | dict)  # bytes from Lance, not paths
    assert batch_native["pixel_values"].shape == batch_lance["pixel_values"].shape
    assert (batch_native["pixel_values"] == batch_lance["pixel_values"]).all()
    assert (batch_native["image_grid_thw"] == batch_lance["image_grid_thw"]).all()


def test_split_where_and_max_samples_select_the_documented_rows(digits_table, tiny_qwen2_vl, tmp_path):
    import llamafactory_ext
    from lance_io.splits import split_of
    from llamafactory_ext.register import register_dataset

    llamafactory_ext.activate()
    uri, images = digits_table
    from lance_io.schema import image_id

    ids_with_label = [(image_id(data), label) for data, label in images]
    register_dataset(str(uri), "val", tmp_path, split="validation", val_fraction=0.5, where="truth != '0'")
    expected = [i for i, label in ids_with_label if label != "0" and split_of(i, 0.5, held_out="validation", salt="validation") == "validation"]
    train, _ = _preprocess(_lf_args(tiny_qwen2_vl, tmp_path, "val", tmp_path / "a"))
    assert 0 < len(train) == len(expected) < 24

    capped, _ = _preprocess(_lf_args(tiny_qwen2_vl, tmp_path, "val", tmp_path / "b", max_samples=2))
    assert len(capped) == 2

    register_dataset(str(uri), "oversampled", tmp_path, num_samples=30)  # more than the 24 rows
    oversampled, _ = _preprocess(_lf_args(tiny_qwen2_vl, tmp_path, "oversampled", tmp_path / "c"))
    assert len(oversampled) == 30


def test_appending_after_register_does_not_change_what_the_pinned_entry_loads(tiny_qwen2_vl, tmp_path):
    import lance

    import llamafactory_ext
    from llamafactory_ext.register import register_dataset

    llamafactory_ext.activate()
    uri = tmp_path / "grow.lance"
    write_table(uri, digit_images(6))
    registered = register_dataset(str(uri), "grow", tmp_path / "data")
    write_table(uri, digit_images(5, start=100), mode="append")
    assert lance.dataset(str(uri)).count_rows() == 11

    pinned, _ = _preprocess(_lf_args(tiny_qwen2_vl, tmp_path / "data", "grow", tmp_path / "p"))
    assert len(pinned) == 6

    latest = register_dataset(str(uri), "grow", tmp_path / "data")
    assert latest.version == registered.version + 1
    grown, _ = _preprocess(_lf_args(tiny_qwen2_vl, tmp_path / "data", "grow", tmp_path / "q"))
    assert len(grown) == 11


def test_streaming_gives_one_shard_per_fragment_and_ranks_read_disjoint_fragments(digits_table, monkeypatch):
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from llamafactory_ext import reader
    from llamafactory_ext.source import LanceSource

    uri, _ = digits_table
    source = reader.resolve(LanceSource(uri=str(uri), version=1, label_column="truth"))
    stream = reader.stream_rows(source)
    assert stream.n_shards == 3

    read_by_rank: dict[int, list[int]] = {0: [], 1: []}
    original = reader.iter_tables

    def recording(src, *, fragment_ids=None, report=None):
        read_by_rank[rank].extend(fragment_ids or [])
        return original(src, fragment_ids=fragment_ids, report=report)

    monkeypatch.setattr(reader, "iter_tables", recording)
    rows = {}
    for rank in (0, 1):  # accelerate's own sharding, as `lancetag train` configures it for streams
        loader = prepare_data_loader(
            DataLoader(stream, batch_size=4, collate_fn=list),
            num_processes=2,
            process_index=rank,
            dispatch_batches=False,
            put_on_device=False,
        )
        rows[rank] = sum(len(batch) for batch in loader)
    assert sorted(read_by_rank[0] + read_by_rank[1]) == [0, 1, 2]
    assert not set(read_by_rank[0]) & set(read_by_rank[1])
    assert rows[0] + rows[1] == 24 and min(rows.values()) > 0


def test_streaming_lance_entry_yields_the_same_examples_as_the_in_memory_load(
    digits_table, tiny_qwen2_vl, tmp_path
):
    import llamafactory_ext
    from llamafactory_ext.register import register_dataset

    llamafactory_ext.activate()
    uri, _ = digits_table
    register_dataset(str(uri), "digits", tmp_path)
    eager, _ = _preprocess(_lf_args(tiny_qwen2_vl, tmp_path, "digits", tmp_path / "e"))
    streamed, _ = _preprocess(
        _lf_args(tiny_qwen2_vl, tmp_path, "digits", tmp_path / "s", streaming=True, max_steps=2)
    )
    streamed_ids = sorted(ex["input_ids"] for ex in streamed)  # LLaMA-Factory shuffles streams
    assert streamed_ids == sorted(ex["input_ids"] for ex in eager)


@pytest.mark.s3
def test_s3_table_loads_with_storage_options_taken_from_environment_variables(s3, tmp_path, monkeypatch):
    import lance

    from bench.data import image_rows
    from llamafactory_ext.reader import load_rows
    from llamafactory_ext.register import register_dataset
    from llamafactory_ext.source import read_dataset_info

    uri = s3.uri("lf-digits.lance")
    lance.write_dataset(image_rows(digit_images(6)), uri, storage_options=s3.storage_options)
    env_names = {key: f"LANCETAG_TEST_S3_{key.upper()}" for key in s3.storage_options}
    for key, value in s3.storage_options.items():
        monkeypatch.setenv(env_names[key], value)
    register_dataset(uri, "remote", tmp_path, storage_options_env=env_names)
    entry = read_dataset_info(tmp_path)["remote"]
    assert s3.storage_options["aws_secret_access_key"] not in json.dumps(entry)  # secrets stay in the env

    from llamafactory_ext.source import LanceSource

    rows = load_rows(LanceSource.model_validate(entry["lance"]))
    assert len(rows) == 6 and rows[0]["images"][0].startswith(b"\x89PNG")


def test_registering_rows_with_nothing_to_train_on_is_refused_and_writes_no_entry(tmp_path):
    from lance_io import append_images
    from lance_io.reasons import ReasonError
    from llamafactory_ext.register import register_dataset
    from tests.table_fixtures import image_rows

    uri, datasets = str(tmp_path / "t.lance"), tmp_path / "datasets"
    append_images(uri, image_rows(range(6)))  # truth 0, 1, 2
    task = {"name": "n", "kind": "classify", "labels": ["0", "1", "2"]}
    (tmp_path / "task.yaml").write_text(json.dumps(task))
    cases = [
        ({"where": "truth = 'none'", "task": str(tmp_path / "task.yaml")}, "no_rows"),
        ({"where": "truth = 'none'"}, "too_few_labels"),  # the default task needs two labels
        ({"where": "truth = '1'"}, "too_few_labels"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(ReasonError) as refused:
            register_dataset(uri, "x", datasets, label_column="truth", **kwargs)
        assert refused.value.reason == reason, refused.value
    assert not (datasets / "dataset_info.json").exists()
    assert register_dataset(uri, "x", datasets, label_column="truth", where="truth != '2'").rows == 4


def test_a_name_llamafactory_cannot_select_or_one_a_native_dataset_holds_is_refused_and_nothing_is_lost(tmp_path):
    from lance_io import append_images
    from lance_io.reasons import ReasonError
    from llamafactory_ext.register import register_dataset
    from llamafactory_ext.source import read_dataset_info
    from tests.table_fixtures import image_rows

    uri, datasets = str(tmp_path / "t.lance"), tmp_path / "datasets"
    append_images(uri, image_rows(range(6)))
    datasets.mkdir()
    native = {"mine": {"file_name": "mine.json", "formatting": "sharegpt"}, "hub": {"hf_hub_url": "org/set"}}
    (datasets / "dataset_info.json").write_text(json.dumps(native))
    for name, reason in [("mine", "dataset_exists"), ("hub", "dataset_exists"), ("", "bad_dataset_name"),
                         (" x", "bad_dataset_name"), ("a,b", "bad_dataset_name")]:
        with pytest.raises(ReasonError) as refused:
            register_dataset(uri, name, datasets, label_column="truth")
        assert refused.value.reason == reason, (name, refused.value)
    assert read_dataset_info(datasets) == native  # the user's entries are as they were
    register_dataset(uri, "x y", datasets, label_column="truth")
    register_dataset(uri, "x y", datasets, label_column="truth", where="truth != '2'")  # a Lance entry is replaced
    assert set(read_dataset_info(datasets)) == {"mine", "hub", "x y"}
    assert read_dataset_info(datasets)["x y"]["lance"]["where"] == "truth != '2'"

    for text, shown in [("[", "is not valid JSON"), ("[1]", "holds a JSON list")]:
        (datasets / "dataset_info.json").write_text(text)
        with pytest.raises(ReasonError, match=shown) as refused:
            register_dataset(uri, "x", datasets, label_column="truth")
        assert refused.value.reason == "bad_dataset_info"
        assert (datasets / "dataset_info.json").read_text() == text


def _odd_images() -> list[tuple[bytes, str]]:
    """Photos and odd files: what LLaMA-Factory resizes to 84x84-pixel areas in the test below."""
    import io
    import random

    from PIL import Image

    rng = random.Random(7)
    noise = Image.frombytes("RGB", (640, 480), rng.randbytes(640 * 480 * 3))
    images = [
        (noise, "JPEG"),  # a photo: held at its training size
        (noise.transpose(Image.Transpose.ROTATE_90), "JPEG"),
        (noise.resize((300, 200)).quantize(64), "PNG"),  # palette: LLaMA-Factory resizes it nearest
        (noise.crop((0, 0, 600, 20)), "PNG"),  # a strip Qwen2-VL stretches: held as it came
        (noise.resize((400, 300)).convert("CMYK"), "JPEG"),
        (noise.resize((200, 200)).convert("LA"), "PNG"),
    ]
    out = []
    for n, (image, fmt) in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        out.append((buffer.getvalue(), "a" if n % 2 else "b"))
    return out


def test_an_in_memory_entry_holds_each_image_at_its_training_size_and_trains_on_the_same_pixels(
    tiny_qwen2_vl, tmp_path
):
    """With the run's jitter installed, the Lance entry's batches equal, batch for batch, those of native files
    holding what the labeler sees of each image at the run's size (the strip, which LLaMA-Factory reads as the
    labeler does and would resize twice, as it came)."""
    import io
    import random

    from PIL import Image

    import llamafactory_ext
    from lance_io.image_size import ImagePixels
    from llamafactory_ext.augment import ImageAugment, install
    from llamafactory_ext.register import register_dataset
    from serve_apps.backends.base import decode_image

    llamafactory_ext.activate()
    images = _odd_images()
    uri = tmp_path / "odd.lance"
    write_table(uri, images)
    data_dir = tmp_path / "data"
    register_dataset(str(uri), "odd_lance", data_dir)
    rows = [{"messages": [{"role": "user", "content": "<image>which?"}, {"role": "assistant", "content": label}]}
            for _, label in images]
    fit = ImagePixels(max=84 * 84, min=84 * 84, qwen2_vl=True)

    def labeler_png(data: bytes) -> bytes:
        out = io.BytesIO()
        decode_image(data, fit=fit).save(out, format="PNG")
        return out.getvalue()

    strip = images[3][0]
    write_native(data_dir, "odd_native", rows, [data if data == strip else labeler_png(data) for data, _ in images])
    pixels = {"image_max_pixels": 84 * 84, "image_min_pixels": 84 * 84}
    install(ImageAugment(rotate_degrees=10, scale=0.1, shift=0.08))
    try:
        native, collator = _preprocess(_lf_args(tiny_qwen2_vl, data_dir, "odd_native", tmp_path / "n", **pixels))
        lance_ds, _ = _preprocess(_lf_args(tiny_qwen2_vl, data_dir, "odd_lance", tmp_path / "l", **pixels))
        held = [lance_ds[i]["images"][0] for i in range(len(images))]
        held = [h["bytes"] if isinstance(h, dict) else h for h in held]
        originals = {data for data, _ in images}
        assert strip in held
        fitted = [h for h in held if h not in originals]
        assert len(fitted) == 5  # all but the strip
        for data in fitted:
            with Image.open(io.BytesIO(data)) as image:
                assert image.format == "PNG" and image.width * image.height <= 84 * 84
        assert sum(map(len, held)) < sum(map(len, originals)) / 4
        keys = ("input_ids", "attention_mask", "labels", "images")
        for i in range(len(images)):  # the same jitter drawn for each: the same pixels before it
            random.seed(i)
            a = collator([{k: native[i][k] for k in keys}])
            random.seed(i)
            b = collator([{k: lance_ds[i][k] for k in keys}])
            assert (a["image_grid_thw"] == b["image_grid_thw"]).all()
            assert a["pixel_values"].shape == b["pixel_values"].shape and (a["pixel_values"] == b["pixel_values"]).all()
    finally:
        install(None)


def test_the_loader_reads_photos_a_few_dozen_at_a_time_and_small_images_256_at_a_time(tmp_path, monkeypatch):
    """How many rows a scan batch holds follows the image table's bytes per row (its data files' sizes), for rows and
    for samples that show them: every row comes once."""
    import lance

    from lance_io import append_images, scan
    from lance_io.samples import label_samples
    from lance_io.tasks import load_task
    from llamafactory_ext import reader
    from llamafactory_ext.source import LanceSource
    from tests.table_fixtures import image_rows

    monkeypatch.setattr(scan, "READ_BATCH_BYTES", 2**20)
    photos, small = str(tmp_path / "photos.lance"), str(tmp_path / "small.lance")
    append_images(photos, image_rows(range(60), padding=100_000))  # about 100 KB a row: 10 rows to 1 MB
    append_images(small, image_rows(range(100, 400)))
    label_samples(photos, load_task("digits"), "truth")  # a sample per photo, read through the samples table
    for uri, most, rows, entry in ((photos, 10, 60, {"label_column": "truth"}), (small, 256, 300, {"label_column": "truth"}),
                                   (photos, 10, 60, {"samples_version": 1})):
        assert most - 1 <= scan.rows_per_batch(lance.dataset(uri)) <= most
        tables = list(reader.iter_tables(reader.resolve(LanceSource(uri=uri, version=1, **entry))))
        assert max(t.num_rows for t in tables) <= most and sum(t.num_rows for t in tables) == rows
    monkeypatch.setattr(lance.LanceDataset, "get_fragments", lambda self: pytest.fail("listed a version's fragments twice"))
    assert scan.rows_per_batch(lance.dataset(photos)) == scan.rows_per_batch(lance.dataset(photos, version=1))  # once a version

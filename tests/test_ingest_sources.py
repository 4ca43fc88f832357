"""Sources in isolation (no Ray): what each kind of input lists, with pass-through fields and safe defaults."""

from __future__ import annotations

import gc
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest

from ray_jobs.ingest import worker
from ray_jobs.ingest.messages import (
    InvalidMessages,
    messages_from_template,
    normalize_messages,
    normalize_turns,
)
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources import SourceError, detect_kind, open_source
from ray_jobs.ingest.worker import read_cell
from tests.ingest_fixtures import build_class_folder, build_hostile_folder, image_bytes


def _items(spec: str, **options):
    return list(open_source(spec, IngestOptions(**options)).items())


def test_folder_walk_survives_symlink_loops_and_labels_from_parent_dir(tmp_path: Path) -> None:
    folder = build_hostile_folder(tmp_path)
    items = _items(str(folder.root), label_from_dir=True)
    assert len(items) == folder.inputs
    by_name = {Path(i.source).name: i for i in items}
    assert by_name["photo.png"].truth == "c"
    assert by_name["good.jpg"].truth is None  # directly under the root: no class
    assert by_name["selfloop.jpg"].error[0] == "symlink_loop"
    assert by_name["broken.jpg"].error[0] == "broken_symlink"
    assert by_name["escape.jpg"].error[0] == "outside_root"
    assert not any("loop/" in i.source for i in items)  # the folder loop is walked once


def test_folder_symlink_outside_root_is_followed_when_allowed(tmp_path: Path) -> None:
    folder = build_hostile_folder(tmp_path)
    items = {Path(i.source).name: i for i in _items(str(folder.root), allow_outside_root=True)}
    assert items["escape.jpg"].error is None and items["escape.jpg"].locator == "path"


def test_image_folder_convention_gives_one_class_per_subfolder(tmp_path: Path) -> None:
    root = build_class_folder(tmp_path, {"cat": 2, "dog": 3})
    truths = sorted(i.truth for i in _items(f"folder:{root}", label_from_dir=True))
    assert truths == ["cat", "cat", "dog", "dog", "dog"]


def test_manifest_maps_columns_and_keeps_metadata(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(image_bytes(1))
    (tmp_path / "m.csv").write_text(
        "file,category,caption,score\nimgs/a.jpg,hotel,a room,0.5\nhttps://example.com/b.jpg,pool,a pool,0.7\n,lobby,x,0.1\n"
    )
    items = _items(str(tmp_path / "m.csv"), columns={"truth": "category"})
    assert [i.locator for i in items] == ["path", "url", "none"]
    assert items[0].path == str(tmp_path / "imgs" / "a.jpg") and items[0].truth == "hotel"
    assert items[0].metadata == {"caption": "a room", "score": 0.5}
    assert items[2].error[0] == "missing_location"


def test_manifest_paths_cannot_escape_their_root_unless_allowed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image_bytes(2))
    (tmp_path / "data").mkdir()
    rows = [{"path": "../secret.jpg"}, {"path": str(secret)}, {"path": "ok/../../secret.jpg"}]
    (tmp_path / "data" / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    refused = _items(str(tmp_path / "data" / "m.jsonl"))
    assert [i.error[0] for i in refused] == ["outside_root"] * 3
    allowed = _items(str(tmp_path / "data" / "m.jsonl"), allow_outside_root=True)
    assert all(i.error is None for i in allowed)
    rooted = _items(str(tmp_path / "data" / "m.jsonl"), manifest_root=tmp_path)
    assert rooted[1].error is None and rooted[0].error is not None  # ../ from the new root still escapes


def test_a_manifest_url_of_another_scheme_is_kept_for_the_fetch_to_refuse(tmp_path: Path) -> None:
    """Not a `missing_location` under the row's number: the URL is the source, and `invalid_url` its error."""
    (tmp_path / "m.csv").write_text("path,url\n,ftp://example.com/x.jpg\n,HTTP://Example.com/y.jpg\n,\n")
    items = _items(str(tmp_path / "m.csv"))
    assert [(i.locator, i.source) for i in items[:2]] == [
        ("url", "ftp://example.com/x.jpg"),
        ("url", "HTTP://Example.com/y.jpg"),
    ]
    assert items[2].error[0] == "missing_location"
    from ray_jobs.ingest.fetch import Fetcher

    assert Fetcher(IngestOptions()).fetch(items[0].url).reason == "invalid_url"


@pytest.mark.parametrize("spec", ["", "  "])
def test_an_empty_source_is_refused_not_read_as_the_working_directory(spec: str) -> None:
    with pytest.raises(SourceError, match="empty") as refused:
        open_source(spec, IngestOptions())
    assert refused.value.reason == "bad_source"


def test_a_misspelled_source_kind_is_named(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"no source kind 'foldr'.*folder"):
        open_source(f"foldr:{tmp_path}", IngestOptions())
    assert detect_kind("HTTP://example.com/a.jpg") == "url"


def test_a_manifest_line_that_is_not_json_is_named_by_its_line(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"path": "a.jpg"}\n\n{"path": "b.jpg",}\n')
    with pytest.raises(SourceError, match="line 3: Expecting property name"):
        open_source(str(tmp_path / "m.jsonl"), IngestOptions())


def test_manifest_with_unknown_column_mapping_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path\na.jpg\n")
    with pytest.raises(SourceError, match="no column"):
        open_source(str(tmp_path / "m.csv"), IngestOptions(columns={"truth": "nope"}))
    (tmp_path / "n.csv").write_text("name\na.jpg\n")
    with pytest.raises(SourceError, match="--column path=COL"):
        open_source(str(tmp_path / "n.csv"), IngestOptions())


def test_url_list_ignores_blank_lines_and_comments(tmp_path: Path) -> None:
    (tmp_path / "u.txt").write_text("# photos\nhttps://a.example/1.jpg\n\n  https://a.example/2.jpg  \n")
    assert [i.url for i in _items(str(tmp_path / "u.txt"))] == [
        "https://a.example/1.jpg",
        "https://a.example/2.jpg",
    ]


def _sharegpt(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for n in range(3):
        (tmp_path / "img" / f"{n}.jpg").write_bytes(image_bytes(20 + n))
    samples = [
        {
            "messages": [
                {"role": "user", "content": "<image>What is this?"},
                {"role": "assistant", "content": "a cat"},
            ],
            "images": ["img/0.jpg"],
        },
        {
            "conversations": [
                {"from": "human", "value": "<image><image>Same?"},
                {"from": "gpt", "value": "no"},
            ],
            "images": ["img/1.jpg", "img/2.jpg"],
        },
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "images": [],
        },
        {
            "messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
            "images": ["../../etc/passwd"],
        },
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    return path


def test_sharegpt_single_image_samples_keep_their_messages(tmp_path: Path) -> None:
    path = _sharegpt(tmp_path)
    assert detect_kind(str(path)) == "sharegpt"
    items = _items(str(path))
    first = items[0]
    assert first.path == str(tmp_path / "img" / "0.jpg")
    assert first.sample.messages == [
        {"role": "user", "content": "<image>What is this?"},
        {"role": "assistant", "content": "a cat"},
    ]
    assert (
        first.metadata["sharegpt_sample"].endswith("data.json#0")
        and first.metadata["sharegpt_conversation"] is None
    )


def test_sharegpt_multi_image_samples_keep_the_conversation_verbatim_not_as_messages(tmp_path: Path) -> None:
    items = _items(str(_sharegpt(tmp_path)))
    pair = [i for i in items if i.metadata.get("sharegpt_sample", "").endswith("#1")]
    assert [i.metadata["sharegpt_image_index"] for i in pair] == [0, 1]
    assert all(i.messages is None for i in pair)
    assert json.loads(pair[0].metadata["sharegpt_conversation"])[1] == {"from": "gpt", "value": "no"}


def test_sharegpt_text_only_samples_are_skipped_and_escaping_paths_refused(tmp_path: Path) -> None:
    items = _items(str(_sharegpt(tmp_path)))
    assert len(items) == 5
    assert items[3].skip == "text-only sample"
    assert items[4].error[0] == "outside_root"


def test_hf_save_to_disk_dataset_with_image_feature_and_class_labels(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["cat", "dog"]),
            "caption": datasets.Value("string"),
        }
    )
    rows = {
        "image": [{"bytes": image_bytes(n), "path": None} for n in range(3)],
        "label": [0, 1, 1],
        "caption": ["a", "b", "c"],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    assert detect_kind(str(tmp_path / "hf")) == "hf"
    source = open_source(str(tmp_path / "hf"), IngestOptions())
    items = list(source.items())
    assert [i.truth for i in items] == ["cat", "dog", "dog"]
    assert all(i.locator == "cell" and i.data is None for i in items), "the driver holds no image bytes"
    assert [read_cell(i.url, i.path, 10**6) for i in items] == [image_bytes(n) for n in range(3)]
    assert source.metadata_fields.keys() == {"caption"}


def test_hf_images_are_read_by_the_workers_from_every_shard_and_a_row_without_bytes_is_an_error(tmp_path: Path) -> None:
    import datasets

    images = [image_bytes(n) for n in range(7)] + [b"", None]
    features = datasets.Features({"image": datasets.Image(), "n": datasets.Value("int32")})
    rows = {"image": [None if b is None else {"bytes": b, "path": None} for b in images], "n": list(range(9))}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"), num_shards=3)
    assert len(list((tmp_path / "hf").glob("*.arrow"))) == 3

    items = _items(str(tmp_path / "hf"))

    assert [i.metadata["n"] for i in items] == list(range(9))
    cells = [i for i in items if i.locator == "cell"]
    assert len({i.url for i in cells}) == 3, "rows of every shard point into that shard"
    assert [read_cell(i.url, i.path, 10**6) for i in cells] == images[:7]
    assert [i.error[0] for i in items[7:]] == ["missing_location"] * 2
    assert read_cell(cells[0].url, cells[0].path, 10).reason == "too_large"
    assert read_cell(str(tmp_path / "gone.arrow"), "arrow:1-1:0:image", 10**6).reason == "not_found"
    shard = Path(cells[0].url)
    shard.write_bytes(shard.read_bytes() + b"\0")  # rewritten after the listing
    worker._arrow_table.cache_clear()  # a worker process that opens it now
    assert read_cell(cells[0].url, cells[0].path, 10**6).reason == "source_changed"


def test_hf_dataset_with_raw_bytes_column_and_splits(tmp_path: Path) -> None:
    import datasets

    def split(offset: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"img": [image_bytes(offset + n) for n in range(2)], "n": [1, 2]})

    datasets.DatasetDict({"train": split(0), "test": split(10)}).save_to_disk(str(tmp_path / "dd"))
    items = _items(f"hf:{tmp_path / 'dd'}")
    assert [i.metadata["split"] for i in items] == ["train", "train", "test", "test"]
    assert all(i.locator == "cell" for i in items)
    assert [read_cell(i.url, i.path, 10**6) for i in items] == [image_bytes(n) for n in (0, 1, 10, 11)]


def test_each_split_s_class_labels_are_its_own_and_minus_one_is_no_label(tmp_path: Path) -> None:
    """Before: every split's label numbers were read by the first split's names (test's 0 stored as 'cat')."""
    import datasets

    def split(names: list[str], labels: list[int], offset: int) -> datasets.Dataset:
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        images = [{"bytes": image_bytes(offset + n), "path": None} for n in range(len(labels))]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    splits = {"train": split(["cat", "dog"], [0, 1], 0), "test": split(["dog", "cat"], [0, 1, -1], 10)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    items = _items(str(tmp_path / "dd"))
    assert [(i.metadata["split"], i.truth) for i in items] == [
        ("train", "cat"), ("train", "dog"), ("test", "dog"), ("test", "cat"), ("test", None)
    ]


def test_an_image_only_dataset_is_listed_and_a_path_column_follows_manifest_root(tmp_path: Path) -> None:
    """An image-only set was an internal error (zip of no rows); --manifest-root was not read for hf."""
    import datasets

    features = datasets.Features({"image": datasets.Image()})
    rows = {"image": [{"bytes": image_bytes(n), "path": None} for n in range(3)]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "only"))
    items = _items(str(tmp_path / "only"))
    assert [read_cell(i.url, i.path, 10**6) for i in items] == [image_bytes(n) for n in range(3)]
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(image_bytes(5))
    datasets.Dataset.from_dict({"path": ["pics/a.jpg"]}).save_to_disk(str(tmp_path / "paths"))
    assert _items(str(tmp_path / "paths"))[0].path == str(tmp_path / "paths" / "pics" / "a.jpg")  # by default
    [item] = _items(str(tmp_path / "paths"), manifest_root=tmp_path)
    assert item.error is None and item.path == str(tmp_path / "pics" / "a.jpg")


def test_a_dotted_column_name_passes_through_with_an_underscore(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [image_bytes(1)], "meta.src": ["cam"], "meta_src": ["taken"]}), tmp_path / "d.parquet")
    source = open_source(str(tmp_path / "d.parquet"), IngestOptions())
    assert set(source.metadata_fields) == {"meta_src", "meta_src_"}
    assert next(iter(source.items())).metadata == {"meta_src_": "cam", "meta_src": "taken"}


def test_an_image_file_is_a_source_of_one_item_labeled_by_its_folder(tmp_path: Path) -> None:
    root = build_class_folder(tmp_path, {"beach": 1})
    photo = root / "beach" / "0.jpg"
    assert detect_kind(str(photo)) == "file"
    [item] = _items(str(photo), label_from_dir=True)
    assert (item.source_kind, item.locator, item.path, item.truth) == ("file", "path", str(photo), "beach")
    assert _items(f"file:{photo}")[0].truth is None  # no --label-from-dir: no truth
    (tmp_path / "notes.bin").write_bytes(b"x")
    with pytest.raises(SourceError, match="cannot tell what kind"):
        _items(str(tmp_path / "notes.bin"))
    with pytest.raises(SourceError, match="is not a file"):
        _items(f"file:{root}")


def test_modelscope_local_dataset_folder_leaves_no_cache_behind(tmp_path: Path, monkeypatch) -> None:
    root = build_class_folder(tmp_path, {"beach": 2, "room": 1})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    source = open_source(f"modelscope:{root}", IngestOptions())
    assert [p.name.startswith("lancetag-modelscope-") for p in scratch.iterdir()] == [True]  # the builders' cache
    items = list(source.items())
    assert sorted(i.truth for i in items) == ["beach", "beach", "room"]
    assert all(i.locator in ("bytes", "path") and i.source_kind == "modelscope" for i in items)
    del source
    gc.collect()
    assert list(scratch.iterdir()) == []
    # a folder the builders cannot read leaves nothing either
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.bin").write_bytes(b"x")
    with pytest.raises(SourceError):
        open_source(f"modelscope:{tmp_path / 'notes'}", IngestOptions())
    assert list(scratch.iterdir()) == []


def test_a_modelscope_folder_of_parquet_files_is_read_in_place_with_its_splits(tmp_path: Path, monkeypatch) -> None:
    """The Hub's layout (``data/{split}-0000n-of-0000m.parquet``): no Arrow cache, the images stay in the files."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    images = [image_bytes(n) for n in range(6)]
    for split, part in (("train", range(0, 4)), ("test", range(4, 6))):
        rows = {"image": [{"bytes": images[n], "path": f"{n}.jpg"} for n in part], "label": [n % 2 for n in part]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))

    def no_builder(*args, **kwargs):
        raise AssertionError("the packaged builders copy every image into an Arrow cache")

    monkeypatch.setattr(datasets, "load_dataset", no_builder)
    items = _items(f"modelscope:{tmp_path}")

    assert {i.locator for i in items} == {"cell"} and {i.source_kind for i in items} == {"modelscope"}
    got = {read_cell(i.url, i.path, 10**6): (i.truth, i.metadata["split"]) for i in items}
    assert got == {images[n]: (["cat", "dog"][n % 2], "train" if n < 4 else "test") for n in range(6)}

    # A card declaring the default configuration's files (as push_to_hub writes it): those files only.
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n---\n# cats\n"
    )
    declared = _items(f"modelscope:{tmp_path}")
    assert sorted(read_cell(i.url, i.path, 10**6) for i in declared) == sorted(images[:4])
    assert all("split" not in i.metadata for i in declared), "one split: no split column"


def test_detect_kind_by_location(tmp_path: Path) -> None:
    (tmp_path / "u.txt").write_text("")
    (tmp_path / "m.csv").write_text("path\n")
    (tmp_path / "plain.json").write_text('[{"path": "a.jpg"}]')
    assert detect_kind("https://x.example/a.jpg") == "url"
    assert detect_kind(str(tmp_path)) == "folder"
    assert detect_kind(str(tmp_path / "u.txt")) == "urls"
    assert detect_kind(str(tmp_path / "m.csv")) == "manifest"
    assert detect_kind(str(tmp_path / "plain.json")) == "manifest"
    with pytest.raises(SourceError, match="does not exist"):
        detect_kind(str(tmp_path / "nope"))


def test_messages_are_normalised_to_role_content_with_one_image_placeholder() -> None:
    turns = normalize_messages(
        '[{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "a pool"}]'
    )
    assert turns == [
        {"role": "user", "content": "<image>Describe."},
        {"role": "assistant", "content": "a pool"},
    ]
    with pytest.raises(InvalidMessages, match="2 <image>"):
        normalize_messages([{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(InvalidMessages):
        normalize_messages([{"role": "robot", "content": "x"}])


@pytest.mark.parametrize(
    ("roles", "says"),
    [
        (["assistant", "user"], "turn 0 is assistant"),
        (["user", "assistant", "user"], "end with a user turn"),
        (["user", "system", "assistant"], "turn 1 is system"),
        (["system"], "no user turn"),
        (["user", "user", "assistant"], "turn 1 is user"),
    ],
)
def test_turns_llamafactory_would_skip_are_invalid_messages_at_ingest(roles: list[str], says: str) -> None:
    """LLaMA-Factory's converter skips such a sample with a log line and trains on without it: ingest
    counted it as added. The orders it takes pass (a system turn first, tool turns in place)."""
    with pytest.raises(InvalidMessages, match=says):
        normalize_turns([{"role": r, "content": "<image>x" if k == 0 else "y"} for k, r in enumerate(roles)])
    for good in (["user", "assistant"], ["system", "user", "assistant", "user", "assistant"],
                 ["user", "function_call", "observation", "assistant"]):
        assert [t["role"] for t in normalize_turns([{"role": r, "content": "z"} for r in good])] == good


def test_prompt_template_builds_user_and_assistant_turns() -> None:
    built = messages_from_template("Describe this {kind} photo.", "a sunny pool", {"kind": "hotel"})
    assert built == [
        {"role": "user", "content": "<image>Describe this hotel photo."},
        {"role": "assistant", "content": "a sunny pool"},
    ]
    assert messages_from_template("<image>Describe.", None, {}) is None
    assert messages_from_template("<image>{unknown}", "x", {})[0]["content"] == "<image>{unknown}"


def test_manifest_paths_to_fifos_and_devices_are_refused_without_blocking(tmp_path: Path) -> None:
    import os

    from ray_jobs.ingest.worker import read_file

    os.mkfifo(tmp_path / "pipe.jpg")
    for path in (tmp_path / "pipe.jpg", Path("/dev/zero"), tmp_path):
        result = read_file(str(path), 1024)
        assert getattr(result, "reason", None) == "not_a_file"


def test_an_input_whose_read_or_check_raises_unforeseen_is_its_own_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection (a stand-in for a bug no test knows yet): the URL and the image that raise become
    `internal` records; the file beside them is read and checked as ever, so the job goes on."""
    from ray_jobs.ingest.fetch import Fetcher

    good, odd = tmp_path / "good.png", tmp_path / "odd.png"
    good.write_bytes(image_bytes(1, "PNG"))
    odd.write_bytes(image_bytes(2, "PNG"))
    monkeypatch.setattr(Fetcher, "fetch", lambda self, url: 1 / 0)
    real_validate = worker.validate_image
    monkeypatch.setattr(
        worker, "validate_image", lambda data, **k: [][0] if data == odd.read_bytes() else real_validate(data, **k)
    )
    rows = [
        {"idx": 0, "locator": "url", "path": None, "url": "https://example.com/a.jpg", "data": None, "scan": False},
        {"idx": 1, "locator": "path", "path": os.fsencode(good), "url": None, "data": None, "scan": False},
        {"idx": 2, "locator": "path", "path": os.fsencode(odd), "url": None, "data": None, "scan": False},
    ]
    options = IngestOptions()
    results = worker.check_batch(rows, worker.read_batch(rows, options, options.model_dump_json()), options).to_pylist()
    assert [(r["status"], r["reason"]) for r in results] == [("error", "internal"), ("ok", None), ("error", "internal")]
    assert results[0]["message"].startswith("ZeroDivisionError") and results[2]["message"].startswith("IndexError")


def test_read_file_returns_every_byte_and_refuses_only_what_is_over_the_limit(tmp_path: Path) -> None:
    from ray_jobs.ingest.worker import SKIP, read_file

    jpeg = (b"\xff\xd8\xff" + bytes(range(256)) * 4)[:1024]
    for size in (0, 1, 15, 16, 17, 1000, 1024):
        for name in (f"f{size}.jpg", f"f{size}"):
            path = tmp_path / name
            path.write_bytes(jpeg[:size])
            # A scanned file without an image name needs the magic bytes (3 for JPEG) to be read.
            expected = SKIP if name == f"f{size}" and size < 3 else jpeg[:size]
            assert read_file(str(path), 1024, scan=True) == expected
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8\xff" + b"x" * 1022)
    assert getattr(read_file(str(big), 1024), "reason", None) == "too_large"
    text = tmp_path / "notes"
    text.write_bytes(b"plain text, no magic" * 100)
    assert read_file(str(text), 1024, scan=True) == SKIP
    assert read_file(str(text), 4096, scan=False) == text.read_bytes()  # listed explicitly: read, judged later


def test_parquet_images_stay_in_the_file_where_row_group_statistics_show_every_image_present(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images: list[bytes | None] = [image_bytes(n) for n in range(4)] + [image_bytes(4), None] + [image_bytes(6), b""]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    column = pa.array([None if b is None else {"bytes": b, "path": f"p{n}.png"} for n, b in enumerate(images)], struct)
    pq.write_table(pa.table({"image": column, "n": list(range(8))}), tmp_path / "hub.parquet", row_group_size=2)
    pq.write_table(pa.table({"img": images[:4], "n": list(range(4))}), tmp_path / "raw.parquet", row_group_size=3)

    hub = _items(str(tmp_path / "hub.parquet"))

    # The group with a null is read by the listing (a Ray task, here in-process), which sends on cells and paths.
    assert [i.locator for i in hub] == ["cell"] * 5 + ["none"] + ["cell"] * 2
    assert [i.source for i in hub[:5]] == [f"p{n}.png" for n in range(5)]
    assert [read_cell(i.url, i.path, 10**6) for i in hub[:5] + hub[6:7]] == images[:5] + images[6:7]
    assert hub[5].error[0] == "missing_location", "a null image: an error record"
    assert read_cell(hub[7].url, hub[7].path, 10**6).reason == "missing_location", "empty bytes: an error record"
    (tmp_path / "truncated.parquet").write_bytes((tmp_path / "raw.parquet").read_bytes()[:200])
    with pytest.raises(SourceError, match="cannot read the Parquet source"):
        open_source(str(tmp_path / "truncated.parquet"), IngestOptions())
    raw = _items(str(tmp_path / "raw.parquet"))
    assert [i.locator for i in raw] == ["cell"] * 4
    assert [read_cell(i.url, i.path, 10**6) for i in raw] == images[:4], "a cell of the second row group too"
    other = [image_bytes(50 + n) for n in range(4)]  # the same name, new content: a later ingest reads the new file
    pq.write_table(pa.table({"img": other, "n": list(range(4))}), tmp_path / "raw.parquet", row_group_size=3)
    assert [read_cell(i.url, i.path, 10**6) for i in _items(str(tmp_path / "raw.parquet"))] == other


def test_parquet_lists_of_images_per_row_stay_in_the_file_as_cells_the_workers_read(tmp_path: Path) -> None:
    """A multi-image sample's images (LLaMA-Factory's ``images`` column, Hub Parquet): one cell per image, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    a, b, c, d = (image_bytes(n) for n in range(4))
    element = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    def chat(n: int) -> list[dict]:
        return [{"role": "user", "content": "<image>" * n + "Same?"}, {"role": "assistant", "content": "No."}]

    full = [[a, b], [c], [d, a, b]]  # every image present: statistics say so, the paths give the counts
    gaps = [[{"bytes": c, "path": "c.png"}, {"bytes": None, "path": "img/gone.png"}], None, [{"bytes": b"", "path": "img/e.png"}]]
    pq.write_table(pa.table({
        "images": pa.array([[{"bytes": x, "path": None} for x in row] for row in full] + gaps, pa.list_(element)),
        "messages": [chat(2), chat(1), chat(3), chat(2), chat(0), chat(1)],
    }), tmp_path / "chats.parquet", row_group_size=3)
    pq.write_table(pa.table({"images": pa.array(full, pa.list_(pa.binary()))}), tmp_path / "raw.parquet", row_group_size=2)

    items = _items(str(tmp_path / "chats.parquet"))

    listed = [(i.sample and i.sample.index, i.sample_position, i.locator) for i in items]
    assert listed == [(0, 0, "cell"), (0, 1, "cell"), (1, 0, "cell"), (2, 0, "cell"), (2, 1, "cell"), (2, 2, "cell"),
                      (3, 0, "cell"), (3, 1, "path"), (None, 0, "none"), (5, 0, "path")]
    cells = [i for i in items if i.locator == "cell"]
    assert [read_cell(i.url, i.path, 10**6) for i in cells] == [a, b, c, d, a, b, c]
    assert [i.sample.images for i in items if i.sample and i.sample_position == 0] == [2, 1, 3, 2, 1]
    assert items[7].path == str(tmp_path / "img" / "gone.png"), "a missing image's path stands in for its bytes"
    assert items[8].error[0] == "missing_location", "a null list: no image"
    assert items[9].path == str(tmp_path / "img" / "e.png"), "empty bytes in a group the listing read: the path"
    raw = [i for i in _items(str(tmp_path / "raw.parquet")) if i.locator == "cell"]
    assert [read_cell(i.url, i.path, 10**6) for i in raw] == [a, b, c, d, a, b], "a list of plain bytes, counted from its bytes"


def _chat(n: int) -> dict:
    return {"messages": [{"role": "user", "content": f"<image>Q{n}"}, {"role": "assistant", "content": "A"}],
            "images": [f"img/{n}.jpg"]}


def test_a_sharegpt_jsonl_line_that_is_not_json_is_its_own_error_and_the_other_lines_ingest(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(_chat(0)) + "\n{not json\n\n" + json.dumps(_chat(2)) + "\n")
    assert detect_kind(str(path)) == "sharegpt"

    items = _items(str(path))

    assert [i.path for i in items if i.path] == [str(tmp_path / "img" / "0.jpg"), str(tmp_path / "img" / "2.jpg")]
    [bad] = [i for i in items if i.sample.error]
    assert bad.sample.error[0] == "invalid_sample" and "line 2 is not valid JSON" in bad.sample.error[1]


def test_a_lone_surrogate_escape_in_json_is_that_sample_s_error_or_the_manifest_s(tmp_path: Path) -> None:
    """JSON can spell half a character (\\ud800); Arrow and UTF-8 cannot hold it (it was an internal error at commit)."""
    half = _chat(0)
    half["messages"][0]["content"] = "<image>What \ud800 is it?"
    pair = _chat(1) | {"images": ["img/1.jpg", "img/2.jpg"]}
    pair["messages"][0]["content"] = "<image><image>Same \udcff?"
    (tmp_path / "chats.json").write_text(json.dumps([half, pair, _chat(3)]))
    items = _items(str(tmp_path / "chats.json"))
    assert [i.sample.error[0] if i.sample.error else None for i in items] == ["invalid_sample"] * 3 + [None]
    kept = [i.metadata["sharegpt_conversation"] for i in items[1:3]]  # what the pair's image rows keep: text
    assert kept[0] == kept[1] and "Same \\xff?" in kept[0] and kept[0].encode()
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "a.jpg", "note": "a \udcff b"}) + "\n")
    with pytest.raises(SourceError, match="half of a character"):
        open_source(str(tmp_path / "m.jsonl"), IngestOptions())


def test_sharegpt_samples_of_odd_shapes_are_each_their_own_outcome(tmp_path: Path) -> None:
    """Each of these ended the whole run as an internal error, or lost a value without a word."""
    from ray_jobs.ingest.worker import read_file

    number = _chat(1) | {"images": 5}
    single = _chat(2) | {"images": {"path": "img/2.jpg"}, "split": 5}
    nul = _chat(3) | {"images": ["img/\u0000.jpg"]}
    lines = [json.dumps(s).encode() for s in (_chat(0), number, single, nul)]
    lines.append(json.dumps(_chat(4)).encode().replace(b"Q4", b"Q\xff4"))  # a Latin-1 byte, past the first sample
    (tmp_path / "chats.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    items = _items(str(tmp_path / "chats.jsonl"))
    by_sample = {i.sample.index: i for i in items}
    assert by_sample[1].skip and by_sample[1].sample.error[0] == "invalid_sample" and "got int" in by_sample[1].sample.error[1]
    assert by_sample[2].path == str(tmp_path / "img" / "2.jpg") and by_sample[2].sample.split == "5"
    assert by_sample[2].sample.error is None
    assert by_sample[3].locator == "path" and read_file(by_sample[3].path, 1024).reason == "not_found"
    assert by_sample[4].sample.error[0] == "invalid_sample" and "not UTF-8" in by_sample[4].sample.error[1]


def test_detecting_a_sharegpt_file_reads_its_first_sample_only(tmp_path: Path) -> None:
    big = _chat(0) | {"system": "x" * 200_000}  # the first sample is longer than one read
    path = tmp_path / "data.json"
    path.write_text("[\n  " + json.dumps(big) + ",\n  {this part is never read")
    assert detect_kind(str(path)) == "sharegpt"
    (tmp_path / "plain.json").write_text('[{"path": "a.jpg", "label": "cat"}, {broken')
    assert detect_kind(str(tmp_path / "plain.json")) == "manifest"
    (tmp_path / "broken.jsonl").write_text("{broken\n" + json.dumps(_chat(1)) + "\n")
    assert detect_kind(str(tmp_path / "broken.jsonl")) == "manifest", "a first line that is not JSON is no sharegpt file"
    text_only = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (tmp_path / "text_first.jsonl").write_text(json.dumps(text_only) + "\n" + json.dumps(_chat(1)) + "\n")
    assert detect_kind(str(tmp_path / "text_first.jsonl")) == "sharegpt", "turns and no image column: a text-only sample"
    (tmp_path / "rows.jsonl").write_text(json.dumps(text_only | {"path": "a.jpg"}) + "\n")
    assert detect_kind(str(tmp_path / "rows.jsonl")) == "manifest", "a row's image and its turns: a manifest"


def test_source_columns_named_like_computed_ones_are_kept_under_a_prefix_not_dropped(tmp_path: Path) -> None:
    """A catalogue's own ``id`` or declared ``width`` is data: kept as ``source_id``/``source_width``
    (a Lance image table's own columns mean what ingest computes, and are left out)."""
    import lance

    from lance_io import append_images
    from tests.table_fixtures import image_rows

    (tmp_path / "a.png").write_bytes(image_bytes(1, "PNG"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,id,width,label\na.png,sku-17,999,cat\n")
    source = open_source(str(manifest), IngestOptions())
    assert source.metadata_fields == {"source_id": pa.string(), "source_width": pa.int64()}
    (item,) = list(source.items())
    assert item.truth == "cat" and item.metadata == {"source_id": "sku-17", "source_width": 999}
    manifest.write_text("path,width,source_width\na.png,999,given\n")  # the source names source_width itself: that one
    (item,) = list(open_source(str(manifest), IngestOptions()).items())
    assert item.metadata == {"source_width": "given"}

    table, other = str(tmp_path / "t.lance"), str(tmp_path / "other.lance")
    append_images(table, image_rows(range(3)))
    assert open_source(table, IngestOptions()).metadata_fields == {}, "an image table's own columns are computed again"
    lance.write_dataset(pa.table({"id": ["a"], "image": [image_bytes(2)], "shop": ["s"]}), other)
    (item,) = list(open_source(other, IngestOptions()).items())
    assert item.metadata == {"source_id": "a", "shop": "s"}


def test_an_existing_lance_table_is_a_source_of_its_image_bytes_and_truth(tmp_path: Path) -> None:
    import lance
    import pyarrow as pa

    from lance_io import append_images
    from tests.table_fixtures import image_rows

    rows = image_rows(range(150))  # three of the workers' blocks of offsets
    source = str(tmp_path / "src.lance")
    append_images(source, rows.slice(0, 90))
    append_images(source, rows.slice(90))
    lance.dataset(source).delete(f"id = '{rows['id'][3].as_py()}'")  # offsets count the rows that remain
    assert detect_kind(source) == "lance"
    kept = [r for n, r in enumerate(rows.to_pylist()) if n != 3]

    items = _items(source)

    assert {i.locator for i in items} == {"cell"}, "the image bytes stay in the table: the workers take them"
    got = {read_cell(i.url, i.path, 10**6): i.truth for i in items}
    assert got == {r["image"]: r["truth"] for r in kept}
    lance.dataset(source).delete(f"id = '{kept[0]['id']}'")  # a later version, where every offset shifts by one
    worker._lance_block.cache_clear(), worker._lance_version.cache_clear()  # as a fresh worker process
    assert [read_cell(i.url, i.path, 10**6) for i in items] == [r["image"] for r in kept], "the listed version"

    # A nullable image column next to a URL column that can stand in for it: the listing (a Ray task,
    # here in-process) reads which rows have bytes; a null or empty image goes to its URL.
    other = str(tmp_path / "with-urls.lance")
    images = [image_bytes(7), None, b""]
    urls = ["http://h/a.png", "http://h/b.png", "http://h/c.png"]
    lance.write_dataset(pa.table({"image": pa.array(images, pa.binary()), "url": urls}), other)
    fallback = _items(other)
    assert [i.locator for i in fallback] == ["cell", "url", "url"]
    assert read_cell(fallback[0].url, fallback[0].path, 10**6) == images[0] and fallback[2].url == urls[2]

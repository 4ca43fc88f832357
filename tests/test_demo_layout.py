"""`lancetag demo --data DIR`: what the folder's layout tells the demo (classes, and the split a
dataset shipped with: ``train/<class>/``, ``test/<class>/``), before any model work."""

from __future__ import annotations

from pathlib import Path

import pytest

from lance_io.reasons import ReasonError
from ray_jobs.demo import (
    FolderLayout,
    _label_coverage,
    add_split_column,
    folder_layout,
    ingest_folder,
    truth_counts,
)
from tests.ingest_fixtures import image_bytes


def _images(folder: Path, count: int, seed: int) -> list[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    images = [image_bytes(seed + i) for i in range(count)]
    for i, image in enumerate(images):
        (folder / f"{i}.jpg").write_bytes(image)
    return images


def test_a_folder_per_class_is_split_by_content_hash(tmp_path: Path) -> None:
    for name in ("cats", "dogs", "__MACOSX", ".cache"):
        (tmp_path / name).mkdir()
    layout = folder_layout(tmp_path)
    assert layout.labels == ["cats", "dogs"] and layout.splits == {}
    assert layout.place_of(str(tmp_path / "cats" / "1.jpg"))[1] is None
    assert layout.held_out() == "20% by content hash"


def test_an_image_takes_the_class_folder_it_sits_in_at_any_depth(tmp_path: Path) -> None:
    """``cats/2021/a.jpg`` is a cat, as torchvision's ImageFolder reads a folder; an image beside the
    class folders, or in a folder that is no class (hidden, ``__MACOSX``), has none."""
    for name in ("cats/2021/june", "dogs", ".thumbnails", "__MACOSX/cats"):
        (tmp_path / name).mkdir(parents=True)
    layout = folder_layout(tmp_path)
    assert layout.place_of(str(tmp_path / "cats" / "2021" / "june" / "a.jpg"))[0] == "cats"
    assert layout.place_of(str(tmp_path / "dogs" / "b.jpg"))[0] == "dogs"
    for nowhere in ("c.jpg", ".thumbnails/d.jpg", "__MACOSX/cats/._e.jpg", "../dogs/f.jpg"):
        assert layout.place_of(str(tmp_path / nowhere))[0] is None, nowhere
    assert layout.place_of("/elsewhere/dogs/g.jpg")[0] is None
    split = FolderLayout(tmp_path, ["cats", "dogs"], {"train": "train", "test": "test"})
    assert split.place_of(str(tmp_path / "test" / "cats" / "scans" / "a.jpg"))[0] == "cats"
    assert split.place_of(str(tmp_path / "test" / "a.jpg"))[0] is None  # in a split folder, in no class


def test_split_folders_give_the_classes_inside_them_and_keep_the_shipped_split(tmp_path: Path) -> None:
    for folder in ("Train/cats", "Train/dogs", "Train/birds", "val/cats", "test/cats", "test/dogs", "__MACOSX/Train"):
        (tmp_path / folder).mkdir(parents=True)
    layout = folder_layout(tmp_path)
    assert layout.labels == ["birds", "cats", "dogs"]  # a class in one split only is still a class
    assert layout.splits == {"Train": "train", "val": "train", "test": "test"}  # the test folder held out
    assert layout.place_of(str(tmp_path / "test" / "cats" / "1.jpg"))[1] == "test"
    assert layout.place_of(str(tmp_path / "val" / "cats" / "1.jpg"))[1] == "train"
    assert layout.place_of(str(tmp_path / "notes.png"))[1] is None  # beside the splits: no class, hash split
    assert layout.held_out() == "the folder's own test split"


def test_a_wrapper_folder_is_looked_into_as_an_archive_unpacks(tmp_path: Path) -> None:
    """``flower_photos.tgz`` unpacks to ``flower_photos/<class>/`` (beside a LICENSE, and a Mac's
    ``__MACOSX``); a dataset's archive to ``dataset/train/<class>/``, ``dataset/test/<class>/``."""
    for folder in ("photos/flower_photos/daisy", "photos/flower_photos/roses", "photos/__MACOSX/flower_photos",
                   "archive/dataset/train/a", "archive/dataset/train/b", "archive/dataset/test/a"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "photos" / "LICENSE.txt").write_text("CC-BY")
    flowers = folder_layout(tmp_path / "photos")
    assert (flowers.root, flowers.labels, flowers.splits) == (tmp_path / "photos" / "flower_photos", ["daisy", "roses"], {})
    split = folder_layout(tmp_path / "archive")
    assert (split.root, split.labels) == (tmp_path / "archive" / "dataset", ["a", "b"])
    assert split.splits == {"test": "test", "train": "train"}
    assert split.place_of(str(split.root / "test" / "a" / "1.jpg"))[1] == "test"
    assert split.place_of(str(tmp_path / "other" / "test" / "a" / "1.jpg"))[1] is None  # not under the root
    (tmp_path / "photos" / "tulips").mkdir()  # two folders at the top: they are the classes
    assert folder_layout(tmp_path / "photos").labels == ["flower_photos", "tulips"]


def test_without_a_test_folder_the_validation_folder_is_held_out(tmp_path: Path) -> None:
    for folder in ("training/a", "training/b", "validation/a", "validation/b"):
        (tmp_path / folder).mkdir(parents=True)
    assert folder_layout(tmp_path).splits == {"training": "train", "validation": "test"}


@pytest.mark.parametrize(
    ("folders", "says"),
    [
        (["train", "test"], "holds split folders (test, train) but not two class folders"),  # images straight in them
        (["train/a", "test/a"], "found ['a']"),
        (["train/a", "train/b", "test"], "split folder(s) test of"),  # a test set shipped without its answers
        (["cats", "__MACOSX/cats"], "at least two class folders"),
        (["Cat", "cat", "dog"], "duplicate label 'cat'"),  # one label to the labeler, which ignores case
        (["train/Cat", "test/cat", "train/dog"], "duplicate label 'cat'"),
    ],
)
def test_a_layout_without_two_classes_is_refused(tmp_path: Path, folders: list[str], says: str) -> None:
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(ReasonError) as refused:
        folder_layout(tmp_path)
    assert refused.value.reason == "bad_source" and says in refused.value.message


def test_the_split_column_follows_the_split_folders_and_a_copy_in_both_is_held_out(ray_cluster, tmp_path: Path) -> None:
    """Ingested as the demo ingests, then split: every image in ``test/`` is held out, every other
    one trains; an image shipped in both splits is one row, in ``test/`` (read first, in name order),
    never trained on. A copy in another class folder is a ``truth_conflict`` naming both classes."""
    import lance

    from lance_io import read_errors

    data = tmp_path / "data"
    train = _images(data / "train" / "a", 5, 0) + _images(data / "train" / "b", 5, 10)
    test = _images(data / "test" / "a", 2, 20) + _images(data / "test" / "b", 2, 30)
    (data / "train" / "a" / "copy.jpg").write_bytes(test[0])  # leaked into training by the dataset
    (data / "train" / "b" / "mislabeled.jpg").write_bytes(test[1])  # test/a/1.jpg, in class b as well
    table = str(tmp_path / "images.lance")
    layout = folder_layout(data)
    summary = ingest_folder(data, table, layout, progress=False)
    assert (summary.added, summary.duplicates, summary.errors_by_reason) == (14, 1, {"truth_conflict": 1})
    (conflict,) = read_errors(table).to_pylist()
    assert conflict["source"] == str(data / "train" / "b" / "mislabeled.jpg")
    assert str(data / "test" / "a" / "1.jpg") in conflict["message"] and "'a'" in conflict["message"] and "'b'" in conflict["message"]

    add_split_column(table, layout)
    rows = lance.dataset(table).to_table(columns=["source", "split", "truth"]).to_pylist()
    held = {r["source"] for r in rows if r["split"] == "test"}
    assert held == {str(p) for p in (data / "test").rglob("*.jpg")} and len(train) + len(test) == len(rows)
    assert all(r["split"] == "train" for r in rows if "/train/" in r["source"])
    assert {r["truth"] for r in rows} == {"a", "b"}


def test_a_folder_per_class_keeps_the_hash_split_and_labels_images_at_any_depth(ray_cluster, tmp_path: Path) -> None:
    """The same function on a folder per class: the split is the content hash's, as before; an image
    one or two folders deeper in its class folder takes that class (ingest alone would name it after
    the folder it sits in), and one beside the class folders or in a hidden folder has no label."""
    import lance

    from lance_io.splits import split_of
    from ray_jobs.demo import TEST_FRACTION

    data = tmp_path / "data"
    _images(data / "a", 6, 0)
    _images(data / "a" / "scans" / "2021", 4, 10)
    _images(data / "b" / "more", 10, 20)
    _images(data / ".thumbnails", 2, 40)
    (data / "loose.jpg").write_bytes(image_bytes(50))
    (data / "c").mkdir()  # a class folder left empty
    table = str(tmp_path / "images.lance")
    layout = folder_layout(data)
    ingest_folder(data, table, layout, progress=False)
    add_split_column(table, layout)
    # what the ingest line reports: the unlabeled images, and the class no training image has
    assert _label_coverage(truth_counts(table), set(layout.labels)) == {"outside_classes": 3, "untrained_classes": ["c"]}
    rows = lance.dataset(table).to_table(columns=["id", "source", "truth", "split"]).to_pylist()
    assert len(rows) == 23
    assert [r["split"] for r in rows] == [split_of(r["id"], TEST_FRACTION, held_out="test") for r in rows]
    truths = {Path(r["source"]).relative_to(data).as_posix(): r["truth"] for r in rows}
    assert {k: v for k, v in truths.items() if v is None} == {".thumbnails/0.jpg": None, ".thumbnails/1.jpg": None,
                                                              "loose.jpg": None}
    assert sum(v == "a" for v in truths.values()) == 10 and truths["a/scans/2021/3.jpg"] == "a"
    assert sum(v == "b" for v in truths.values()) == 10


def test_a_class_folder_named_in_no_utf8_is_the_label_ingest_shows(tmp_path: Path) -> None:
    """A zip made on Windows or in Shift-JIS unpacks to folder names that are not UTF-8: the label is
    the name as ingest writes its sources (``\\xff``), so the task can be written and each image is
    labeled by it (before, the demo stopped with an internal UnicodeEncodeError at registration)."""
    import os

    from lance_io.errors import printable
    from lance_io.tasks import load_task
    from ray_jobs.demo import folder_task

    os.makedirs(os.fsencode(tmp_path) + b"/data/d\xffogs/2021")
    (tmp_path / "data" / "cats").mkdir()
    layout = folder_layout(tmp_path / "data")
    assert layout.labels == ["cats", "d\\xffogs"]
    image = os.fsdecode(os.fsencode(tmp_path) + b"/data/d\xffogs/2021/a\xfe.jpg")
    assert layout.place_of(printable(image))[0] == "d\\xffogs"  # a source as ingest stores it
    task = load_task(str(folder_task(layout, tmp_path)))
    assert task.questions()[0].values == ("cats", "d\\xffogs")


def test_class_folders_take_the_task_label_they_state_whatever_the_case(tmp_path: Path) -> None:
    """With ``--task`` given, ``Lobby/`` holds the task's ``lobby`` images, as an answer "Lobby."
    matches that label; a folder no label matches keeps its name, which the demo then refuses."""
    from lance_io.tasks import ClassifyTask

    for name in ("Lobby", "POOL", "room", "spa"):
        (tmp_path / name).mkdir()
    question = ClassifyTask(name="hotel", labels=["lobby", "pool", "room"]).questions()[0]
    layout = folder_layout(tmp_path).named_by(question)
    assert layout.names == {"Lobby": "lobby", "POOL": "pool"}
    assert layout.place_of(str(tmp_path / "Lobby" / "2021" / "a.jpg"))[0] == "lobby"
    assert layout.place_of(str(tmp_path / "room" / "a.jpg"))[0] == "room"
    assert layout.place_of(str(tmp_path / "spa" / "a.jpg"))[0] == "spa"


def test_folders_that_only_group_the_classes_are_looked_into(tmp_path: Path) -> None:
    """SUN397 ships ``a/abbey/``, ``a/airport/``, ``b/bakery/``: the classes are inside the grouping
    folders, whose names are found once each. A name found under two top folders (``cats/2021/``,
    ``dogs/2021/``), a top folder holding images itself, or one sub-folder a class keeps the top
    folders as the classes."""
    sun = tmp_path / "sun"
    for folder in ("a/abbey", "a/airport/terminal", "b/bakery", ".cache/x"):
        (sun / folder).mkdir(parents=True)
    (sun / "a" / "README").write_text("not an image")
    layout = folder_layout(sun)
    assert (layout.labels, layout.grouped) == (["abbey", "airport", "bakery"], True)
    assert layout.classes() == "3 class folders inside the grouping folders"  # said on the ingest line
    assert layout.place_of(str(sun / "a" / "airport" / "terminal" / "1.jpg"))[0] == "airport"
    assert layout.place_of(str(sun / "b" / "1.jpg"))[0] is None
    assert layout.held_out() == "20% by content hash"

    years = tmp_path / "years"
    for folder in ("cats/2021", "cats/2022", "dogs/2021"):
        (years / folder).mkdir(parents=True)
    assert (folder_layout(years).labels, folder_layout(years).grouped) == (["cats", "dogs"], False)
    (sun / "b" / "1.jpg").write_bytes(image_bytes(0))  # an image in a top folder: a class, not a group
    assert folder_layout(sun).labels == ["a", "b"]
    pairs = tmp_path / "pairs"
    for folder in ("cats/cat_photos", "dogs/dog_photos"):  # one sub-folder each: the top names are kept
        (pairs / folder).mkdir(parents=True)
    assert folder_layout(pairs).labels == ["cats", "dogs"]

"""The random backend (load tests, the article's demo scorer): real Serve app over HTTP, real tables."""

from __future__ import annotations

import pyarrow as pa
import pytest

from lance_io import append_images, open_table
from lance_io.reasons import ReasonError
from lance_io.schema import content_hashes
from lance_io.tasks import load_task
from serve_apps.backends.base import BackendConfig, create_backend
from tests.table_fixtures import image_rows, png_bytes

NOT_AN_IMAGE = b"this is not an image, just bytes"


def random_backend(seed: int = 0):
    return create_backend(BackendConfig(kind="random", model="random", options={"seed": seed}))


def table_with_a_broken_image(uri: str, seeds: range, rows_per_fragment: int) -> str:
    """A table of real PNGs plus one row whose bytes are not an image."""
    append_images(uri, image_rows(seeds), max_rows_per_file=rows_per_fragment)
    broken = image_rows([0]).to_pylist()[0]
    broken["id"], broken["sha256"] = content_hashes(NOT_AN_IMAGE)
    broken.update(image=NOT_AN_IMAGE, size_bytes=len(NOT_AN_IMAGE), source="test://broken")
    append_images(uri, pa.Table.from_pylist([broken], schema=image_rows([0]).schema))
    return uri


@pytest.fixture(scope="module")
def random_labelers(ray_cluster):
    """Two random labelers served over HTTP: digits (classify) and quality (score 60-100), seed 7."""
    from serve_apps.app import LabelerConfig, run_labeler, stop_labeler

    urls = {}
    for task in ("digits", "quality"):
        config = LabelerConfig(
            task=task,
            backend=BackendConfig(kind="random", model="random", options={"seed": 7}),
            app_name=f"test-random-{task}",
            route_prefix=f"/test-random-{task}",
            num_cpus=0.25,
        )
        urls[task] = run_labeler(config)
    yield urls
    for task in urls:
        stop_labeler(f"test-random-{task}")


def test_same_seed_and_image_give_the_same_answer_and_another_seed_another(tmp_path):
    task = load_task("digits")
    images = [png_bytes(s) for s in range(40)]
    first = [r.label for r in random_backend(3).label(images, task)]
    again = [r.label for r in random_backend(3).label(list(reversed(images)), task)][::-1]
    other = [r.label for r in random_backend(4).label(images, task)]
    assert first == again, "an image's answer depends on its bytes and the seed, not on batch order"
    assert first != other
    assert len(set(first)) > 3, "labels are spread over the label set"


def test_undecodable_bytes_get_an_image_decode_failed_record():
    results = random_backend().label([NOT_AN_IMAGE, png_bytes(1)], load_task("quality"))
    assert results[0].error == "image_decode_failed" and results[0].score is None
    assert results[1].ok and 60 <= results[1].score <= 100


def test_a_caption_task_is_refused_before_the_labeler_is_deployed(ray_cluster):
    from serve_apps.app import LabelerConfig, run_labeler

    config = LabelerConfig(
        task="caption", backend=BackendConfig(kind="random", model="random"), app_name="test-random-caption"
    )
    with pytest.raises(ReasonError, match="random backend answers classify and score") as refused:
        run_labeler(config)
    assert refused.value.reason == "task_kind_unsupported"
    from ray import serve

    assert "test-random-caption" not in serve.status().applications


@pytest.mark.slow
def test_label_job_through_the_served_random_backend_writes_typed_columns_reproducibly(random_labelers, tmp_path):
    from ray_jobs.label import LabelOptions, label_table

    first = table_with_a_broken_image(str(tmp_path / "a.lance"), range(60), rows_per_fragment=16)
    # The same images in another order and fragment layout: the answers must not change.
    second = table_with_a_broken_image(str(tmp_path / "b.lance"), range(59, -1, -1), rows_per_fragment=7)
    for uri in (first, second):
        for task, column in (("digits", "digit"), ("quality", "quality")):
            summary = label_table(uri, LabelOptions(task=task, column=column, serve=random_labelers[task]), progress=False)
            assert (summary.planned, summary.labeled, summary.failed) == (61, 60, 1)

    table = open_table(first).to_table()
    assert table.schema.field("digit").type == pa.string()
    assert table.schema.field("quality").type == pa.int32()
    assert table.schema.field("quality_confidence").type == pa.float32()
    rows = {r["id"]: r for r in table.to_pylist()}
    good = [r for r in rows.values() if r["source"] != "test://broken"]
    assert {r["digit"] for r in good} <= {str(d) for d in range(10)} and len({r["digit"] for r in good}) > 3
    assert all(60 <= r["quality"] <= 100 for r in good)
    assert all(r["quality_confidence"] == pytest.approx(1 / 41) for r in good)
    assert all(0 < r["digit_confidence"] <= 1 for r in good)
    assert all(r["digit_provenance"].startswith("random|") for r in good)
    (broken,) = [r for r in rows.values() if r["source"] == "test://broken"]
    assert broken["digit"] is None and broken["digit_error"].startswith("image_decode_failed: ")
    assert broken["quality"] is None and broken["quality_error"].startswith("image_decode_failed: ")
    assert "image_decode_failed" not in broken["digit_error"].removeprefix("image_decode_failed: "), "the reason once"

    again = {r["id"]: r for r in open_table(second).to_table().to_pylist()}
    for column in ("digit", "digit_confidence", "quality"):
        assert {i: r[column] for i, r in rows.items()} == {i: r[column] for i, r in again.items()}

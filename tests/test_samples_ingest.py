"""Ingesting training samples: errors with reasons, both sharegpt spellings, manifests and HF datasets, show, diff."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.samples_data import write_mllm_demo
from lance_io.errors import read_errors
from lance_io.samples import diff_samples, open_samples, sample_id
from ray_jobs.ingest import IngestOptions, ingest
from tests.conftest import LANCETAG

QUIET = {"progress": False}
A, B, C = "mllm_demo_data/1.png", "mllm_demo_data/2.png", "mllm_demo_data/3.png"


def _chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_a_missing_image_or_a_placeholder_count_mismatch_makes_an_error_record_for_that_sample(
    ray_cluster, tmp_path: Path
) -> None:
    samples = [
        {"messages": _chat("<image>Fine?", "Yes."), "images": [A]},
        {"messages": _chat("<image>Where is it?", "Gone."), "images": ["mllm_demo_data/missing.png"]},
        {"messages": _chat("<image>One placeholder, two images.", "Mismatch."), "images": [B, C]},
        {"messages": _chat("<image><image>Half there?", "Half."), "images": [A, "mllm_demo_data/gone.png"]},
    ]
    path = write_mllm_demo(tmp_path / "data", samples, name="broken")
    table = str(tmp_path / "t.lance")
    summary = ingest([str(path)], table, IngestOptions(**QUIET))

    counts = summary.samples
    assert (counts.samples_in, counts.added, counts.duplicates, counts.errors) == (4, 1, 0, 3) and summary.reconciled
    assert summary.added == 3  # the mismatched sample's images are fine images: they are in the table
    errors = {r["source"]: r for r in read_errors(table).to_pylist() if r["stage"] == "sample"}
    assert {k.rsplit("#", 1)[1]: v["reason"] for k, v in errors.items()} == {
        "1": "image_failed",
        "2": "placeholder_mismatch",
        "3": "image_failed",
    }
    missing = next(v for k, v in errors.items() if k.endswith("#1"))["message"]
    assert "missing.png" in missing and "not_found" in missing
    assert "1 <image> placeholder(s) for 2 image(s)" in next(v for k, v in errors.items() if k.endswith("#2"))["message"]
    assert [s["messages"][0]["content"] for s in open_samples(table).to_table().to_pylist()] == ["<image>Fine?"]


def test_both_role_spellings_system_tools_and_text_only_samples_are_kept(ray_cluster, tmp_path: Path) -> None:
    samples = [
        {
            "conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A digit."}],
            "system": "You see digits.",
            "tools": [{"name": "zoom"}],
            "images": [A],
            "origin": "crowd",
        },
        {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A digit."}],
         "images": [A]},
        {"messages": _chat("No image here.", "Fine."), "images": []},
    ]
    path = write_mllm_demo(tmp_path / "data", samples, name="mixed")
    table = str(tmp_path / "t.lance")
    summary = ingest([str(path)], table, IngestOptions(**QUIET))
    assert summary.samples.added == 3 and summary.skipped == 1 and summary.reconciled
    rows = sorted(open_samples(table).to_table().to_pylist(), key=lambda s: s["source_index"])
    assert rows[0]["messages"] == rows[1]["messages"] == _chat("<image>What?", "A digit.")
    assert rows[0]["id"] != rows[1]["id"]  # the system prompt is part of what a sample trains on
    assert (rows[0]["system"], json.loads(rows[0]["tools"])) == ("You see digits.", [{"name": "zoom"}])
    assert json.loads(rows[0]["metadata"]) == {"origin": "crowd"}
    assert rows[2]["image_ids"] == [] and rows[2]["source_kind"] == "sharegpt"


def test_manifest_messages_and_hf_conversations_become_one_image_samples(ray_cluster, tmp_path: Path) -> None:
    import datasets

    from bench.data import digit_images

    images = digit_images(3, start=40)
    (tmp_path / "img").mkdir()
    rows = []
    for i, (data, _) in enumerate(images[:2]):
        (tmp_path / "img" / f"{i}.png").write_bytes(data)
        rows.append({"path": f"img/{i}.png", "messages": _chat("Which digit?", f"digit {i}")})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    features = datasets.Features(
        {"image": datasets.Image(), "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]}
    )
    hf = {"image": [{"bytes": images[2][0], "path": None}],
          "conversations": [[{"from": "human", "value": "<image>Which?"}, {"from": "gpt", "value": "two"}]]}
    datasets.Dataset.from_dict(hf, features=features).save_to_disk(str(tmp_path / "hf"))

    table = str(tmp_path / "t.lance")
    summary = ingest([f"manifest:{tmp_path / 'm.jsonl'}", str(tmp_path / "hf")], table, IngestOptions(**QUIET))
    assert summary.samples.added == 3 and summary.reconciled
    samples = open_samples(table).to_table().to_pylist()
    assert sorted(s["source_kind"] for s in samples) == ["hf", "manifest", "manifest"]
    assert all(len(s["image_ids"]) == 1 and s["messages"][0]["content"].startswith("<image>") for s in samples)


def test_sample_id_is_the_content_and_diff_counts_samples_between_image_versions(ray_cluster, tmp_path: Path) -> None:
    from lance_io.table import open_table

    turns = _chat("<image><image>Order?", "Matters.")
    assert sample_id(["a", "b"], turns) != sample_id(["b", "a"], turns)
    assert sample_id(["a"], turns) == sample_id(["a"], json.loads(json.dumps(turns)))

    first = write_mllm_demo(tmp_path / "one", [{"messages": _chat("<image>1?", "one"), "images": [A]}], name="one")
    table = str(tmp_path / "t.lance")
    ingest([str(first)], table, IngestOptions(**QUIET))
    before = open_table(table).version
    second = write_mllm_demo(
        tmp_path / "two",
        [{"messages": _chat("<image>2?", "two"), "images": [B]}, {"messages": _chat("<image>3?", "three"), "images": [A]}],
        name="two",
    )
    ingest([str(second)], table, IngestOptions(**QUIET))
    diff = diff_samples(table, before, open_table(table).version)
    assert (diff.before, diff.after, diff.added, diff.removed) == (1, 3, 2, 0)

    def cli(*args: str) -> dict:
        out = subprocess.run([LANCETAG, *args, "--json"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert cli("show", table)["samples"] == 3 and cli("show", table, "--version", str(before))["samples"] == 1
    assert cli("diff", table, str(before), str(open_table(table).version))["samples"]["added"] == 2


def test_hf_rows_with_an_images_list_are_multi_image_samples_in_order_with_their_split(ray_cluster, tmp_path: Path):
    import datasets

    from bench.data import digit_images
    from lance_io.table import open_table

    (a, _), (b, _) = digit_images(2, start=60)
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        }
    )
    rows = {
        "images": [[{"bytes": b, "path": None}, {"bytes": a, "path": None}], [{"bytes": a, "path": None}]],
        "messages": [_chat("<image><image>Which is first?", "The second digit."), _chat("Too few placeholders", "x")],
    }
    train = datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()}, features=features)
    test = datasets.Dataset.from_dict({k: v[1:] for k, v in rows.items()}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "hf"))

    table = str(tmp_path / "t.lance")
    summary = ingest([str(tmp_path / "hf")], table, IngestOptions(**QUIET))
    assert (summary.added, summary.duplicates) == (2, 1)
    assert (summary.samples.added, summary.samples.errors) == (1, 1) and summary.reconciled
    ids = {r["source"] for r in open_table(table).to_table(columns=["source"]).to_pylist()}
    assert len(ids) == 2
    (sample,) = open_samples(table).to_table().to_pylist()
    from lance_io.schema import image_id

    assert sample["image_ids"] == [image_id(b), image_id(a)] and sample["split"] == "train"
    (error,) = [r for r in read_errors(table).to_pylist() if r["stage"] == "sample"]
    assert error["reason"] == "placeholder_mismatch"

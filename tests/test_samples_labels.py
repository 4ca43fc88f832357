"""Labels become samples: a label column's chats, a human-written dataset and both together train through one path."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import lance

from bench.data import digit_images, write_table
from bench.samples_data import write_mllm_demo
from tests.conftest import LANCETAG


def _cli(*args: str) -> dict:
    out = subprocess.run([LANCETAG, *args, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _loaded(source) -> list[tuple[str, tuple[bytes, ...]]]:
    from llamafactory_ext.reader import load_rows

    return sorted((json.dumps(r["messages"]), tuple(r["images"])) for r in load_rows(source))


def test_label_samples_equal_the_label_entry_mix_with_a_sharegpt_dataset_and_follow_relabels(ray_cluster, tmp_path: Path):
    from lance_io.samples import open_samples
    from llamafactory_ext.reader import resolve
    from llamafactory_ext.register import register_dataset
    from llamafactory_ext.source import LanceSource
    from ray_jobs.ingest import IngestOptions, ingest

    table = str(tmp_path / "digits.lance")
    write_table(table, digit_images(12))
    made = _cli("lf", "samples-from-labels", table, "--label-column", "truth")
    assert (made["samples"], made["added"], made["removed"], made["source"]) == (12, 12, 0, "labels:truth")
    again = _cli("lf", "samples-from-labels", table, "--label-column", "truth")
    assert (again["added"], again["removed"]) == (0, 0)  # idempotent: a sample is its content

    from_labels = resolve(LanceSource(uri=table, label_column="truth"))
    as_samples = register_dataset(table, "s", tmp_path / "d", where="source = 'labels:truth'")
    samples_source = LanceSource.model_validate(json.loads((tmp_path / "d" / "dataset_info.json").read_text())["s"]["lance"])
    assert as_samples.rows == 12 and _loaded(samples_source) == _loaded(from_labels)

    demo = write_mllm_demo(tmp_path / "human")
    ingest([str(demo)], table, IngestOptions(progress=False))  # a human-written dataset into the same table
    mixed = register_dataset(table, "mixed", tmp_path / "d")
    assert mixed.rows == 12 + 6
    kinds = sorted(r["source_kind"] for r in open_samples(table).to_table(columns=["source_kind"]).to_pylist())
    assert kinds == ["labels"] * 12 + ["sharegpt"] * 6

    first = lance.dataset(table).to_table(columns=["id"], limit=1).column("id")[0].as_py()
    lance.dataset(table).update({"truth": "'3'"}, where=f"id = '{first}' AND truth != '3'")
    relabeled = _cli("lf", "samples-from-labels", table, "--label-column", "truth")
    assert (relabeled["added"], relabeled["removed"]) == (1, 1)  # the old answer goes, the new one comes
    assert open_samples(table).count_rows() == 18
    answers = [
        r["messages"][-1]["content"]
        for r in open_samples(table).to_table(filter="source = 'labels:truth'").to_pylist()
        if r["image_ids"] == [first]
    ]
    assert len(answers) == 1 and "3" in answers[0]
